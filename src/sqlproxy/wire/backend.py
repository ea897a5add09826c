"""One upstream PostgreSQL connection, on an asyncio Protocol.

Connecting and logging in (with the proxy's own DSN credentials, SCRAM or MD5) is a plain
coroutine. After that the connection is driven by its :class:`~sqlproxy.wire.pump.ResponsePump`:
every byte the server sends is matched, in ``data_received`` itself, against the responses the
session said to expect, and forwarded to the client transport (or swallowed, for what the proxy
sent on its own behalf). No task switch sits between a server reply and the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from psycopg.conninfo import conninfo_to_dict

from sqlproxy.pipeline.errors import UpstreamUnavailable
from sqlproxy.protocol.framing import BackendDecoder
from sqlproxy.protocol.md5 import md5_password_hash, md5_response_from_hash
from sqlproxy.protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    SSLResponse,
    StartupMessage,
)
from sqlproxy.protocol.scram import ScramClient

if TYPE_CHECKING:
    from sqlproxy.tcp import TcpOptions
    from sqlproxy.wire.pump import ResponsePump


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and as whom the proxy logs in upstream, parsed once from the database's DSN."""

    host: str
    port: int
    user: str
    password: str | None
    database: str
    sslmode: str

    @classmethod
    def from_dsn(cls, dsn: str) -> UpstreamTarget:
        d = conninfo_to_dict(dsn)
        host = str(d.get("host") or "127.0.0.1").split(",")[0]
        return cls(
            host=host,
            port=int(str(d.get("port") or 5432).split(",")[0]),
            user=str(d.get("user") or "postgres"),
            password=str(d["password"]) if d.get("password") is not None else None,
            database=str(d.get("dbname") or d.get("user") or "postgres"),
            sslmode=str(d.get("sslmode") or "prefer"),
        )


class BackendConnection(asyncio.Protocol):
    """A logged-in server connection. ``pump`` owns the byte stream once login is done."""

    def __init__(self, target: UpstreamTarget, tcp: TcpOptions | None = None) -> None:
        self.target = target
        self.tcp = tcp
        self.transport: asyncio.Transport | None = None
        self.decoder = BackendDecoder()
        self.pump: ResponsePump | None = None
        self.closed = False
        # Why the connection went away without the proxy closing it (the server's end of
        # stream, or the kernel's error: ETIMEDOUT from keepalive or TCP_USER_TIMEOUT).
        self.lost_reason: str | None = None
        self.parameters: dict[str, str] = {}
        self.pid = 0
        self.secret = b""
        # Server-side prepared statement names this connection holds (see wire.statements).
        self.prepared: set[str] = set()
        # Which client statement the unnamed server statement currently is (identity compared).
        self.unnamed_owner: object | None = None
        # The settings (sqlproxy.user, the client's SETs) last applied; None after a reset.
        self.settings_key: object | None = None
        # Session state that a reset must clear before another client may use this connection.
        self.dirty = False
        self._waiter: asyncio.Future[None] | None = None
        self._client_transport: asyncio.Transport | None = None
        self._write_paused = False
        # Reading from the server paused for the client's sake (WireSession.pause_writing).
        self.read_paused = False
        # When the pool last put it back (time.monotonic()).
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (`sqlproxy serve` runs on uvloop) implement asyncio.Transport
        # without subclassing it, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        if self.tcp is not None:
            self.tcp.apply(transport)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        if self.pump is not None:
            self.pump.on_data()
        else:
            self._wake()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self.lost_reason is None:
            self.lost_reason = "closed by the server" if exc is None else f"{type(exc).__name__}: {exc}"
        self.closed = True
        if self.pump is not None:
            self.pump.on_lost()
        self._wake()

    def pause_writing(self) -> None:
        # The server reads slower than the client sends: stop reading the client.
        self._write_paused = True
        if self._client_transport is not None and not self._client_transport.is_closing():
            with contextlib.suppress(RuntimeError):
                self._client_transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._client_transport is not None and not self._client_transport.is_closing():
            with contextlib.suppress(RuntimeError):
                self._client_transport.resume_reading()

    def attach_client(self, transport: asyncio.Transport | None) -> None:
        old = self._client_transport
        if old is not None and old is not transport and self._write_paused and not old.is_closing():
            with contextlib.suppress(RuntimeError):
                old.resume_reading()  # this connection paused that client; it no longer serves it
        self._client_transport = transport
        # Reading from the server may have been paused for the previous client's sake (its
        # socket was full, WireSession.pause_writing, e.g. at the end of a large COPY TO
        # STDOUT): a connection changing hands must read again, or its next user waits forever.
        if self.read_paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        """Stop reading from the server (its client's socket is full)."""
        if self.transport is not None and not self.closed and not self.read_paused:
            self.read_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.read_paused = False
        if self.transport is not None and not self.closed:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    # -- I/O helpers -----------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise UpstreamUnavailable("upstream closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def has_input(self) -> bool:
        """Whether bytes (or the end of the stream) wait to be read on the socket, without
        reading them: a zero-timeout poll of its descriptor."""
        if self.transport is None or self.closed:
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            fd = sock.fileno()
            if fd < 0:
                return True
            readable, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            # Terminate tells the server to end the session cleanly instead of logging an EOF.
            with contextlib.suppress(Exception):
                self.transport.write(b"X\x00\x00\x00\x04")
            self.transport.close()
        self.closed = True

    @property
    def busy(self) -> bool:
        return self.pump is not None and self.pump.pending

    # -- login -----------------------------------------------------------------------------
    async def login(self, limit_s: float) -> None:
        try:
            await asyncio.wait_for(self._login(), limit_s)
        except TimeoutError:
            self.close()
            raise UpstreamUnavailable("upstream login timed out") from None
        except UpstreamUnavailable:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise UpstreamUnavailable(f"upstream login failed: {type(e).__name__}: {e}") from e

    async def _next(self) -> object:
        while True:
            msg = self.decoder.next()
            if msg is not None:
                return msg
            await self._wait()

    async def _login(self) -> None:
        t = self.target
        if t.sslmode in ("require", "verify-ca", "verify-full", "prefer") and not t.host.startswith("/"):
            await self._negotiate_tls()
        self.write(
            StartupMessage.build(
                {"user": t.user, "database": t.database, "application_name": "sqlproxy"}
            ).encode()
        )
        scram: ScramClient | None = None
        while True:
            msg = await self._next()
            if isinstance(msg, AuthenticationOk):
                continue
            if isinstance(msg, AuthenticationSASL):
                scram = ScramClient(t.password or "")
                mech = scram.select_mechanism(msg.mechanisms)
                self.write(SASLInitialResponse(mech, scram.client_first()).encode())
            elif isinstance(msg, AuthenticationSASLContinue):
                assert scram is not None
                self.write(SASLResponse(scram.process_server_first(msg.data)).encode())
            elif isinstance(msg, AuthenticationSASLFinal):
                assert scram is not None
                scram.process_server_final(msg.data)
            elif isinstance(msg, AuthenticationMD5Password):
                stored = md5_password_hash(t.user, t.password or "")
                self.write(PasswordMessage(md5_response_from_hash(stored, msg.salt)).encode())
            elif isinstance(msg, AuthenticationCleartextPassword):
                self.write(PasswordMessage(t.password or "").encode())
            elif isinstance(msg, ParameterStatus):
                self.parameters[msg.name] = msg.value
            elif isinstance(msg, BackendKeyData):
                self.pid, self.secret = msg.process_id, msg.secret_key
            elif isinstance(msg, ReadyForQuery):
                return
            elif isinstance(msg, ErrorResponse):
                raise UpstreamUnavailable(f"upstream refused the login: {msg.message}")
            # NoticeResponse / NegotiateProtocolVersion during login: nothing to do.

    async def _negotiate_tls(self) -> None:
        self.decoder.expect_encryption_response("ssl")
        self.write(SSLRequest().encode())
        resp = await self._next()
        if isinstance(resp, SSLResponse) and resp.accepted:
            ctx = ssl.create_default_context()
            if self.target.sslmode not in ("verify-ca", "verify-full"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.check_hostname = self.target.sslmode == "verify-full"
            assert self.transport is not None
            loop = asyncio.get_running_loop()
            new = await loop.start_tls(self.transport, self, ctx, server_hostname=self.target.host)
            assert new is not None
            self.transport = new
        elif self.target.sslmode in ("require", "verify-ca", "verify-full"):
            raise UpstreamUnavailable("upstream does not support TLS but sslmode requires it")


async def connect_backend(
    target: UpstreamTarget, limit_s: float, tcp: TcpOptions | None = None
) -> BackendConnection:
    loop = asyncio.get_running_loop()
    try:
        if target.host.startswith("/"):
            _, proto = await asyncio.wait_for(
                loop.create_unix_connection(
                    lambda: BackendConnection(target), f"{target.host}/.s.PGSQL.{target.port}"
                ),
                limit_s,
            )
        else:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: BackendConnection(target, tcp), target.host, target.port),
                limit_s,
            )
    except (OSError, TimeoutError) as e:
        raise UpstreamUnavailable(f"upstream unavailable: {type(e).__name__}") from e
    await proto.login(limit_s)
    return proto


async def send_cancel(target: UpstreamTarget, pid: int, secret: bytes, limit_s: float = 5.0) -> None:
    """Open a throwaway connection and send CancelRequest for server process ``pid``."""
    loop = asyncio.get_running_loop()
    try:
        if target.host.startswith("/"):
            transport, _ = await asyncio.wait_for(
                loop.create_unix_connection(asyncio.Protocol, f"{target.host}/.s.PGSQL.{target.port}"),
                limit_s,
            )
        else:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(asyncio.Protocol, target.host, target.port), limit_s
            )
    except (OSError, TimeoutError):
        return
    transport.write(CancelRequest(pid, secret).encode())
    # The server closes after reading the request; closing here after the write is flushed is
    # what libpq does too.
    transport.close()
