"""One client connection on the wire door (WireSession).

The client side is an asyncio Protocol feeding a sans-IO :class:`FrontendDecoder`; one task
per session reads messages and acts on them. Replies from the server never pass through that
task: the server connection's :class:`ResponsePump` forwards them from ``data_received``.

Simple Query: every statement goes through ``runtime.handle`` (the one pipeline, audit
outermost) with an executor that sends the decided, possibly rewritten, text upstream and
waits for ReadyForQuery. Extended protocol: Parse runs the decision stages once per SQL text
(:mod:`sqlproxy.wire.decide`); Bind/Describe/Execute/Close/Sync are forwarded with statement
names translated; each Execute leaves one audit record when its CommandComplete arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from sqlproxy.auth.users import Identity, _source_lock_key, _user_lock_key, parse_source_ip
from sqlproxy.execute.upstream import StatementResult
from sqlproxy.memo import IdMemo
from sqlproxy.pipeline.errors import ProxyError, RateLimited, Unauthenticated, UpstreamError
from sqlproxy.pipeline.request import Request
from sqlproxy.protocol.errors import (
    AuthenticationFailed,
    ProtocolViolation,
    error_response,
    fatal_response,
)
from sqlproxy.protocol.framing import FrontendDecoder
from sqlproxy.protocol.md5 import is_md5_hash, md5_password_hash, md5_verify
from sqlproxy.protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    GSSENCRequest,
    NegotiateProtocolVersion,
    ParameterStatus,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
)
from sqlproxy.protocol.scram import ScramServer, ScramVerifier
from sqlproxy.sql.model import Analysis, OutputColumn, StatementKind
from sqlproxy.wire.backend import BackendConnection
from sqlproxy.wire.decide import Prepared, pins
from sqlproxy.wire.pool import BackendPool
from sqlproxy.wire.pump import (
    BIND,
    CLOSE,
    DESCRIBE_P,
    DESCRIBE_S,
    EXECUTE,
    FAIL_PARSE,
    FAIL_SIMPLE,
    HIDDEN,
    PARSE,
    PARSE_HIDDEN,
    SIMPLE,
    SYNC,
    SYNTH,
    CopyStats,
    Exp,
    PumpOwner,
    SimpleCall,
)
from sqlproxy.wire.settings import ClientSettings

if TYPE_CHECKING:
    from sqlproxy.wire.listener import DoorSettings, WireServer

log = logging.getLogger(__name__)

_Q, _P, _B, _D, _E, _C, _S, _H, _X, _F = (ord(c) for c in "QPBDECSHXF")
_COPY_DATA, _COPY_DONE, _COPY_FAIL = ord("d"), ord("c"), ord("f")
_EXTENDED = frozenset({_P, _B, _D, _E, _C, _S, _H})
_U32 = struct.Struct("!I")

_PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_SYNC_MSG = b"S\x00\x00\x00\x04"
_CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
_EMPTY_QUERY = b"I\x00\x00\x00\x04"
_READY = {s: b"Z\x00\x00\x00\x05" + s.encode() for s in "ITE"}
_DEALLOCATE_DONE = b"C\x00\x00\x00\x0fDEALLOCATE\x00"
_DEALLOCATE, _DISCARD, _CURSOR = StatementKind.DEALLOCATE, StatementKind.DISCARD, StatementKind.CURSOR
_MAX_CURSORS = 1024
# A statement that cannot parse: sent to put the server's transaction into the failed state
# when the proxy refuses a statement inside it, exactly as a server-side error would.
_FAIL_SQL = b"sqlproxy: statement refused by the proxy"
_FAIL_QUERY = b"Q" + _U32.pack(len(_FAIL_SQL) + 5) + _FAIL_SQL + b"\0"
_FAIL_PARSE_MSG = b"P" + _U32.pack(len(_FAIL_SQL) + 8) + b"\0" + _FAIL_SQL + b"\0\0\0"
_UNREPORTED_PARAMS = frozenset({"is_superuser", "session_authorization"})
# The ALPN protocol name of the PostgreSQL wire protocol (PostgreSQL 17).
ALPN = "postgresql"
# The first byte of a TLS handshake record: a direct TLS client (sslnegotiation=direct). No
# startup packet starts with it (its length would be over 369 MB).
TLS_HANDSHAKE = 0x16


class ClientGone(Exception):
    pass


class Fatal(Exception):
    """End the session with a FATAL ErrorResponse."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class ForwardedError(UpstreamError):
    """The server's ErrorResponse (and ReadyForQuery) already reached the client."""


def _resolve(fut: asyncio.Future[object]) -> None:
    if not fut.done():
        fut.set_result(None)


_EXPIRED = object()


def _expire(fut: asyncio.Future[object]) -> None:
    if not fut.done():
        fut.set_result(_EXPIRED)


def _copy_over(call: SimpleCall, stats: CopyStats) -> Callable[[], bool]:
    return lambda: call.finished or call.copying is not stats


_EFFECT_KINDS = frozenset({StatementKind.SET, StatementKind.DISCARD, StatementKind.TRANSACTION})
_effects: IdMemo[Analysis, tuple[bool, bool]] = IdMemo()


def _session_effects(a: Analysis) -> tuple[bool, bool]:
    """(pins the session, may change what the session carries: SET, search_path, DISCARD,
    the end of a transaction), once per analysis object: the analysis cache hands the same
    object to every statement of one shape."""
    hit = _effects.get(a)
    if hit is not None:
        return hit
    stateful = any(st.kind in _EFFECT_KINDS or st.search_path is not None for st in a.statements)
    return _effects.put(a, (pins(a), stateful))


def _nul(payload: bytes, start: int = 0) -> int:
    """Where the C string at ``start`` ends. A missing terminator is the client's protocol
    violation (08P01, as the server reports it), not an internal error of the proxy."""
    i = payload.find(0, start)
    if i < 0:
        raise ProtocolViolation("invalid string in message")
    return i


def peek_first(sock: socket.socket) -> bytes | None:
    """The first byte waiting on a non-blocking ``sock``, left there (MSG_PEEK); b"" when the
    client closed, None when nothing has come yet. A reset raises (OSError)."""
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None


def _peek_first_byte(transport: asyncio.BaseTransport) -> int | None:
    """The first byte the client sent, peeked (it stays in the socket); None when nothing has
    arrived yet or the client has gone. -1 for a transport without a socket (a test's), which
    has no direct TLS."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    peek = socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
    try:
        first = peek_first(peek)
    except OSError:  # gone
        return None
    finally:
        peek.detach()  # the descriptor stays the transport's
    return first[0] if first else None


def _frame(t: bytes, body: bytes) -> bytes:
    return t + _U32.pack(len(body) + 4) + body


class WireSession(asyncio.Protocol, PumpOwner):
    def __init__(
        self,
        server: WireServer,
        *,
        direct_tls: bool = False,
        deadline: float | None = None,
        door: DoorSettings | None = None,
    ) -> None:
        """``direct_tls``: the listener did a direct TLS handshake before this session began;
        ``deadline``: the loop time by which startup must be done, when the listener has
        already spent part of startup_timeout_s on the connection (WireServer.hand_over);
        ``door``: the listener's settings when it accepted the connection (by default, its
        current ones), which the session keeps whatever a reload brings."""
        self.server = server
        self.direct_tls = direct_tls
        self.deadline = deadline
        self.rt = server.runtime
        self.door = door if door is not None else server.door
        self.cfg = self.door.config
        self.transport: asyncio.Transport | None = None
        self.client_transport = None
        self.dec = FrontendDecoder(max_message_length=self.cfg.max_message_bytes)
        self._waiter: asyncio.Future[object] | None = None
        self._eof = False
        self._ignore_input = False
        self.task: asyncio.Task[None] | None = None
        self.source_ip = "unknown"
        self.source_port: int | None = None
        self.source_text = "unknown"
        self.tls = direct_tls
        self.identity: Identity | None = None
        self.database: str | None = None
        self.pool: BackendPool | None = None
        self.settings: ClientSettings | None = None
        self.be: BackendConnection | None = None
        self.key = (0, b"")
        self.counted = False
        # Protocol state.
        self.status = "I"
        self.search_path: tuple[str, ...] | None = None
        self.pinned = self.cfg.pool_mode == "session"
        self.discard = False  # the proxy failed the extended batch: drop messages until Sync
        self.simple_active = False
        self.stmts: dict[bytes, Prepared] = {}
        # The users the identity was taken from; a reload replaces them (see _refresh_identity).
        self._users: object = None
        # Cursors declared in this session, by name: their query's lineage, for FETCH's records.
        self.cursors: dict[str, tuple[OutputColumn, ...]] = {}
        self.unnamed: Prepared | None = None
        self.portals: dict[bytes, Prepared] = {}
        self._cache: dict[tuple[bytes, bytes, tuple[str, ...] | None], Prepared] = {}
        self._cache_token: tuple[object, object] | None = None
        self._out: list[bytes] = []
        self._audits: deque[Request] = deque()
        # True while the session task waits for client bytes.
        self._reading = False
        # Extended-protocol messages forwarded since the last Sync, and whether any of them
        # made a portal (which lives on this server connection until that Sync).
        self._batch_open = False
        self._batch_portal = False
        # COPY FROM STDIN: relaying the client's data (simple protocol), and the extended-
        # protocol COPY the server has entered (set by the pump, relayed by the message loop).
        self._copy_relay = False
        self._copy_ext: CopyStats | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (`sqlproxy serve` runs on uvloop) implement asyncio.Transport
        # without subclassing it, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        self.door.tcp.apply(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.source_ip, self.source_port = str(peer[0]), int(peer[1])
        elif peer:
            self.source_ip = str(peer)
        else:
            self.source_ip = "local"
        port = self.source_port
        self.source_text = self.source_ip if port is None else f"{self.source_ip}:{port}"
        if not self.direct_tls and self.deadline is None:
            # A fresh connection: its first byte decides between the PostgreSQL protocol and
            # a direct TLS handshake (sslnegotiation=direct), which must reach a TLS layer
            # whole, but asyncio's start_tls cannot be handed bytes already read (and uvloop
            # starts reading right after connection_made, paused or not). So the byte is
            # peeked; unless it is here already and not TLS, the listener takes the socket
            # over (WireServer.hand_over) and this transport never reads.
            first = _peek_first_byte(transport)
            if first is None or first == TLS_HANDSHAKE:
                self.server.hand_over(self.transport, self.source_text, self.door)
                return
        self.task = asyncio.get_running_loop().create_task(self.run())
        self.server.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        if self._eof or self._ignore_input:
            return
        self.dec.feed(data)
        self.wake()

    def eof_received(self) -> bool | None:
        self._gone()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        # A client that vanishes mid-query must not leave its task waiting on the server.
        if self.task is not None and not self.task.done() and self.simple_active:
            self.task.cancel()

    def _gone(self) -> None:
        self._eof = True
        self.wake()

    def pause_writing(self) -> None:
        be = self.be
        if be is not None:
            be.pause_reading()

    def resume_writing(self) -> None:
        be = self.be
        if be is not None:
            be.resume_reading()

    def wake(self) -> None:
        w = self._waiter
        if w is not None:
            _resolve(w)

    # -- reading -----------------------------------------------------------------------------
    async def _more(self) -> None:
        """Wait for more bytes from the client, enforcing idle timeouts and shutdown."""
        if self._out:
            self._flush()
        if self._eof:
            raise ClientGone
        busy = self.be is not None and self.be.pump is not None and self.be.pump.pending
        idle = not busy and self.status == "I"
        if self.server.stopping and idle and self.counted:
            raise Fatal("57P01", "terminating connection due to administrator command")
        timeout = 0.0
        if not busy and self.counted:
            c = self.cfg
            timeout = c.idle_timeout_s if self.status == "I" else c.idle_in_transaction_timeout_s
        self._release_if_idle()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiter = fut
        self._reading = True
        # A timer handle rather than asyncio.wait_for: this runs once per client message.
        timer = loop.call_later(timeout, _expire, fut) if timeout > 0 else None
        try:
            await fut
        finally:
            self._waiter = None
            self._reading = False
            if timer is not None:
                timer.cancel()
        if fut.result() is _EXPIRED:
            if self.status == "I":
                raise Fatal("57P05", "terminating connection due to idle-session timeout")
            raise Fatal("25P03", "terminating connection due to idle-in-transaction timeout")
        if self._eof and not self.dec.buffered:
            raise ClientGone
        if self.rt.users is not self._users and not self._refresh_identity():
            assert self.identity is not None
            message = (
                f'terminating connection: user "{self.identity.name}" may no longer connect '
                "(configuration reloaded)"
            )
            req = self._request(None, self.search_path)
            req.error = Unauthenticated(message, sqlstate="57P01")
            await asyncio.shield(self.rt.audit_request(req))
            raise Fatal("57P01", message)

    def _request(self, sql: str | None, search_path: tuple[str, ...] | None) -> Request:
        """A pipeline request from this session's client."""
        return Request(
            door="wire",
            sql=sql,
            source_ip=self.source_ip,
            source_port=self.source_port,
            source_text=self.source_text,
            database=self.database,
            identity=self.identity,
            search_path=search_path,
        )

    def _refresh_identity(self) -> bool:
        """A reload replaced the users: the session's roles and attributes become the ones now
        configured (the policy decides with them from the next statement on). False when the
        user was removed or disabled, or may no longer connect from this address: the session
        is then ended, as an administrator's terminate would, and audited."""
        users = self.rt.users
        self._users = users
        ident = self.identity
        if ident is None:
            return True
        new = users.identity(ident.name)
        if (
            new is None
            or users.is_disabled(ident.name)
            or not users.source_allowed(ident.name, self.source_ip)
        ):
            return False
        self.identity = new
        return True

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send(self, data: bytes) -> None:
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        be = self.be
        if be is not None and out:
            be.write(b"".join(out) if len(out) > 1 else out[0])

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            timeout = self.cfg.startup_timeout_s
            if self.deadline is not None:
                timeout = max(self.deadline - asyncio.get_running_loop().time(), 0.001)
            if await asyncio.wait_for(self._startup(), timeout):
                await self._serve()
        except ClientGone:
            pass
        except TimeoutError:
            self._write(fatal_response("08006", "timeout expired during startup"))
        except asyncio.CancelledError:
            pass
        except Fatal as e:
            self._write(fatal_response(e.sqlstate, e.message))
        except ProtocolViolation as e:
            if self.client_transport is not None:
                await self._answer_what_came_before()
            self._write(fatal_response(e.sqlstate, e.message))
        except ProxyError as e:
            self._write(fatal_response(e.sqlstate, e.message))
        except Exception:
            log.exception("wire session failed")
            self._write(fatal_response("XX000", "internal error in the proxy"))
        finally:
            await self._cleanup()

    async def _answer_what_came_before(self) -> None:
        """A message the client sent cannot be read. PostgreSQL reads in order: it answers the
        messages before the bad one (a pipelined batch, say) and then ends the session; so
        does the proxy: what it queued for the server goes out and the replies come back to
        the client before the FATAL. Nothing more is read from the client meanwhile."""
        self._ignore_input = True
        be = self.be
        if be is None or be.pump is None:
            return
        self._flush()
        loop = asyncio.get_running_loop()
        while be.pump.pending and not be.closed and self.be is be and not self._eof:
            fut = loop.create_future()
            self._waiter = fut  # backend_ready and the client's going away resolve it
            try:
                await fut
            finally:
                self._waiter = None

    async def _cleanup(self) -> None:
        # The session has said its last word (a FATAL, or nothing): what the server still sends
        # on its connection (a ParameterStatus from the settings query, say) must not follow it.
        self.client_transport = None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._flush_audits())
        be, self.be = self.be, None
        if be is not None and self.pool is not None:
            pump = be.pump
            if pump is not None and (pump.pending or self._out):
                # Mid-query: stop the server's work, then drop the connection (never reuse it).
                self.server.spawn(self.server.cancel_backend(self.pool.target, be.pid, be.secret))
                self.pool.discard(be)
            elif self.status != "I" or self._batch_open or self.pinned:
                if self.status != "I" or self._batch_open:
                    # The server rolls the transaction back: also the implicit one of an
                    # extended-protocol batch that never got its Sync.
                    self.pool.discard(be)
                else:
                    self.pool.release(be, reset=True)
            else:
                self.pool.release(be)
        self.server.forget(self)
        if self.transport is not None:
            self.transport.close()

    # -- startup -----------------------------------------------------------------------------
    async def _next_startup(self) -> object:
        while True:
            msg = self.dec.next()
            if msg is not None:
                return msg
            await self._more()

    def _check_direct_tls(self) -> None:
        """A direct TLS connection (the listener did the handshake): as PostgreSQL 17, the
        client must have negotiated ALPN "postgresql", or the connection is closed without a
        word. An SSLRequest inside it is then a protocol violation."""
        assert self.transport is not None
        tls = self.transport.get_extra_info("ssl_object")
        if tls is None or tls.selected_alpn_protocol() != ALPN:
            log.info('direct TLS connection from %s closed: no ALPN "%s" negotiated', self.source_text, ALPN)
            raise ClientGone
        self.dec.tls_established()

    async def _startup(self) -> bool:
        if self.direct_tls:
            self._check_direct_tls()
        while True:
            msg = await self._next_startup()
            if isinstance(msg, SSLRequest):
                ctx = self.door.ssl_context
                if ctx is None:
                    self._write(b"N")
                    continue
                self._write(b"S")
                await self._start_tls(ctx)
                continue
            if isinstance(msg, GSSENCRequest):
                self._write(b"N")
                continue
            if isinstance(msg, CancelRequest):
                await self.server.cancel(msg.process_id, msg.secret_key)
                return False
            if isinstance(msg, StartupMessage):
                break
            raise ProtocolViolation("unexpected message during startup")
        if msg.major != 3:
            raise Fatal("0A000", f"unsupported frontend protocol {msg.major}.{msg.minor}")
        if self.cfg.require_tls and not self.tls:
            raise Fatal("28000", "this proxy accepts only TLS connections (use sslmode=require)")
        unrecognized = tuple(k for k, _ in msg.parameters if k.startswith("_pq_."))
        if msg.minor > 0 or unrecognized:
            self._write(NegotiateProtocolVersion(0, unrecognized).encode())
        user = msg.user
        if not user:
            raise Fatal("28000", "no PostgreSQL user name specified in startup packet")
        if msg.get("replication") not in (None, "false", "0", "off", "no"):
            raise Fatal("0A000", "replication connections are not supported by the proxy")
        if self.server.stopping:
            raise Fatal("57P03", "the database system is shutting down")
        if not self.server.admit(self):
            raise Fatal("53300", "sorry, too many clients already")
        await self._authenticate(user)
        params = {k: v for k, v in msg.parameters if k not in ("user", "database")}
        enc = params.pop("client_encoding", "UTF8")
        if enc.strip("'\" ").replace("-", "").replace("_", "").lower() not in ("utf8", "unicode"):
            raise Fatal("0A000", f"client_encoding {enc!r} is not supported: the proxy speaks UTF8")
        cfg = self.rt.config.current
        name = msg.get("database")
        db = cfg.resolve_database(name)
        if db is None:
            raise Fatal("3D000", f'database "{name}" does not exist')
        self.database = db
        self.pool = self.server.pool_for(db)
        assert self.identity is not None
        self.settings = ClientSettings(user, params, cfg.databases[db].statement_timeout_ms)
        sp = params.get("search_path")
        if sp:
            self.search_path = tuple(p.strip().strip('"') for p in sp.split(",") if p.strip())
        shape = tuple(sorted((k, v) for k, v in self.settings.startup.items() if k != "application_name"))
        known = self.pool.reported.get(shape)
        app = params.get("application_name", "sqlproxy")
        if known is None or self.pinned or not (app.isascii() and app.isprintable() and len(app) < 64):
            be = await self._acquire()
            ready: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            assert be.pump is not None
            if be.pump.pending:
                be.pump.expect(Exp(HIDDEN, lambda _e: _resolve(ready)))
                be.write(b"Q\x00\x00\x00\x0dSELECT 1\x00")
                await ready
            reported = dict(be.parameters)
            self.pool.reported[shape] = {k: v for k, v in reported.items() if k != "application_name"}
        else:
            reported = dict(known)
            # What the server reports after the setup query: the client's name, else the
            # proxy's own connection name that RESET ALL returns to.
            reported["application_name"] = app
        out = [AuthenticationOk().encode()]
        reported["client_encoding"] = "UTF8"
        for k, v in reported.items():
            if k not in _UNREPORTED_PARAMS:
                out.append(ParameterStatus(k, v).encode())
        out.append(ParameterStatus("is_superuser", "off").encode())
        out.append(ParameterStatus("session_authorization", user).encode())
        self.key = self.server.register(self)
        out.append(BackendKeyData(*self.key).encode())
        out.append(_READY["I"])
        self._write(b"".join(out))
        self.client_transport = self.transport
        if not self.pinned and self.be is not None:
            self._release()
        return True

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, ctx, server_side=True)
        except OSError as e:  # ssl.SSLError, ConnectionResetError: the client's failure
            log.info("TLS handshake with %s failed: %s", self.source_ip, e)
            raise ClientGone from None
        if new is None:
            raise ClientGone
        self.transport = new
        self.tls = True

    async def _authenticate(self, user: str) -> None:
        users = self.rt.users
        addr = parse_source_ip(self.source_ip)
        src_key = _source_lock_key(addr, self.source_ip)
        user_key = _user_lock_key(user)
        lock = users.lockout
        stored = users.password_verifier(user)
        method = users.wire_auth(user)
        cn = self._certificate_cn()
        cert_ok = method == "password" or (cn is not None and cn == user)
        refused = (
            (stored is None and method != "cert")
            or not cert_ok
            or users.is_disabled(user)
            or not users.source_allowed(user, self.source_ip)
            or lock.locked(src_key)
            or lock.locked(user_key)
        )
        ok = False
        try:
            if method == "cert" and not refused:
                ok = True  # the certificate is the credential: no password is asked
            # A refused certificate user goes through the password exchange of an unknown user
            # (it has no password) and fails it: a client cannot tell a certificate user from
            # a password user, nor a missing certificate from a wrong password.
            elif self.cfg.allow_md5 and (stored is None or is_md5_hash(stored)):
                ok = await self._auth_md5(user, None if refused else stored)
            elif self.cfg.allow_cleartext_over_tls and self.tls:
                ok = await self._auth_cleartext(user, None if refused else stored)
            else:
                ok = await self._auth_scram(user, None if refused else stored)
        except AuthenticationFailed:
            ok = False
        if not ok:
            lock.record_failure(src_key)
            if user in users:
                lock.record_failure(user_key)
            req = Request(door="wire", sql=None, source_ip=self.source_ip, source_port=self.source_port)
            req.error = Unauthenticated("password authentication failed", sqlstate="28P01")
            req.extra["user_presented"] = user[:64]
            if method != "password":
                # For the operator: why a certificate user was refused.
                req.extra["wire_auth"] = method
                if cn is not None:
                    req.extra["client_cert_cn"] = cn[:64]
            await asyncio.shield(self.rt.audit_request(req))
            raise Fatal("28P01", f'password authentication failed for user "{user}"')
        lock.reset(user_key)
        self.identity = users.identity(user)
        self._users = users

    def _certificate_cn(self) -> str | None:
        """The common name of the client's certificate, verified during the TLS handshake
        against [wire] client_ca_file (the only CAs the listener trusts for it). None without
        TLS, without a certificate, or when the subject has no CN or more than one."""
        if not self.tls or self.transport is None:
            return None
        tls = self.transport.get_extra_info("ssl_object")
        if tls is None:
            return None
        cert = tls.getpeercert()  # {} unless a certificate was received and verified
        if not cert:
            return None
        cns = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        return cns[0] if len(cns) == 1 else None

    async def _auth_msg(self, kind: str) -> object:
        self.dec.expect_auth_response(kind)  # type: ignore[arg-type]
        return await self._next_startup()

    async def _auth_scram(self, user: str, stored: str | None) -> bool:
        srv = ScramServer(stored, username=user, mock_secret=self.server.mock_secret)
        self._write(AuthenticationSASL(srv.mechanisms).encode())
        first = await self._auth_msg("sasl_initial")
        if not isinstance(first, SASLInitialResponse):
            raise ProtocolViolation("expected SASLInitialResponse")
        server_first = srv.process_client_first(first.mechanism, first.data)
        self._write(AuthenticationSASLContinue(server_first).encode())
        final = await self._auth_msg("sasl")
        if not isinstance(final, SASLResponse):
            raise ProtocolViolation("expected SASLResponse")
        self._write(AuthenticationSASLFinal(srv.process_client_final(final.data)).encode())
        return True

    async def _auth_md5(self, user: str, stored: str | None) -> bool:
        salt = secrets.token_bytes(4)
        self._write(AuthenticationMD5Password(salt).encode())
        msg = await self._auth_msg("password")
        if not isinstance(msg, PasswordMessage):
            raise ProtocolViolation("expected PasswordMessage")
        return md5_verify(stored, salt, msg.password)

    async def _auth_cleartext(self, user: str, stored: str | None) -> bool:
        self._write(AuthenticationCleartextPassword().encode())
        msg = await self._auth_msg("password")
        if not isinstance(msg, PasswordMessage):
            raise ProtocolViolation("expected PasswordMessage")
        if stored is None:
            ScramVerifier.from_password(msg.password)  # the same work as a real check
            return False
        if is_md5_hash(stored):
            return hmac.compare_digest(stored, md5_password_hash(user, msg.password))
        return ScramVerifier.parse(stored).verify_password(msg.password)

    # -- server connections ------------------------------------------------------------------
    async def _acquire(self) -> BackendConnection:
        assert self.pool is not None
        return self._attach(await self.pool.acquire())

    def _acquire_idle(self) -> BackendConnection | None:
        """A server connection without waiting, when the pool has an idle one."""
        assert self.pool is not None
        be = self.pool.take_idle()
        return None if be is None else self._attach(be)

    def _attach(self, be: BackendConnection) -> BackendConnection:
        assert self.settings is not None
        pump = be.pump
        assert pump is not None
        pump.owner = self
        be.attach_client(self.transport)
        self.be = be
        if be.settings_key != self.settings.key:
            pump.expect(Exp(HIDDEN, None))
            be.write(self.settings.setup_query())
            be.settings_key = self.settings.key
        return be

    def _release(self) -> None:
        be, self.be = self.be, None
        if be is not None and self.pool is not None:
            self.pool.release(be)

    # PumpOwner callbacks (called from the server connection's data_received).
    def backend_ready(self, status: str) -> None:
        self.status = status
        if self._copy_relay or self._ignore_input:
            self.wake()  # the server ended a COPY FROM STDIN: stop relaying the client's data
        # Only while the session waits for its client: in the middle of a message (a Parse
        # being decided, say) the session still holds and uses this connection.
        if self._reading:
            self._release_if_idle()

    def _release_if_idle(self) -> None:
        be = self.be
        if (
            be is None
            or self.pinned
            or self.simple_active
            or self.status != "I"
            or self._out
            or self.discard
            or (be.pump is not None and be.pump.pending)
        ):
            return
        if self._batch_open:
            if self._batch_portal:
                return  # a portal lives in the server's transaction until the client's Sync
            # The client parsed or described and now waits without a Sync (asyncpg's prepare
            # ends in Flush). Nothing it did depends on this connection any more: end the
            # server's side with a Sync of our own and give the connection back. The client's
            # Sync, when it comes, is answered by the proxy.
            self._batch_open = False
            assert be.pump is not None
            be.pump.expect(Exp(HIDDEN, lambda _e: self._release_if_idle()))
            be.write(_SYNC_MSG)
            return
        self._release()

    def backend_lost(self) -> None:
        be = self.be
        if be is not None:
            self.be = None
            if self.pool is not None:
                self.pool.discard(be)  # the pool counts the connection until told: free its slot
            if self.transport is not None and not self.transport.is_closing():
                if be.pump is None or not be.pump.fatal_forwarded:
                    self._write(fatal_response("08006", "server connection lost"))
                self.transport.close()

    def statement_failed(self, exp: Exp) -> None:
        be = self.be
        if be is not None and exp.server_name is not None:
            be.prepared.discard(exp.server_name)
        name = exp.client_name
        if name is not None:
            if name == b"":
                self.unnamed = None
                if be is not None:
                    be.unnamed_owner = None
            else:
                self.stmts.pop(name, None)

    def execute_done(self, req: Request) -> None:
        a = req.analysis
        if a is not None and a.statements:
            st = a.statements[0]
            if st.deallocates == "*":
                self._forget_prepared()
            if st.kind is _CURSOR or st.kind is _DISCARD:
                self._note_cursors(a)
        self._audits.append(req)
        if self._reading:
            try:
                queued = self._queue_audits_now()
            except Exception:
                queued = False  # met again by the session's own flush, in its task
            if not queued:
                # The audit queue is full: the session waits on it (holding back this client).
                self.wake()

    def _queue_audits_now(self) -> bool:
        """Queue the records of finished Executes without waiting; False when the audit queue
        is full. Called as each Execute completes while the session waits for its client, who
        may stay silent for hours: the record must not wait for the client's next message
        (it would be sealed late, after later statements' records, and lost with the process)."""
        rt = self.rt
        audits = self._audits
        while audits:
            req = audits[0]
            if not rt.audit_queue.try_enqueue(rt.audit_record(req)):
                return False
            audits.popleft()
            rt.metrics.observe_request(req)
        return True

    async def _flush_audits(self) -> None:
        """Queue the audit records the Executes left. No await unless the audit queue is full;
        a record taken off the list is queued even if the session is cancelled meanwhile, and
        what is still on the list is flushed by the cleanup."""
        rt = self.rt
        audits = self._audits
        while audits:
            req = audits.popleft()
            record = rt.audit_record(req)
            rt.metrics.observe_request(req)
            if not rt.audit_queue.try_enqueue(record):
                await asyncio.shield(rt.audit_queue.enqueue(record))

    # -- the message loop ---------------------------------------------------------------------
    async def _serve(self) -> None:
        dec = self.dec
        while True:
            if self._copy_ext is not None:
                await self._relay_extended_copy(self._copy_ext)
                continue
            raw = dec.next_raw()
            if raw is None:
                if self._audits:
                    self._flush()
                    await self._flush_audits()
                    continue
                await self._more()
                continue
            t, payload = raw
            if t == _Q:
                self._flush()
                await self._query(payload)
            elif t in _EXTENDED:
                more = self._extended(t, payload)
                if more is not None:
                    await more
            elif t == _X:
                return
            elif t == _F:
                self._flush()
                self._refuse_now(ProxyError("function call messages are not supported", sqlstate="0A000"))
            # CopyData/CopyDone/CopyFail outside COPY: ignored, as the server does.

    # -- simple query ------------------------------------------------------------------------
    async def _query(self, payload: bytes) -> None:
        if not payload or payload[-1] != 0:
            raise ProtocolViolation("invalid Query message: missing terminator")
        try:
            sql = payload[:-1].decode("utf-8")
        except UnicodeDecodeError:
            self._refuse_now(ProxyError('invalid byte sequence for encoding "UTF8"', sqlstate="22021"))
            return
        if not sql.strip():
            self._reply(_EMPTY_QUERY + _READY[self.status])
            return
        req = self._request(sql, self.search_path)
        req.executor = self._execute_simple
        if self.cursors:
            req.cursors = self.cursors
        self.simple_active = True
        try:
            await self.rt.handle(req)
        except ForwardedError:
            pass
        except ProxyError as e:
            self._refuse_now(e)
        finally:
            self.simple_active = False
        if req.error is None and req.analysis is not None:
            self._track(req)
        if self.be is not None and not self.pinned and self.status == "I" and not self.be.busy:
            self._release()

    def _track(self, req: Request) -> None:
        """Carry session state the statements changed: search_path for analysis, SETs for the
        next server connection, pinning when state cannot be carried."""
        a = req.analysis
        assert a is not None and self.settings is not None
        kinds = a.kinds
        if (_DEALLOCATE in kinds or _DISCARD in kinds) and any(st.deallocates == "*" for st in a.statements):
            self._forget_prepared()
        if _CURSOR in kinds or _DISCARD in kinds:
            self._note_cursors(a)
        pin, stateful = _session_effects(a)
        if pin:
            self.pinned = True
        be = self.be
        if not stateful:
            if be is not None:
                be.settings_key = self.settings.key
            return
        in_tx = self.status != "I"
        exact = True
        for i, st in enumerate(a.statements):
            if st.search_path is not None:
                self.search_path = st.search_path
            if st.kind is StatementKind.SET and i < len(req.statements):
                exact = self.settings.record(req.statements[i], in_tx) and exact
            elif st.kind is StatementKind.DISCARD:
                exact = False
        if not in_tx and req.results and any(r.command in ("COMMIT", "ROLLBACK") for r in req.results):
            exact = self.settings.end_transaction(req.results[-1].command == "COMMIT") and exact
        if be is not None:
            be.settings_key = self.settings.key if exact else None

    async def _execute_simple(self, req: Request) -> None:
        if self._deallocate_here(req):
            return
        be = self.be or self._acquire_idle() or await self._acquire()
        pump = be.pump
        assert pump is not None
        call = SimpleCall(req.results, asyncio.get_running_loop())
        pump.expect(Exp(SIMPLE, call))
        sql = req.sql if not req.rewritten else ";\n".join(req.statements)
        assert sql is not None
        body = sql.encode("utf-8")
        be.write(b"Q" + _U32.pack(len(body) + 5) + body + b"\0")
        try:
            while True:
                await call.event
                if call.finished:
                    break
                call.event = asyncio.get_running_loop().create_future()
                if call.copy_in:
                    call.copy_in = False
                    stats = call.copies[-1]
                    # The server may end the COPY on its own (a constraint violation midway):
                    # then the relay stops, and the client's remaining data is ignored as the
                    # server itself would ignore it.
                    await self._relay_copy_in(be, stats, _copy_over(call, stats))
                    if call.finished:
                        break
        finally:
            if call.copies:
                self._audit_copies(req, call)
        self.status = call.status
        if call.error is not None:
            raise ForwardedError(call.error.message, sqlstate=call.error.sqlstate)

    def _deallocate_here(self, req: Request) -> bool:
        """``DEALLOCATE name`` of a statement the client prepared with a Parse message (PHP's
        PDO deallocates its statements so): the server knows the statement under the proxy's
        own name, so the proxy forgets it and answers, as PostgreSQL would. Anything else, and
        any DEALLOCATE in a failed transaction (refused by the server), goes to the server."""
        a = req.analysis
        if a is None or len(a.statements) != 1 or self.status == "E":
            return False
        name = a.statements[0].deallocates
        if name is None or name == "*" or self.stmts.pop(name.encode("utf-8"), None) is None:
            return False
        req.results.append(StatementResult(command="DEALLOCATE", row_count=0))
        self._reply(_DEALLOCATE_DONE + _READY[self.status])
        return True

    def _note_cursors(self, a: Analysis) -> None:
        """Keep the lineage of each cursor the statements declared, so a later FETCH's record
        is classified as the cursor's query's would be; forget closed ones."""
        cursors = self.cursors
        for st in a.statements:
            op = st.cursor_op
            if op == "declare" and st.cursor is not None:
                if len(cursors) >= _MAX_CURSORS:
                    cursors.clear()  # a client that never closes its cursors: forget the oldest lot
                cursors[st.cursor] = st.outputs
            elif op == "close":
                if st.cursor == "*":
                    cursors.clear()
                else:
                    cursors.pop(st.cursor or "", None)
            elif st.kind is _DISCARD and st.deallocates == "*":
                cursors.clear()  # DISCARD ALL closes every cursor

    def _forget_prepared(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL ran on the server connection: the client's named
        statements are gone, as on PostgreSQL, and so is every statement the proxy prepared
        there under its shared names; they are prepared again where next needed."""
        self.stmts.clear()
        be = self.be
        if be is not None:
            be.prepared.clear()
            be.unnamed_owner = None

    @staticmethod
    def _audit_copies(req: Request, call: SimpleCall) -> None:
        infos = [st.copy for st in req.analysis.statements] if req.analysis is not None else []
        copies = [c for c in infos if c is not None and c.target == "stdio"]
        records = [cs.record(copies[i] if i < len(copies) else None) for i, cs in enumerate(call.copies)]
        req.extra["copy"] = records[0] if len(records) == 1 else records

    async def _relay_copy_in(self, be: BackendConnection, stats: CopyStats, done: Callable[[], bool]) -> None:
        """COPY FROM STDIN: pass the client's data through until CopyDone or CopyFail, or
        until the server ends the COPY itself (``done``). The server ignores Sync and Flush in
        copy-in mode; they are passed on as they come."""
        dec = self.dec
        self._copy_relay = True
        try:
            while not done():
                frame = dec.next_frame()
                if frame is None:
                    await self._more()
                    continue
                t, f = frame
                if t == _COPY_DATA:
                    be.write(f)
                    stats.bytes += len(f) - 5
                    continue
                if t == _COPY_DONE:
                    be.write(f)
                    return
                if t == _COPY_FAIL:
                    be.write(f)
                    stats.client_fail = f[5:-1].decode("utf-8", "replace")
                    return
                if t in (_S, _H):
                    be.write(f)
                    continue
                # As PostgreSQL: the message is dropped, the COPY fails with an ERROR and the
                # session goes on (the client's later CopyData is ignored). The server is told
                # by a CopyFail naming the message; its ErrorResponse reaches the client.
                reason = f"unexpected message type 0x{t:02X} during COPY from stdin"
                stats.client_fail = reason
                body = reason.encode() + b"\0"
                be.write(b"f" + _U32.pack(len(body) + 4) + body)
                return
        finally:
            self._copy_relay = False

    async def _relay_extended_copy(self, stats: CopyStats) -> None:
        """COPY FROM STDIN started by an Execute: relay the client's data until it ends."""
        be = self.be
        if be is not None:
            self._flush()
            await self._relay_copy_in(be, stats, lambda: self._copy_ext is not stats)
        if self._copy_ext is stats:
            self._copy_ext = None

    # PumpOwner callbacks for COPY FROM STDIN in the extended protocol.
    def copy_in_started(self, stats: CopyStats) -> None:
        self._copy_ext = stats
        self.wake()

    def copy_in_ended(self) -> None:
        if self._copy_ext is not None:
            self._copy_ext = None
            self.wake()

    def _reply(self, data: bytes) -> None:
        be = self.be
        if be is not None and be.pump is not None:
            be.pump.synth(data)
        else:
            self._write(data)

    def _refuse_now(self, e: ProxyError) -> None:
        """ErrorResponse for a simple-protocol request the proxy refused, then ReadyForQuery
        with the status the server would report (a refusal inside a transaction fails it)."""
        err = error_response(e.sqlstate, e.message, position=e.position)
        be = self.be
        if be is not None and be.pump is not None and self.status != "I":
            be.pump.synth(err)
            be.pump.expect(Exp(FAIL_SIMPLE))
            be.write(_FAIL_QUERY)
            self.status = "E"
        else:
            self._reply(err + _READY[self.status])

    # -- extended protocol --------------------------------------------------------------------
    def _extended(self, t: int, payload: bytes) -> Coroutine[object, object, None] | None:
        """Handle one extended-protocol message. Most need no await (a cached Parse, Bind,
        Execute, Sync, ...): those are done here, synchronously; when one needs to wait (a
        server connection, deciding a new statement, asking the cluster for rate-limit budget)
        the rest is returned as a coroutine for the caller to await."""
        if self.discard:
            if t == _S:
                self.discard = False
                if self.be is not None:
                    self._sync()
                else:
                    self._write(_READY[self.status])
            return None
        be = self.be
        if be is None:
            if t == _S:
                self._write(_READY[self.status])
                return None
            if t == _H:
                return None
            be = self._acquire_idle()
            if be is None:
                return self._extended_after_acquire(t, payload)
        return self._extended_on(be, t, payload)

    async def _extended_after_acquire(self, t: int, payload: bytes) -> None:
        be = await self._acquire()
        more = self._extended_on(be, t, payload)
        if more is not None:
            await more

    def _extended_on(
        self, be: BackendConnection, t: int, payload: bytes
    ) -> Coroutine[object, object, None] | None:
        pump = be.pump
        assert pump is not None
        if pump.skipping and t != _S:
            return None  # the server skips to Sync after its error, and so do we
        if t == _S:
            self._batch_open = self._batch_portal = False
        else:
            self._batch_open = True
            if t in (_B, _E) or (t == _D and payload[:1] == b"P"):
                self._batch_portal = True
        if t == _P:
            return self._parse(be, payload)
        if t == _B:
            return self._bind(be, payload)
        if t == _E:
            if self.rt.rate_limiter.active:
                rejection = self._admit_execute(payload)
                if rejection is not None:
                    return self._execute_after_rejection(be, payload, *rejection)
            self._execute(be, payload)
        elif t == _S:
            self._sync()
        elif t == _D:
            self._describe(be, payload)
        elif t == _C:
            self._close(be, payload)
        elif t == _H:
            self._send(b"H\x00\x00\x00\x04")
            self._flush()
        return None

    def _sync(self) -> None:
        be = self.be
        assert be is not None and be.pump is not None
        be.pump.expect(Exp(SYNC))
        self._send(b"S\x00\x00\x00\x04")

    def _fail_batch(self, e: ProxyError, *, routine: str | None = None) -> None:
        err = error_response(e.sqlstate, e.message, position=e.position, routine=routine)
        be = self.be
        self.discard = True
        if be is None or be.pump is None:
            self._write(err)
            return
        be.pump.expect(Exp(SYNTH, err))
        # Fail the server's side of the batch too, so its implicit transaction rolls back
        # (or its transaction block is marked failed) just as on a real error.
        be.pump.expect(Exp(FAIL_PARSE, client_name=b""))
        self._send(_FAIL_PARSE_MSG)

    def _cached(self, sql_b: bytes, types: bytes, path: tuple[str, ...] | None) -> Prepared | None:
        """The session's decision for this statement text, if it made one under the current
        policy and catalog snapshot."""
        up = self.rt.upstreams.get(self.database or "")
        token = (self.rt.policy, up.catalog if up is not None else None)
        if token != self._cache_token:
            self._cache.clear()
            self._cache_token = token
        return self._cache.get((sql_b, types, path))

    async def _lookup(self, sql_b: bytes, types: bytes, path: tuple[str, ...] | None) -> Prepared:
        p = self._cached(sql_b, types, path)
        if p is not None:
            return p
        key = (sql_b, types, path)
        self._flush()
        try:
            sql = sql_b.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyError('invalid byte sequence for encoding "UTF8"', sqlstate="22021") from None
        req = self._request(sql, path)
        req.extra["protocol"] = "parse"
        try:
            p = await self.server.decider.decide(req, types)
        except ProxyError:
            await asyncio.shield(self.rt.audit_request(req))
            raise
        if len(self._cache) > 5000:
            self._cache.clear()
        self._cache[key] = p
        return p

    def _parse(self, be: BackendConnection, payload: bytes) -> Coroutine[object, object, None] | None:
        i = _nul(payload)
        j = _nul(payload, i + 1)
        name = payload[:i]
        sql_b, types = payload[i + 1 : j], payload[j + 1 :]
        p = self._cached(sql_b, types, self.search_path)
        if p is None:
            return self._parse_new(be, name, sql_b, types)
        self._parse_as(be, name, p)
        return None

    async def _parse_new(self, be: BackendConnection, name: bytes, sql_b: bytes, types: bytes) -> None:
        try:
            p = await self._lookup(sql_b, types, self.search_path)
        except ProxyError as e:
            self._fail_batch(e)
            return
        self._parse_as(self.be or be, name, p)

    def _parse_as(self, be: BackendConnection, name: bytes, p: Prepared) -> None:
        pump = be.pump
        assert pump is not None
        if name:
            if name in self.stmts:
                self._fail_batch(
                    ProxyError(
                        f'prepared statement "{name.decode("utf-8", "replace")}" already exists',
                        sqlstate="42P05",
                    )
                )
                return
            self.stmts[name] = p
            if p.server_name in be.prepared:
                if pump.pending:
                    pump.expect(Exp(SYNTH, _PARSE_COMPLETE, client_name=name))
                else:
                    self._write(_PARSE_COMPLETE)
                return
            be.prepared.add(p.server_name)
            pump.expect(Exp(PARSE, client_name=name, server_name=p.server_name))
            self._send(self._parse_msg(p.server_name.encode(), p))
        else:
            self.unnamed = p
            be.unnamed_owner = p
            pump.expect(Exp(PARSE, client_name=b""))
            self._send(self._parse_msg(b"", p))

    @staticmethod
    def _parse_msg(name: bytes, p: Prepared) -> bytes:
        if not name and p.unnamed_parse:
            return p.unnamed_parse  # pgbench -M extended re-parses the unnamed one every time
        body = name + b"\0" + p.upstream_sql + b"\0" + p.types
        msg = b"P" + _U32.pack(len(body) + 4) + body
        if not name:
            p.unnamed_parse = msg
        return msg

    def _ensure(self, be: BackendConnection, p: Prepared, named: bool) -> bytes:
        """Make sure the server connection holds the statement; returns its server name."""
        pump = be.pump
        assert pump is not None
        if named:
            sname = p.server_name
            if sname not in be.prepared:
                be.prepared.add(sname)
                pump.expect(Exp(PARSE_HIDDEN, server_name=sname))
                self._send(self._parse_msg(sname.encode(), p))
            return sname.encode()
        if be.unnamed_owner is not p:
            be.unnamed_owner = p
            pump.expect(Exp(PARSE_HIDDEN))
            self._send(self._parse_msg(b"", p))
        return b""

    def _statement(self, name: bytes) -> Prepared | None:
        p = self.stmts.get(name) if name else self.unnamed
        if p is None:
            self._fail_batch(
                ProxyError(
                    f'prepared statement "{name.decode("utf-8", "replace")}" does not exist'
                    if name
                    else "unnamed prepared statement does not exist",
                    sqlstate="26000",
                )
            )
        return p

    def _bind(self, be: BackendConnection, payload: bytes) -> Coroutine[object, object, None] | None:
        i = _nul(payload)
        j = _nul(payload, i + 1)
        sname = payload[i + 1 : j]
        p = self._statement(sname)
        if p is None:
            return None
        if p.policy is not self.rt.policy and p.analysis is not None:
            return self._bind_redecided(be, payload, sname, p)
        server = self._ensure(be, p, bool(sname))
        body = payload[: i + 1] + server + payload[j:]
        be.pump.expect(Exp(BIND))  # type: ignore[union-attr]
        self._send(b"B" + _U32.pack(len(body) + 4) + body)
        self.portals[payload[:i]] = p
        return None

    async def _bind_redecided(
        self, be: BackendConnection, payload: bytes, sname: bytes, old: Prepared
    ) -> None:
        """The policy was reloaded since this statement was decided: decide it again before it
        runs (a revoked table is refused, a new mask or row filter applies; a changed rewrite
        is prepared on the server under its own name), as if the client had prepared it anew."""
        try:
            p = await self._lookup(old.sql.encode("utf-8"), old.types, old.search_path)
        except ProxyError as e:
            self._fail_batch(e)
            return
        if sname:
            if self.stmts.get(sname) is old:
                self.stmts[sname] = p
            if self._result_type_may_change(old, p):
                # As PostgreSQL answers when a prepared statement's result type changed under
                # it: a client that keeps the statement's row description (asyncpg, JDBC)
                # prepares it again; the statement in place is already the new one.
                self._fail_batch(
                    ProxyError("cached plan must not change result type", sqlstate="0A000"),
                    routine="RevalidateCachedQuery",  # PostgreSQL's, by which asyncpg knows it
                )
                return
        elif self.unnamed is old:
            self.unnamed = p
        more = self._bind(self.be or be, payload)
        if more is not None:
            await more

    def _result_type_may_change(self, old: Prepared, new: Prepared) -> bool:
        """Masks are text: a mask added to or lifted from a column of another type changes the
        statement's result type."""
        if old.decision is None or new.decision is None or old.decision.masks == new.decision.masks:
            return False
        up = self.rt.upstreams.get(self.database or "")
        catalog = up.catalog if up is not None else None
        changed = set(old.decision.masks.items()) ^ set(new.decision.masks.items())
        for src, _kind in changed:
            rel = catalog.lookup(src.table.schema, src.table.name) if catalog is not None else None
            col = next((c for c in rel.columns if c.name == src.column), None) if rel is not None else None
            if col is None or col.type != "text":
                return True
        return False

    def _describe(self, be: BackendConnection, payload: bytes) -> None:
        pump = be.pump
        assert pump is not None
        if payload[:1] == b"S":
            name = payload[1:-1]
            p = self._statement(name)
            if p is None:
                return
            server = self._ensure(be, p, bool(name))
            pump.expect(Exp(DESCRIBE_S))
            self._send(b"D" + _U32.pack(len(server) + 6) + b"S" + server + b"\0")
        else:
            pump.expect(Exp(DESCRIBE_P))
            self._send(_frame(b"D", payload))

    def _admit_execute(self, payload: bytes) -> tuple[Prepared, Coroutine[Any, Any, None]] | None:
        """Each Execute spends a rate-limit token, as a simple Query does (the statement was
        decided once, at Parse). None when admitted by the local tier, else the statement and
        the limiter's slow path to await (``_execute_after_rejection``)."""
        p = self.portals.get(payload[: _nul(payload)])
        ident = self.identity
        if p is None or p.analysis is None or ident is None:
            return None  # nothing runs (an empty statement, or the server reports the error)
        pending = self.rt.rate_limiter.admit(ident.name, ident.roles, self.database)
        return None if pending is None else (p, pending)

    async def _execute_after_rejection(
        self, be: BackendConnection, payload: bytes, p: Prepared, pending: Coroutine[Any, Any, None]
    ) -> None:
        """The local tier refused: the cluster may still lend budget. A refusal fails the
        batch up to Sync and is audited."""
        try:
            await pending
        except RateLimited as e:
            req = self._execute_request(p)
            req.error = e
            self._audits.append(req)
            self._fail_batch(e)
            return
        self._execute(self.be or be, payload)

    def _execute_request(self, p: Prepared) -> Request:
        req = self._request(p.sql, p.search_path)
        req.analysis = p.analysis
        req.decision = p.decision
        req.statements = p.statements
        req.rewritten = p.rewritten
        req.classifications = p.classifications
        if p.fetch_cursor is not None:
            outputs = self.cursors.get(p.fetch_cursor)
            if outputs:
                req.classifications = [self.rt.classifier.classify(outputs)]
        req.extra["protocol"] = "extended"
        return req

    def _execute(self, be: BackendConnection, payload: bytes) -> None:
        pump = be.pump
        assert pump is not None
        portal = payload[: _nul(payload)]
        p = self.portals.get(portal)
        req: Request | None = None
        if p is not None and p.analysis is not None:
            req = self._execute_request(p)
            if p.pin:
                self.pinned = True
            if p.sets:
                be.settings_key = None
                if self.settings is not None and p.statements:
                    self.settings.record(p.statements[0], self.status != "I")
        pump.expect(Exp(EXECUTE, req=req))
        self._send(_frame(b"E", payload))

    def _close(self, be: BackendConnection, payload: bytes) -> None:
        pump = be.pump
        assert pump is not None
        name = payload[1:-1]
        if payload[:1] == b"S":
            # Server statements are shared; only the client's name goes away.
            if name:
                self.stmts.pop(name, None)
            else:
                self.unnamed = None
            pump.synth(_CLOSE_COMPLETE)
        else:
            self.portals.pop(name, None)
            pump.expect(Exp(CLOSE))
            self._send(_frame(b"C", payload))

    async def cancel_if(self, secret: bytes) -> None:
        if not hmac.compare_digest(secret, self.key[1]):
            return
        be = self.be
        if be is not None and be.pump is not None and be.pump.pending and self.pool is not None:
            await self.server.cancel_backend(self.pool.target, be.pid, be.secret)
