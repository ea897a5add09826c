"""A raw PostgreSQL wire client on asyncio streams, for tests that must send bytes no real
client would: it frames what it is given verbatim and decodes the replies with the project's
sans-IO BackendDecoder. Logging in uses SCRAM-SHA-256 like libpq."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import uuid

from sqlproxy.protocol.errors import ProtocolViolation
from sqlproxy.protocol.framing import BackendDecoder
from sqlproxy.protocol.messages import (
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    ErrorResponse,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
)
from sqlproxy.protocol.scram import ScramClient
from sqlproxy.wire.session import WireSession

# Bounds that only turn a hang into a failure; nothing waits for them to pass.
HANG_S = 60.0


def frame(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\0")


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.dec = BackendDecoder()
        self.key: BackendKeyData | None = None

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), HANG_S)
        return cls(r, w)

    @classmethod
    async def open_tls(
        cls, port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1", server_hostname: str = "localhost"
    ) -> RawClient:
        """A direct TLS connection (libpq's sslnegotiation=direct): the TLS handshake first,
        no SSLRequest. ALPN is whatever ``ctx`` offers."""
        r, w = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname), HANG_S
        )
        return cls(r, w)

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_byte(self) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(1), HANG_S)

    async def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None = None) -> None:
        await asyncio.wait_for(self.writer.start_tls(ctx, server_hostname=server_hostname), HANG_S)

    async def recv(self) -> BackendMessage | None:
        """The next message, or None once the proxy has closed the connection."""
        while True:
            msg = self.dec.next()
            if msg is not None:
                return msg
            try:
                data = await asyncio.wait_for(self.reader.read(65536), HANG_S)
            except ConnectionResetError:
                data = b""
            if not data:
                self.dec.feed_eof()
                try:
                    return self.dec.next()
                except ProtocolViolation:
                    return None
            self.dec.feed(data)

    async def until_eof(self) -> list[BackendMessage]:
        out: list[BackendMessage] = []
        while (msg := await self.recv()) is not None:
            out.append(msg)
        return out

    async def until_ready(self) -> list[BackendMessage]:
        """Messages up to and including ReadyForQuery."""
        out: list[BackendMessage] = []
        while True:
            msg = await self.recv()
            assert msg is not None, f"connection closed before ReadyForQuery; got {out}"
            out.append(msg)
            if isinstance(msg, ReadyForQuery):
                return out

    async def login(
        self, user: str, password: str, database: str = "demo", *, pipeline: bytes = b""
    ) -> list[BackendMessage]:
        """SCRAM login; returns what the proxy sent (the last is ErrorResponse on failure,
        ReadyForQuery on success). ``pipeline`` goes out with the last SCRAM message."""
        self.send(StartupMessage.build({"user": user, "database": database}).encode())
        seen: list[BackendMessage] = []
        scram: ScramClient | None = None
        while True:
            msg = await self.recv()
            assert msg is not None, f"connection closed during login; got {seen}"
            seen.append(msg)
            if isinstance(msg, AuthenticationSASL):
                scram = ScramClient(password)
                mech = scram.select_mechanism(msg.mechanisms)
                self.send(SASLInitialResponse(mech, scram.client_first()).encode())
            elif isinstance(msg, AuthenticationSASLContinue):
                assert scram is not None
                self.send(SASLResponse(scram.process_server_first(msg.data)).encode() + pipeline)
            elif isinstance(msg, AuthenticationSASLFinal):
                assert scram is not None
                scram.process_server_final(msg.data)
            elif isinstance(msg, BackendKeyData):
                self.key = msg
            elif isinstance(msg, ReadyForQuery | ErrorResponse):
                return seen
            elif isinstance(msg, AuthenticationOk):
                continue

    def abort(self) -> None:
        """Vanish without a Terminate (RST), as a crashed client does."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), HANG_S)


def errors(msgs: list[BackendMessage]) -> list[ErrorResponse]:
    return [m for m in msgs if isinstance(m, ErrorResponse)]


def fatal(msgs: list[BackendMessage]) -> ErrorResponse:
    """The one FATAL ErrorResponse in ``msgs``, which must be the last message."""
    errs = [m for m in msgs if isinstance(m, ErrorResponse) and m.severity == "FATAL"]
    assert len(errs) == 1, f"expected one FATAL ErrorResponse, got {msgs}"
    assert msgs[-1] is errs[0], f"the FATAL must be the last message, got {msgs}"
    return errs[0]


async def session_ended(s: WireSession) -> None:
    """Wait until the session's task has run its cleanup (the event that proves it)."""
    assert s.task is not None
    await asyncio.wait_for(asyncio.shield(s.task), HANG_S)


# Server-side helpers. The demo policy treats pg_sleep as dangerous (it is), so the long
# statements call it from inside a function in a schema of the test's own: the proxy decides
# the call of robust.hold, which admin may run. hold() takes an advisory lock for its
# transaction first and then says so with a NOTICE carrying the server pid; wait() says so
# first and then waits for a lock the test holds.
ROBUST_SQL = """
CREATE SCHEMA IF NOT EXISTS robust;
CREATE TABLE IF NOT EXISTS robust.t (tag text NOT NULL, n int NOT NULL);
CREATE OR REPLACE FUNCTION robust.hold(k bigint, secs float8) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(k);
  RAISE NOTICE 'running %', pg_backend_pid();
  PERFORM pg_sleep(secs);
  RETURN pg_backend_pid();
END $$;
CREATE OR REPLACE FUNCTION robust.wait(k bigint) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  RAISE NOTICE 'waiting %', pg_backend_pid();
  PERFORM pg_advisory_xact_lock(k);
  RETURN pg_backend_pid();
END $$;
"""


def lock_key() -> int:
    """A fresh advisory lock key, so tests never wait on each other's locks."""
    return uuid.uuid4().int % (2**62)
