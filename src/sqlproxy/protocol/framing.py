"""Sans-IO framing: bytes in, messages (or raw frames) out. No sockets, no asyncio.

``FrontendDecoder`` reads what a *client* sends (the proxy's listening side);
``BackendDecoder`` reads what a *server* sends (the proxy's upstream side).

Usage::

    dec = FrontendDecoder()
    dec.feed(data)                      # as bytes arrive, any split
    while (msg := dec.next()) is not None:
        ...

Hot path: ``next_raw()`` gives ``(type, payload)`` and ``next_frame()`` gives
``(type, whole_frame)`` without building message objects, and ``take_frames_until(stop)``
returns every complete frame up to the first one whose type is in ``stop`` as one ``bytes``,
so DataRow floods can be forwarded with one header check per message and one copy per batch.

Lengths are checked on the 5-byte header, before any payload is buffered: a peer declaring a
2 GB message is refused at once instead of being allowed to fill memory. After a
:class:`ProtocolViolation` the decoder is poisoned and re-raises it on every call.
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterator
from typing import Final, Literal

from sqlproxy.protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    PROGRAM_LIMIT_EXCEEDED,
    LocalProtocolError,
    ProtocolViolation,
)
from sqlproxy.protocol.messages import (
    BACKEND_TYPES,
    FRONTEND_TYPES,
    AuthResponse,
    AuthResponseKind,
    BackendMessage,
    BackendType,
    CancelRequest,
    FrontendMessage,
    FrontendType,
    GSSENCRequest,
    GSSENCResponse,
    SSLRequest,
    SSLResponse,
    StartupMessage,
    _type_repr,
    decode_backend,
    decode_frontend,
    decode_startup,
)

__all__ = [
    "AUTH_MESSAGE_LIMIT",
    "HARD_MESSAGE_LIMIT",
    "MAX_STARTUP_PACKET_LENGTH",
    "SMALL_MESSAGE_LIMIT",
    "BackendDecoder",
    "FrontendDecoder",
    "is_tls_client_hello",
]

# PostgreSQL's own limits (src/include/libpq/libpq.h, src/include/libpq/pqcomm.h); every length
# here includes the 4-byte length word itself, as on the wire.
HARD_MESSAGE_LIMIT: Final = 1 << 30  # MaxAllocSize: no legal message can be larger
SMALL_MESSAGE_LIMIT: Final = 10000  # PQ_SMALL_MESSAGE_LIMIT: Sync, Describe, Close, ...
AUTH_MESSAGE_LIMIT: Final = 65535  # PG_MAX_AUTH_TOKEN_LENGTH
MAX_STARTUP_PACKET_LENGTH: Final = 10000

_U32 = struct.Struct("!I")

# Frontend messages that are small by nature: a huge declared length is an attack or garbage,
# so these are capped the way the server caps them instead of at the general limit.
_FRONTEND_SMALL = (
    FrontendType.SYNC,
    FrontendType.FLUSH,
    FrontendType.TERMINATE,
    FrontendType.DESCRIBE,
    FrontendType.CLOSE,
    FrontendType.EXECUTE,
    FrontendType.COPY_DONE,
    FrontendType.COPY_FAIL,
)
_BACKEND_SMALL = (
    BackendType.READY_FOR_QUERY,
    BackendType.PARSE_COMPLETE,
    BackendType.BIND_COMPLETE,
    BackendType.CLOSE_COMPLETE,
    BackendType.NO_DATA,
    BackendType.PORTAL_SUSPENDED,
    BackendType.EMPTY_QUERY_RESPONSE,
    BackendType.COPY_DONE,
    BackendType.BACKEND_KEY_DATA,
)


def is_tls_client_hello(prefix: bytes) -> bool:
    """True if a new connection starts with a TLS handshake record (PostgreSQL 17's
    ``sslnegotiation=direct``) instead of a startup packet. Peek the first 3 bytes with it
    before feeding a :class:`FrontendDecoder`, which would otherwise reject the bytes."""
    return len(prefix) >= 3 and prefix[0] == 0x16 and prefix[1] == 0x03 and prefix[2] <= 0x04


class _Framer:
    """A bytearray buffer with a read offset; compacted on feed, never per message."""

    __slots__ = ("_blocked", "_buf", "_eof", "_error", "_limits", "_pos", "max_message_length", "taken")

    _SMALL: tuple[int, ...] = ()
    _KNOWN: frozenset[int] = frozenset()
    _AUTH: int = -1

    def __init__(self, max_message_length: int = HARD_MESSAGE_LIMIT) -> None:
        if not 5 <= max_message_length <= HARD_MESSAGE_LIMIT:
            raise LocalProtocolError(f"max_message_length must be between 5 and {HARD_MESSAGE_LIMIT}")
        self.max_message_length = max_message_length
        self._buf = bytearray()
        self._pos = 0
        self.taken = 0
        self._error: ProtocolViolation | None = None
        self._eof = False
        # One flag for every slow-path condition (poisoned, untyped exchange pending, finished),
        # so the raw hot path tests a single attribute.
        self._blocked = False
        # One list lookup per header gives both "known type?" (limit 0 = unknown) and its cap.
        limits = [0] * 256
        for t in self._KNOWN:
            limits[t] = max_message_length
        for t in self._SMALL:
            limits[t] = min(SMALL_MESSAGE_LIMIT, max_message_length)
        if self._AUTH >= 0:
            limits[self._AUTH] = min(AUTH_MESSAGE_LIMIT, max_message_length)
        self._limits = limits

    # -- input ----------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes. Any split is fine: partial headers, many messages, one byte."""
        if self._eof:
            raise LocalProtocolError("feed() after feed_eof()")
        if self._pos:
            # Deleting a prefix of a bytearray just moves its start pointer in CPython, so
            # compacting here costs O(1) and keeps the buffer from growing without bound.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def feed_eof(self) -> None:
        """The peer closed. A partial message left in the buffer then becomes a violation."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    # -- errors ---------------------------------------------------------------------------

    def _fail(self, exc: ProtocolViolation) -> ProtocolViolation:
        self._error = exc
        self._blocked = True
        return exc

    def _check_eof(self) -> None:
        if self._eof and len(self._buf) > self._pos:
            raise self._fail(ProtocolViolation("connection closed in the middle of a message"))

    def _bad_header(self, t: int, n: int) -> ProtocolViolation:
        limit = self._limits[t]
        if limit == 0:
            return self._fail(ProtocolViolation(f"invalid {self._side} message type {_type_repr(t)}"))
        if n < 4:
            return self._fail(ProtocolViolation(f"invalid message length {n} for type {_type_repr(t)}"))
        if limit == self.max_message_length and n <= HARD_MESSAGE_LIMIT:
            return self._fail(
                ProtocolViolation(
                    f"message of type {_type_repr(t)} too large: {n} bytes, limit {limit}",
                    PROGRAM_LIMIT_EXCEEDED,
                )
            )
        return self._fail(ProtocolViolation(f"invalid message length {n} for type {_type_repr(t)}"))

    _side = "protocol"

    # -- raw output -----------------------------------------------------------------------

    def _raw_ready(self) -> None:
        """Slow path when ``_blocked``: raise the stored error, or let subclasses refuse raw
        reads while an untyped exchange is pending."""
        if self._error is not None:
            raise self._error
        self._check_blocked()

    def _check_blocked(self) -> None:
        pass

    def next_raw(self) -> tuple[int, bytes] | None:
        """Next complete message as ``(type byte, payload)``, or None if more bytes are needed."""
        if self._blocked:
            self._raw_ready()
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 5:
            self._check_eof()
            return None
        t = buf[pos]
        (n,) = _U32.unpack_from(buf, pos + 1)
        if n > self._limits[t] or n < 4:
            raise self._bad_header(t, n)
        end = pos + 1 + n
        if end > len(buf):
            self._check_eof()
            return None
        self._pos = end
        return t, bytes(buf[pos + 5 : end])

    def next_frame(self) -> tuple[int, bytes] | None:
        """Next complete message as ``(type byte, whole frame incl. header)`` for forwarding."""
        if self._blocked:
            self._raw_ready()
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 5:
            self._check_eof()
            return None
        t = buf[pos]
        (n,) = _U32.unpack_from(buf, pos + 1)
        if n > self._limits[t] or n < 4:
            raise self._bad_header(t, n)
        end = pos + 1 + n
        if end > len(buf):
            self._check_eof()
            return None
        self._pos = end
        return t, bytes(buf[pos:end])

    def take_frames_until(self, stop: Container[int]) -> bytes:
        """All complete frames before the first whose type is in ``stop`` (or before an
        incomplete one), concatenated. The stop message itself stays buffered for ``next()``.
        Returns b"" when the very next message is a stop message or incomplete. ``taken`` is
        then the number of frames returned (so their payload is ``len(block) - 5 * taken``)."""
        if self._blocked:
            self._raw_ready()
        buf = self._buf
        start = pos = self._pos
        size = len(buf)
        limits = self._limits
        unpack = _U32.unpack_from
        count = 0
        while size - pos >= 5:
            t = buf[pos]
            (n,) = unpack(buf, pos + 1)
            if n > limits[t] or n < 4:
                if pos > start:
                    break  # hand over the good prefix; the bad header raises on the next call
                raise self._bad_header(t, n)
            if t in stop:
                break
            end = pos + 1 + n
            if end > size:
                break
            pos = end
            count += 1
        self.taken = count
        if pos == start:
            return b""
        self._pos = pos
        return bytes(buf[start:pos])


class FrontendDecoder(_Framer):
    """Decodes what a client sends: first the untyped startup packets, then typed messages.

    'p' messages come out as :class:`AuthResponse` unless :meth:`expect_auth_response` has said
    which kind the server asked for, in which case the specific message class is returned.
    """

    __slots__ = ("_auth_kind", "_finished", "_gss_seen", "_ssl_seen", "_startup", "max_startup_length")

    _SMALL = _FRONTEND_SMALL
    _KNOWN = FRONTEND_TYPES
    _AUTH = FrontendType.AUTH_RESPONSE
    _side = "frontend"

    def __init__(
        self,
        *,
        max_message_length: int = HARD_MESSAGE_LIMIT,
        max_startup_length: int = MAX_STARTUP_PACKET_LENGTH,
        startup: bool = True,
    ) -> None:
        super().__init__(max_message_length)
        if not 8 <= max_startup_length <= HARD_MESSAGE_LIMIT:
            raise LocalProtocolError("max_startup_length must be between 8 and 1 GiB")
        self.max_startup_length = max_startup_length
        self._startup = startup
        self._ssl_seen = False
        self._gss_seen = False
        self._finished = False
        self._auth_kind: AuthResponseKind | None = None
        self._blocked = startup

    @property
    def in_startup(self) -> bool:
        """True until a StartupMessage has been decoded (SSL/GSS requests keep it True)."""
        return self._startup

    def tls_established(self) -> None:
        """The connection went TLS without an SSLRequest (a direct TLS handshake): an
        SSLRequest inside it is a protocol violation, as a repeated one is."""
        self._ssl_seen = True

    def expect_auth_response(self, kind: AuthResponseKind | None) -> None:
        """Say how the next 'p' messages are to be read (None: as raw AuthResponse)."""
        self._auth_kind = kind

    def _check_blocked(self) -> None:
        if self._startup:
            raise LocalProtocolError("the startup packet has no type byte: read it with next()")
        if self._finished and len(self._buf) > self._pos:
            raise self._fail(ProtocolViolation("data received after Terminate or CancelRequest"))

    def next(self) -> FrontendMessage | None:
        """Next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._startup:
            return self._next_startup()
        raw = self.next_raw()
        if raw is None:
            return None
        t, payload = raw
        try:
            msg = decode_frontend(t, payload)
            if t == FrontendType.AUTH_RESPONSE and self._auth_kind is not None:
                assert isinstance(msg, AuthResponse)
                return msg.interpret(self._auth_kind)
        except ProtocolViolation as exc:
            raise self._fail(exc) from None
        if t == FrontendType.TERMINATE:
            self._finished = self._blocked = True
        return msg

    def __iter__(self) -> Iterator[FrontendMessage]:
        while (msg := self.next()) is not None:
            yield msg

    def _next_startup(self) -> FrontendMessage | None:
        if self._finished:
            if len(self._buf) > self._pos:
                raise self._fail(ProtocolViolation("data received after CancelRequest"))
            return None
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            if avail and is_tls_client_hello(bytes(buf[pos : pos + 3])):
                raise self._direct_tls()
            self._check_eof()
            return None
        (n,) = _U32.unpack_from(buf, pos)
        if n < 8 or n > self.max_startup_length:
            if is_tls_client_hello(bytes(buf[pos : pos + 3])):
                raise self._direct_tls()
            raise self._fail(ProtocolViolation(f"invalid length of startup packet: {n}"))
        if avail < n:
            self._check_eof()
            return None
        body = bytes(buf[pos + 4 : pos + n])
        self._pos = pos + n
        try:
            msg = decode_startup(body)
        except ProtocolViolation as exc:
            raise self._fail(exc) from None
        if isinstance(msg, StartupMessage):
            self._startup = self._blocked = False
        elif isinstance(msg, SSLRequest | GSSENCRequest):
            # Each request at most once, as in the server: a client may try GSS after a
            # refused SSLRequest or the reverse, but never repeat one.
            if isinstance(msg, SSLRequest):
                if self._ssl_seen:
                    raise self._fail(ProtocolViolation("duplicate SSLRequest"))
                self._ssl_seen = True
            else:
                if self._gss_seen:
                    raise self._fail(ProtocolViolation("duplicate GSSENCRequest"))
                self._gss_seen = True
            if len(buf) > self._pos:
                # Bytes sent before the TLS/GSS handshake were not encrypted and may have been
                # injected by a man in the middle (CVE-2021-23214): refuse, as the server does.
                raise self._fail(ProtocolViolation("received unencrypted data after SSL request"))
        elif isinstance(msg, CancelRequest):
            self._finished = True
        return msg

    def _direct_tls(self) -> ProtocolViolation:
        return self._fail(
            ProtocolViolation(
                "direct TLS negotiation is not handled by this decoder (check is_tls_client_hello)",
                FEATURE_NOT_SUPPORTED,
            )
        )


class BackendDecoder(_Framer):
    """Decodes what a server sends. After writing SSLRequest/GSSENCRequest upstream, call
    :meth:`expect_encryption_response` so the single unframed reply byte is read correctly."""

    __slots__ = ("_expect",)

    _SMALL = _BACKEND_SMALL
    _KNOWN = BACKEND_TYPES
    _side = "backend"

    def __init__(self, *, max_message_length: int = HARD_MESSAGE_LIMIT) -> None:
        super().__init__(max_message_length)
        self._expect: Literal["ssl", "gss"] | None = None

    def expect_encryption_response(self, kind: Literal["ssl", "gss"]) -> None:
        self._expect = kind
        self._blocked = True

    def _check_blocked(self) -> None:
        if self._expect is not None:
            raise LocalProtocolError("an SSL/GSS response byte is pending: read it with next()")

    def next(self) -> BackendMessage | None:
        """Next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._expect is not None:
            if len(self._buf) == self._pos:
                self._check_eof()
                return None
            b = self._buf[self._pos]
            accept = 0x53 if self._expect == "ssl" else 0x47
            if b == accept or b == 0x4E:
                self._pos += 1
                resp: BackendMessage = (
                    SSLResponse(b == accept) if self._expect == "ssl" else GSSENCResponse(b == accept)
                )
                self._expect = None
                self._blocked = False
                if b == accept and len(self._buf) > self._pos:
                    # Same injection concern as on the server side (CVE-2021-23222).
                    raise self._fail(ProtocolViolation("received unencrypted data after SSL response"))
                return resp
            if b != BackendType.ERROR_RESPONSE:
                raise self._fail(ProtocolViolation(f"invalid response to {self._expect} request"))
            # A server that cannot negotiate encryption answers with a framed ErrorResponse.
            self._expect = None
            self._blocked = False
        raw = self.next_raw()
        if raw is None:
            return None
        try:
            return decode_backend(*raw)
        except ProtocolViolation as exc:
            raise self._fail(exc) from None

    def __iter__(self) -> Iterator[BackendMessage]:
        while (msg := self.next()) is not None:
            yield msg
