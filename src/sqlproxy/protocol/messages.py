"""PostgreSQL v3 protocol messages as frozen, slotted dataclasses, with encoders and decoders.

Every message has ``encode() -> bytes`` (the complete frame, type byte and length included).
Decoding works on a *payload* (the bytes after the 5-byte header) and is split by direction,
because type bytes are reused: 'D' is Describe from a client but DataRow from a server.
``decode_frontend`` / ``decode_backend`` / ``decode_startup`` raise only
:class:`ProtocolViolation`; ``encode`` raises only :class:`LocalProtocolError`.

Text fields are ``str`` decoded as UTF-8 with ``surrogateescape``: decoding never fails and
re-encoding gives back the exact bytes, so a proxy can forward what it does not understand.
Callers that need clean text (the SQL analyzer) should reject lone surrogates themselves.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, Self, TypeVar

from sqlproxy.protocol.errors import LocalProtocolError, ProtocolViolation

_T = TypeVar("_T")
_M = TypeVar("_M", bound="Message")

# --- protocol constants ----------------------------------------------------------------------

PROTOCOL_3_0: Final = 196608  # 3 << 16
PROTOCOL_3_2: Final = 196610  # PostgreSQL 18: variable-length cancel keys
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
# Protocol 3.2 allows cancel keys up to 256 bytes; older servers always use 4.
MAX_CANCEL_KEY_LENGTH: Final = 256


class FrontendType:
    """Type bytes of typed frontend messages, as ints (compare with ``next_raw()``'s type)."""

    BIND: Final = 0x42  # B
    CLOSE: Final = 0x43  # C
    DESCRIBE: Final = 0x44  # D
    EXECUTE: Final = 0x45  # E
    FUNCTION_CALL: Final = 0x46  # F
    FLUSH: Final = 0x48  # H
    PARSE: Final = 0x50  # P
    QUERY: Final = 0x51  # Q
    SYNC: Final = 0x53  # S
    TERMINATE: Final = 0x58  # X
    COPY_DONE: Final = 0x63  # c
    COPY_DATA: Final = 0x64  # d
    COPY_FAIL: Final = 0x66  # f
    AUTH_RESPONSE: Final = 0x70  # p: password, SASL initial/continue, GSS


class BackendType:
    """Type bytes of backend messages, as ints."""

    PARSE_COMPLETE: Final = 0x31  # 1
    BIND_COMPLETE: Final = 0x32  # 2
    CLOSE_COMPLETE: Final = 0x33  # 3
    NOTIFICATION_RESPONSE: Final = 0x41  # A
    COMMAND_COMPLETE: Final = 0x43  # C
    DATA_ROW: Final = 0x44  # D
    ERROR_RESPONSE: Final = 0x45  # E
    COPY_IN_RESPONSE: Final = 0x47  # G
    COPY_OUT_RESPONSE: Final = 0x48  # H
    EMPTY_QUERY_RESPONSE: Final = 0x49  # I
    BACKEND_KEY_DATA: Final = 0x4B  # K
    NOTICE_RESPONSE: Final = 0x4E  # N
    AUTHENTICATION: Final = 0x52  # R
    PARAMETER_STATUS: Final = 0x53  # S
    ROW_DESCRIPTION: Final = 0x54  # T
    FUNCTION_CALL_RESPONSE: Final = 0x56  # V
    COPY_BOTH_RESPONSE: Final = 0x57  # W
    READY_FOR_QUERY: Final = 0x5A  # Z
    COPY_DONE: Final = 0x63  # c
    COPY_DATA: Final = 0x64  # d
    NO_DATA: Final = 0x6E  # n
    PORTAL_SUSPENDED: Final = 0x73  # s
    PARAMETER_DESCRIPTION: Final = 0x74  # t
    NEGOTIATE_PROTOCOL_VERSION: Final = 0x76  # v


class AuthCode:
    """Sub-codes of the Authentication ('R') message."""

    OK: Final = 0
    KERBEROS_V5: Final = 2
    CLEARTEXT_PASSWORD: Final = 3
    MD5_PASSWORD: Final = 5
    GSS: Final = 7
    GSS_CONTINUE: Final = 8
    SSPI: Final = 9
    SASL: Final = 10
    SASL_CONTINUE: Final = 11
    SASL_FINAL: Final = 12


# --- encoding helpers -------------------------------------------------------------------------

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HDR = struct.Struct("!cI")
_ENC: Final = "utf-8"
_ERRORS: Final = "surrogateescape"


def _cstr(value: str, what: str) -> bytes:
    try:
        raw = value.encode(_ENC, _ERRORS)
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} contains a lone surrogate") from None
    if b"\0" in raw:
        raise LocalProtocolError(f"{what} contains a NUL byte")
    return raw + b"\0"


def _frame(type_code: bytes, body: bytes) -> bytes:
    return _HDR.pack(type_code, len(body) + 4) + body


def _i16s(values: tuple[int, ...]) -> bytes:
    return _U16.pack(len(values)) + struct.pack(f"!{len(values)}h", *values)


def _values(values: tuple[bytes | None, ...]) -> bytes:
    parts = [_U16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
    return b"".join(parts)


class _Bad(Exception):
    """Internal: a payload is malformed. Converted to ProtocolViolation by the dispatchers."""


class _Reader:
    """Cursor over one payload. Any overrun raises, which the dispatchers turn into
    ProtocolViolation, so decoders need no explicit bounds checks of their own."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def cstr(self) -> str:
        end = self.data.index(0, self.pos)
        s = self.data[self.pos : end].decode(_ENC, _ERRORS)
        self.pos = end + 1
        return s

    def i16(self) -> int:
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def u16(self) -> int:
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def i32(self) -> int:
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def i16_array(self) -> tuple[int, ...]:
        n = self.u16()
        vals = struct.unpack_from(f"!{n}h", self.data, self.pos)
        self.pos += 2 * n
        return vals

    def u32_array(self) -> tuple[int, ...]:
        n = self.u16()
        vals = struct.unpack_from(f"!{n}I", self.data, self.pos)
        self.pos += 4 * n
        return vals

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise _Bad("field runs past the end of the message")
        b = self.data[self.pos : end]
        self.pos = end
        return b

    def values(self) -> tuple[bytes | None, ...]:
        """A uint16 count then that many (int32 length, bytes) values; length -1 is NULL."""
        data = self.data
        n = self.u16()
        pos = self.pos
        size = len(data)
        unpack = _I32.unpack_from
        out: list[bytes | None] = []
        append = out.append
        for _ in range(n):
            (ln,) = unpack(data, pos)
            pos += 4
            if ln < 0:
                if ln != -1:
                    raise _Bad("negative value length")
                append(None)
            else:
                end = pos + ln
                if end > size:
                    raise _Bad("value runs past the end of the message")
                append(data[pos:end])
                pos = end
        self.pos = pos
        return tuple(out)

    def rest(self) -> bytes:
        b = self.data[self.pos :]
        self.pos = len(self.data)
        return b

    def done(self) -> None:
        if self.pos != len(self.data):
            raise _Bad("trailing bytes after the last field")


def _only_cstr(payload: bytes) -> str:
    # Fast path for Query / CommandComplete / CopyFail: exactly one C string and nothing else.
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise _Bad("expected exactly one NUL-terminated string")
    return payload[:-1].decode(_ENC, _ERRORS)


def _empty(payload: bytes) -> None:
    if payload:
        raise _Bad("message must have an empty body")


# --- base classes ----------------------------------------------------------------------------


class Message:
    """Base of every protocol message."""

    __slots__ = ()

    def encode(self) -> bytes:
        raise NotImplementedError


class FrontendMessage(Message):
    """Sent by a client (to the proxy, or by the proxy to an upstream server)."""

    __slots__ = ()


class BackendMessage(Message):
    """Sent by a server."""

    __slots__ = ()


class StartupPacket(FrontendMessage):
    """The untyped messages that may open a connection (no type byte on the wire)."""

    __slots__ = ()


def _guard_encode(fn: Callable[[], bytes]) -> bytes:
    try:
        return fn()
    except (struct.error, OverflowError) as exc:
        raise LocalProtocolError(f"value out of range for the wire format: {exc}") from exc


# --- frontend: startup-phase packets -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage(StartupPacket):
    """Startup packet. ``parameters`` keeps wire order; ``user`` is required by servers.

    Options named ``_pq_.*`` are protocol extensions a server may refuse with
    NegotiateProtocolVersion; they are kept as ordinary parameters here.
    """

    parameters: tuple[tuple[str, str], ...] = ()
    protocol_version: int = PROTOCOL_3_0

    @classmethod
    def build(cls, parameters: Mapping[str, str], protocol_version: int = PROTOCOL_3_0) -> Self:
        return cls(tuple(parameters.items()), protocol_version)

    @property
    def major(self) -> int:
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        return self.protocol_version & 0xFFFF

    def get(self, name: str, default: str | None = None) -> str | None:
        # Last one wins, as in the server's ProcessStartupPacket.
        found = default
        for k, v in self.parameters:
            if k == name:
                found = v
        return found

    def as_dict(self) -> dict[str, str]:
        return dict(self.parameters)

    @property
    def user(self) -> str | None:
        return self.get("user")

    @property
    def database(self) -> str | None:
        # The server defaults the database to the user name.
        return self.get("database") or self.get("user")

    def encode(self) -> bytes:
        def enc() -> bytes:
            parts = [_U32.pack(self.protocol_version)]
            for k, v in self.parameters:
                if not k:
                    raise LocalProtocolError("empty startup parameter name")
                parts.append(_cstr(k, "startup parameter name"))
                parts.append(_cstr(v, "startup parameter value"))
            parts.append(b"\0")
            body = b"".join(parts)
            return _U32.pack(len(body) + 4) + body

        return _guard_encode(enc)


@dataclass(frozen=True, slots=True)
class SSLRequest(StartupPacket):
    def encode(self) -> bytes:
        return b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


@dataclass(frozen=True, slots=True)
class GSSENCRequest(StartupPacket):
    def encode(self) -> bytes:
        return b"\x00\x00\x00\x08\x04\xd2\x16\x30"


@dataclass(frozen=True, slots=True)
class CancelRequest(StartupPacket):
    """Cancel a query on another connection. ``secret_key`` is 4 bytes before protocol 3.2,
    up to 256 bytes from 3.2 (PostgreSQL 18)."""

    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        if not 4 <= len(self.secret_key) <= MAX_CANCEL_KEY_LENGTH:
            raise LocalProtocolError("cancel key must be 4..256 bytes")
        return _guard_encode(
            lambda: (
                _U32.pack(12 + len(self.secret_key))
                + _U32.pack(CANCEL_REQUEST_CODE)
                + _I32.pack(self.process_id)
                + self.secret_key
            )
        )


# --- frontend: typed messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query(FrontendMessage):
    sql: str

    def encode(self) -> bytes:
        return _frame(b"Q", _cstr(self.sql, "query"))


@dataclass(frozen=True, slots=True)
class Parse(FrontendMessage):
    name: str = ""
    query: str = ""
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(
                b"P",
                _cstr(self.name, "statement name")
                + _cstr(self.query, "query")
                + _U16.pack(len(self.param_types))
                + struct.pack(f"!{len(self.param_types)}I", *self.param_types),
            )
        )


@dataclass(frozen=True, slots=True)
class Bind(FrontendMessage):
    """``param_formats``: empty (all text), one code (applies to all) or one per parameter;
    ``params``: raw values, ``None`` for NULL; ``result_formats`` likewise for result columns."""

    portal: str = ""
    statement: str = ""
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(
                b"B",
                _cstr(self.portal, "portal name")
                + _cstr(self.statement, "statement name")
                + _i16s(self.param_formats)
                + _values(self.params)
                + _i16s(self.result_formats),
            )
        )


def _kind(kind: str) -> bytes:
    if kind not in ("S", "P"):
        raise LocalProtocolError(f"kind must be 'S' (statement) or 'P' (portal), not {kind!r}")
    return kind.encode()


@dataclass(frozen=True, slots=True)
class Describe(FrontendMessage):
    kind: Literal["S", "P"] = "S"
    name: str = ""

    def encode(self) -> bytes:
        return _frame(b"D", _kind(self.kind) + _cstr(self.name, "name"))


@dataclass(frozen=True, slots=True)
class Execute(FrontendMessage):
    portal: str = ""
    max_rows: int = 0  # 0 = no limit

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(b"E", _cstr(self.portal, "portal name") + _U32.pack(self.max_rows))
        )


@dataclass(frozen=True, slots=True)
class Close(FrontendMessage):
    kind: Literal["S", "P"] = "S"
    name: str = ""

    def encode(self) -> bytes:
        return _frame(b"C", _kind(self.kind) + _cstr(self.name, "name"))


@dataclass(frozen=True, slots=True)
class Sync(FrontendMessage):
    def encode(self) -> bytes:
        return b"S\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class Flush(FrontendMessage):
    def encode(self) -> bytes:
        return b"H\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class Terminate(FrontendMessage):
    def encode(self) -> bytes:
        return b"X\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class CopyData(FrontendMessage, BackendMessage):
    """Sent in both directions ('d')."""

    data: bytes

    def encode(self) -> bytes:
        return _frame(b"d", self.data)


@dataclass(frozen=True, slots=True)
class CopyDone(FrontendMessage, BackendMessage):
    """Sent in both directions ('c')."""

    def encode(self) -> bytes:
        return b"c\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class CopyFail(FrontendMessage):
    message: str

    def encode(self) -> bytes:
        return _frame(b"f", _cstr(self.message, "CopyFail message"))


@dataclass(frozen=True, slots=True)
class FunctionCall(FrontendMessage):
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(
                b"F",
                _U32.pack(self.function_oid)
                + _i16s(self.arg_formats)
                + _values(self.args)
                + _I16.pack(self.result_format),
            )
        )


AuthResponseKind = Literal["password", "sasl_initial", "sasl", "gss"]


@dataclass(frozen=True, slots=True)
class PasswordMessage(FrontendMessage):
    """Cleartext password or ``md5...`` response ('p')."""

    password: str

    def encode(self) -> bytes:
        return _frame(b"p", _cstr(self.password, "password"))


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(FrontendMessage):
    mechanism: str
    data: bytes | None = None

    def encode(self) -> bytes:
        tail = b"\xff\xff\xff\xff" if self.data is None else _I32.pack(len(self.data)) + self.data
        return _frame(b"p", _cstr(self.mechanism, "SASL mechanism") + tail)


@dataclass(frozen=True, slots=True)
class SASLResponse(FrontendMessage):
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"p", self.data)


@dataclass(frozen=True, slots=True)
class GSSResponse(FrontendMessage):
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"p", self.data)


@dataclass(frozen=True, slots=True)
class AuthResponse(FrontendMessage):
    """A 'p' message not yet interpreted: its layout depends on which authentication request
    the server sent, which only the session state knows. ``interpret`` gives the real message."""

    data: bytes

    def encode(self) -> bytes:
        return _frame(b"p", self.data)

    def interpret(
        self, kind: AuthResponseKind
    ) -> PasswordMessage | SASLInitialResponse | SASLResponse | GSSResponse:
        return _decoding(lambda: _interpret_auth(self.data, kind), "authentication response")


def _interpret_auth(
    p: bytes, kind: AuthResponseKind
) -> PasswordMessage | SASLInitialResponse | SASLResponse | GSSResponse:
    if kind == "password":
        return PasswordMessage(_only_cstr(p))
    if kind == "sasl_initial":
        r = _Reader(p)
        mech = r.cstr()
        n = r.i32()
        if n < -1:
            raise _Bad("negative SASL data length")
        data = None if n == -1 else r.take(n)
        r.done()
        return SASLInitialResponse(mech, data)
    if kind == "sasl":
        return SASLResponse(p)
    if kind == "gss":
        return GSSResponse(p)
    raise LocalProtocolError(f"unknown authentication response kind {kind!r}")


# --- backend messages ------------------------------------------------------------------------


def _auth(code: int, rest: bytes = b"") -> bytes:
    return _frame(b"R", _U32.pack(code) + rest)


@dataclass(frozen=True, slots=True)
class AuthenticationOk(BackendMessage):
    def encode(self) -> bytes:
        return _auth(AuthCode.OK)


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5(BackendMessage):
    def encode(self) -> bytes:
        return _auth(AuthCode.KERBEROS_V5)


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(BackendMessage):
    def encode(self) -> bytes:
        return _auth(AuthCode.CLEARTEXT_PASSWORD)


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(BackendMessage):
    salt: bytes

    def encode(self) -> bytes:
        if len(self.salt) != 4:
            raise LocalProtocolError("MD5 salt must be 4 bytes")
        return _auth(AuthCode.MD5_PASSWORD, self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationGSS(BackendMessage):
    def encode(self) -> bytes:
        return _auth(AuthCode.GSS)


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue(BackendMessage):
    data: bytes

    def encode(self) -> bytes:
        return _auth(AuthCode.GSS_CONTINUE, self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI(BackendMessage):
    def encode(self) -> bytes:
        return _auth(AuthCode.SSPI)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(BackendMessage):
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        for m in self.mechanisms:
            if not m:
                raise LocalProtocolError("empty SASL mechanism name")
        return _auth(AuthCode.SASL, b"".join(_cstr(m, "SASL mechanism") for m in self.mechanisms) + b"\0")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(BackendMessage):
    data: bytes

    def encode(self) -> bytes:
        return _auth(AuthCode.SASL_CONTINUE, self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(BackendMessage):
    data: bytes

    def encode(self) -> bytes:
        return _auth(AuthCode.SASL_FINAL, self.data)


Authentication = (
    AuthenticationOk
    | AuthenticationKerberosV5
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationGSS
    | AuthenticationGSSContinue
    | AuthenticationSSPI
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)


@dataclass(frozen=True, slots=True)
class BackendKeyData(BackendMessage):
    """``secret_key`` is 4 bytes before protocol 3.2, up to 256 bytes from 3.2."""

    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        if not 4 <= len(self.secret_key) <= MAX_CANCEL_KEY_LENGTH:
            raise LocalProtocolError("cancel key must be 4..256 bytes")
        return _guard_encode(lambda: _frame(b"K", _I32.pack(self.process_id) + self.secret_key))


@dataclass(frozen=True, slots=True)
class ParameterStatus(BackendMessage):
    name: str
    value: str

    def encode(self) -> bytes:
        return _frame(b"S", _cstr(self.name, "parameter name") + _cstr(self.value, "parameter value"))


TransactionStatus = Literal["I", "T", "E"]


@dataclass(frozen=True, slots=True)
class ReadyForQuery(BackendMessage):
    """``status``: 'I' idle, 'T' in a transaction block, 'E' in a failed transaction block."""

    status: TransactionStatus = "I"

    def encode(self) -> bytes:
        if self.status not in ("I", "T", "E"):
            raise LocalProtocolError(f"invalid transaction status {self.status!r}")
        return b"Z\x00\x00\x00\x05" + self.status.encode()


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription. ``table_oid``/``column_attnum`` are 0 when the column
    is not a plain table column; ``type_size`` is negative for variable-width types."""

    name: str
    table_oid: int = 0
    column_attnum: int = 0
    type_oid: int = 25  # text
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0

    _S: ClassVar[struct.Struct] = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription(BackendMessage):
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        def enc() -> bytes:
            pack = FieldDescription._S.pack
            parts = [_U16.pack(len(self.fields))]
            for f in self.fields:
                parts.append(_cstr(f.name, "column name"))
                parts.append(
                    pack(f.table_oid, f.column_attnum, f.type_oid, f.type_size, f.type_modifier, f.format)
                )
            return _frame(b"T", b"".join(parts))

        return _guard_encode(enc)


@dataclass(frozen=True, slots=True)
class DataRow(BackendMessage):
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        return _guard_encode(lambda: _frame(b"D", _values(self.values)))


@dataclass(frozen=True, slots=True)
class CommandComplete(BackendMessage):
    tag: str

    def encode(self) -> bytes:
        return _frame(b"C", _cstr(self.tag, "command tag"))

    @property
    def command(self) -> str:
        return self.tag.split(" ", 1)[0]

    @property
    def row_count(self) -> int | None:
        """Rows affected/returned ("INSERT 0 5" -> 5, "SELECT 3" -> 3), None for e.g. "BEGIN"."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if " " in self.tag and last.isdigit() else None


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(BackendMessage):
    def encode(self) -> bytes:
        return b"I\x00\x00\x00\x04"


class _Fields(BackendMessage):
    """Shared by ErrorResponse and NoticeResponse: (code, value) pairs in wire order."""

    __slots__ = ()
    _TYPE: ClassVar[bytes]

    @property
    def _pairs(self) -> tuple[tuple[str, str], ...]:
        raise NotImplementedError

    def get(self, code: str) -> str | None:
        for k, v in self._pairs:
            if k == code:
                return v
        return None

    def as_dict(self) -> dict[str, str]:
        return dict(self._pairs)

    @property
    def severity(self) -> str | None:
        """The non-localized severity (V) when sent, else the possibly localized S."""
        return self.get("V") or self.get("S")

    @property
    def sqlstate(self) -> str | None:
        return self.get("C")

    @property
    def message(self) -> str | None:
        return self.get("M")

    @property
    def detail(self) -> str | None:
        return self.get("D")

    @property
    def hint(self) -> str | None:
        return self.get("H")

    @property
    def position(self) -> int | None:
        p = self.get("P")
        return int(p) if p is not None and p.isdigit() else None

    def encode(self) -> bytes:
        parts = []
        for k, v in self._pairs:
            if len(k) != 1 or k == "\0" or not k.isascii():
                raise LocalProtocolError(f"invalid error field code {k!r}")
            parts.append(k.encode() + _cstr(v, f"error field {k}"))
        parts.append(b"\0")
        return _frame(self._TYPE, b"".join(parts))


def _build_fields(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None,
    hint: str | None,
    extra: Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    f = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail is not None:
        f.append(("D", detail))
    if hint is not None:
        f.append(("H", hint))
    f.extend(extra)
    return tuple(f)


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    """Fields by one-letter code: S severity, V non-localized severity, C SQLSTATE, M message,
    D detail, H hint, P position, ... Unknown codes are kept (clients must ignore them)."""

    fields: tuple[tuple[str, str], ...]
    _TYPE: ClassVar[bytes] = b"E"

    @property
    def _pairs(self) -> tuple[tuple[str, str], ...]:
        return self.fields

    @classmethod
    def build(
        cls,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> Self:
        return cls(_build_fields(severity, sqlstate, message, detail, hint, extra))


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    fields: tuple[tuple[str, str], ...]
    _TYPE: ClassVar[bytes] = b"N"

    @property
    def _pairs(self) -> tuple[tuple[str, str], ...]:
        return self.fields

    @classmethod
    def build(
        cls,
        message: str,
        *,
        severity: str = "NOTICE",
        sqlstate: str = "00000",
        detail: str | None = None,
        hint: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> Self:
        return cls(_build_fields(severity, sqlstate, message, detail, hint, extra))


@dataclass(frozen=True, slots=True)
class ParseComplete(BackendMessage):
    def encode(self) -> bytes:
        return b"1\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class BindComplete(BackendMessage):
    def encode(self) -> bytes:
        return b"2\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class CloseComplete(BackendMessage):
    def encode(self) -> bytes:
        return b"3\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class NoData(BackendMessage):
    def encode(self) -> bytes:
        return b"n\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class PortalSuspended(BackendMessage):
    def encode(self) -> bytes:
        return b"s\x00\x00\x00\x04"


@dataclass(frozen=True, slots=True)
class ParameterDescription(BackendMessage):
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(
                b"t",
                _U16.pack(len(self.type_oids)) + struct.pack(f"!{len(self.type_oids)}I", *self.type_oids),
            )
        )


@dataclass(frozen=True, slots=True)
class NotificationResponse(BackendMessage):
    process_id: int
    channel: str
    payload: str = ""

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(
                b"A",
                _I32.pack(self.process_id) + _cstr(self.channel, "channel") + _cstr(self.payload, "payload"),
            )
        )


class _CopyResponse(BackendMessage):
    __slots__ = ()
    _TYPE: ClassVar[bytes]

    @property
    def _parts(self) -> tuple[int, tuple[int, ...]]:
        raise NotImplementedError

    def encode(self) -> bytes:
        fmt, cols = self._parts
        return _guard_encode(lambda: _frame(self._TYPE, struct.pack("!b", fmt) + _i16s(cols)))


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    """``format``: 0 text, 1 binary; ``column_formats`` one per column."""

    format: int = 0
    column_formats: tuple[int, ...] = ()
    _TYPE: ClassVar[bytes] = b"G"

    @property
    def _parts(self) -> tuple[int, tuple[int, ...]]:
        return self.format, self.column_formats


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    format: int = 0
    column_formats: tuple[int, ...] = ()
    _TYPE: ClassVar[bytes] = b"H"

    @property
    def _parts(self) -> tuple[int, tuple[int, ...]]:
        return self.format, self.column_formats


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    format: int = 0
    column_formats: tuple[int, ...] = ()
    _TYPE: ClassVar[bytes] = b"W"

    @property
    def _parts(self) -> tuple[int, tuple[int, ...]]:
        return self.format, self.column_formats


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(BackendMessage):
    newest_minor: int
    unrecognized_options: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return _guard_encode(
            lambda: _frame(
                b"v",
                _U32.pack(self.newest_minor)
                + _U32.pack(len(self.unrecognized_options))
                + b"".join(_cstr(o, "option name") for o in self.unrecognized_options),
            )
        )


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(BackendMessage):
    value: bytes | None

    def encode(self) -> bytes:
        if self.value is None:
            return b"V\x00\x00\x00\x08\xff\xff\xff\xff"
        return _frame(b"V", _I32.pack(len(self.value)) + self.value)


@dataclass(frozen=True, slots=True)
class SSLResponse(BackendMessage):
    """The single unframed byte answering SSLRequest: 'S' (go ahead with TLS) or 'N'."""

    accepted: bool

    def encode(self) -> bytes:
        return b"S" if self.accepted else b"N"


@dataclass(frozen=True, slots=True)
class GSSENCResponse(BackendMessage):
    """The single unframed byte answering GSSENCRequest: 'G' or 'N'."""

    accepted: bool

    def encode(self) -> bytes:
        return b"G" if self.accepted else b"N"


# --- decoders --------------------------------------------------------------------------------

_DECODE_ERRORS = (_Bad, struct.error, ValueError, IndexError)


def _decoding(fn: Callable[[], _T], what: str) -> _T:
    try:
        return fn()
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"invalid {what} message: {exc}") from None


def _d_query(p: bytes) -> Query:
    return Query(_only_cstr(p))


def _d_parse(p: bytes) -> Parse:
    r = _Reader(p)
    name = r.cstr()
    query = r.cstr()
    types = r.u32_array()
    r.done()
    return Parse(name, query, types)


def _d_bind(p: bytes) -> Bind:
    r = _Reader(p)
    portal = r.cstr()
    stmt = r.cstr()
    pf = r.i16_array()
    vals = r.values()
    rf = r.i16_array()
    r.done()
    return Bind(portal, stmt, pf, vals, rf)


def _d_kind_name(p: bytes) -> tuple[Literal["S", "P"], str]:
    if not p or p[0] not in (0x53, 0x50):
        raise _Bad("kind must be 'S' or 'P'")
    kind: Literal["S", "P"] = "S" if p[0] == 0x53 else "P"
    return kind, _only_cstr(p[1:])


def _d_describe(p: bytes) -> Describe:
    return Describe(*_d_kind_name(p))


def _d_close(p: bytes) -> Close:
    return Close(*_d_kind_name(p))


def _d_execute(p: bytes) -> Execute:
    r = _Reader(p)
    portal = r.cstr()
    n = r.u32()
    r.done()
    return Execute(portal, n)


def _d_function_call(p: bytes) -> FunctionCall:
    r = _Reader(p)
    oid = r.u32()
    fmts = r.i16_array()
    args = r.values()
    rf = r.i16()
    r.done()
    return FunctionCall(oid, fmts, args, rf)


_SYNC = Sync()
_FLUSH = Flush()
_TERMINATE = Terminate()
_COPY_DONE = CopyDone()


def _fixed(instance: _M) -> Callable[[bytes], _M]:
    def dec(p: bytes) -> _M:
        _empty(p)
        return instance

    return dec


_FRONTEND_DECODERS: dict[int, Callable[[bytes], FrontendMessage]] = {
    FrontendType.QUERY: _d_query,
    FrontendType.PARSE: _d_parse,
    FrontendType.BIND: _d_bind,
    FrontendType.DESCRIBE: _d_describe,
    FrontendType.EXECUTE: _d_execute,
    FrontendType.CLOSE: _d_close,
    FrontendType.SYNC: _fixed(_SYNC),
    FrontendType.FLUSH: _fixed(_FLUSH),
    FrontendType.TERMINATE: _fixed(_TERMINATE),
    FrontendType.COPY_DATA: CopyData,
    FrontendType.COPY_DONE: _fixed(_COPY_DONE),
    FrontendType.COPY_FAIL: lambda p: CopyFail(_only_cstr(p)),
    FrontendType.FUNCTION_CALL: _d_function_call,
    FrontendType.AUTH_RESPONSE: AuthResponse,
}

_FRONTEND_NAMES: dict[int, str] = {
    FrontendType.QUERY: "Query",
    FrontendType.PARSE: "Parse",
    FrontendType.BIND: "Bind",
    FrontendType.DESCRIBE: "Describe",
    FrontendType.EXECUTE: "Execute",
    FrontendType.CLOSE: "Close",
    FrontendType.SYNC: "Sync",
    FrontendType.FLUSH: "Flush",
    FrontendType.TERMINATE: "Terminate",
    FrontendType.COPY_DATA: "CopyData",
    FrontendType.COPY_DONE: "CopyDone",
    FrontendType.COPY_FAIL: "CopyFail",
    FrontendType.FUNCTION_CALL: "FunctionCall",
    FrontendType.AUTH_RESPONSE: "authentication response",
}


def _type_repr(t: int) -> str:
    return repr(chr(t)) if 0x20 < t < 0x7F else f"0x{t:02x}"


def decode_frontend(type_code: int, payload: bytes) -> FrontendMessage:
    """Decode one typed frontend message. 'p' gives :class:`AuthResponse` (see ``interpret``)."""
    fn = _FRONTEND_DECODERS.get(type_code)
    if fn is None:
        raise ProtocolViolation(f"invalid frontend message type {_type_repr(type_code)}")
    try:
        return fn(payload)
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"invalid {_FRONTEND_NAMES[type_code]} message: {exc}") from None


def decode_startup(body: bytes) -> StartupPacket:
    """Decode an untyped startup-phase packet; ``body`` excludes the 4-byte length word."""
    try:
        r = _Reader(body)
        code = r.u32()
        if code == SSL_REQUEST_CODE:
            r.done()
            return SSLRequest()
        if code == GSSENC_REQUEST_CODE:
            r.done()
            return GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            pid = r.i32()
            key = r.rest()
            if not 4 <= len(key) <= MAX_CANCEL_KEY_LENGTH:
                raise _Bad("cancel key must be 4..256 bytes")
            return CancelRequest(pid, key)
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"invalid startup packet: {exc}") from None
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 to 3.2",
            "0A000",
        )
    try:
        params: list[tuple[str, str]] = []
        while True:
            name = r.cstr()
            if not name:
                break
            params.append((name, r.cstr()))
        r.done()
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"invalid startup packet layout: {exc}") from None
    return StartupMessage(tuple(params), code)


def _d_auth(p: bytes) -> BackendMessage:
    r = _Reader(p)
    code = r.u32()
    msg: BackendMessage
    if code == AuthCode.OK:
        msg = AuthenticationOk()
    elif code == AuthCode.MD5_PASSWORD:
        msg = AuthenticationMD5Password(r.take(4))
    elif code == AuthCode.SASL:
        mechs = []
        while True:
            m = r.cstr()
            if not m:
                break
            mechs.append(m)
        msg = AuthenticationSASL(tuple(mechs))
    elif code == AuthCode.SASL_CONTINUE:
        return AuthenticationSASLContinue(r.rest())
    elif code == AuthCode.SASL_FINAL:
        return AuthenticationSASLFinal(r.rest())
    elif code == AuthCode.GSS_CONTINUE:
        return AuthenticationGSSContinue(r.rest())
    elif code == AuthCode.CLEARTEXT_PASSWORD:
        msg = AuthenticationCleartextPassword()
    elif code == AuthCode.GSS:
        msg = AuthenticationGSS()
    elif code == AuthCode.SSPI:
        msg = AuthenticationSSPI()
    elif code == AuthCode.KERBEROS_V5:
        msg = AuthenticationKerberosV5()
    else:
        raise _Bad(f"unknown authentication request code {code}")
    r.done()
    return msg


def _d_key_data(p: bytes) -> BackendKeyData:
    r = _Reader(p)
    pid = r.i32()
    key = r.rest()
    if not 4 <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise _Bad("cancel key must be 4..256 bytes")
    return BackendKeyData(pid, key)


def _d_parameter_status(p: bytes) -> ParameterStatus:
    r = _Reader(p)
    name = r.cstr()
    value = r.cstr()
    r.done()
    return ParameterStatus(name, value)


_RFQ = {0x49: ReadyForQuery("I"), 0x54: ReadyForQuery("T"), 0x45: ReadyForQuery("E")}


def _d_ready(p: bytes) -> ReadyForQuery:
    if len(p) != 1 or p[0] not in _RFQ:
        raise _Bad("transaction status must be one of I, T, E")
    return _RFQ[p[0]]


def _d_row_description(p: bytes) -> RowDescription:
    r = _Reader(p)
    n = r.u16()
    unpack = FieldDescription._S.unpack_from
    fields = []
    for _ in range(n):
        name = r.cstr()
        t_oid, attnum, ty_oid, size, mod, fmt = unpack(r.data, r.pos)
        r.pos += 18
        fields.append(FieldDescription(name, t_oid, attnum, ty_oid, size, mod, fmt))
    r.done()
    return RowDescription(tuple(fields))


def _d_data_row(p: bytes) -> DataRow:
    r = _Reader(p)
    vals = r.values()
    r.done()
    return DataRow(vals)


def _d_fields(p: bytes) -> tuple[tuple[str, str], ...]:
    r = _Reader(p)
    out = []
    while True:
        code = r.take(1)
        if code == b"\0":
            break
        out.append((code.decode(_ENC, _ERRORS), r.cstr()))
    r.done()
    return tuple(out)


def _d_notification(p: bytes) -> NotificationResponse:
    r = _Reader(p)
    pid = r.i32()
    channel = r.cstr()
    payload = r.cstr()
    r.done()
    return NotificationResponse(pid, channel, payload)


def _d_copy_response(p: bytes) -> tuple[int, tuple[int, ...]]:
    r = _Reader(p)
    fmt = r.take(1)[0]
    if fmt > 127:
        raise _Bad("copy format out of range")
    cols = r.i16_array()
    r.done()
    return fmt, cols


def _d_parameter_description(p: bytes) -> ParameterDescription:
    r = _Reader(p)
    oids = r.u32_array()
    r.done()
    return ParameterDescription(oids)


def _d_negotiate(p: bytes) -> NegotiateProtocolVersion:
    r = _Reader(p)
    minor = r.u32()
    n = r.u32()
    opts = []
    for _ in range(n):
        opts.append(r.cstr())
    r.done()
    return NegotiateProtocolVersion(minor, tuple(opts))


def _d_function_call_response(p: bytes) -> FunctionCallResponse:
    r = _Reader(p)
    n = r.i32()
    if n < -1:
        raise _Bad("negative result length")
    value = None if n == -1 else r.take(n)
    r.done()
    return FunctionCallResponse(value)


_BACKEND_DECODERS: dict[int, Callable[[bytes], BackendMessage]] = {
    BackendType.AUTHENTICATION: _d_auth,
    BackendType.BACKEND_KEY_DATA: _d_key_data,
    BackendType.PARAMETER_STATUS: _d_parameter_status,
    BackendType.READY_FOR_QUERY: _d_ready,
    BackendType.ROW_DESCRIPTION: _d_row_description,
    BackendType.DATA_ROW: _d_data_row,
    BackendType.COMMAND_COMPLETE: lambda p: CommandComplete(_only_cstr(p)),
    BackendType.EMPTY_QUERY_RESPONSE: _fixed(EmptyQueryResponse()),
    BackendType.ERROR_RESPONSE: lambda p: ErrorResponse(_d_fields(p)),
    BackendType.NOTICE_RESPONSE: lambda p: NoticeResponse(_d_fields(p)),
    BackendType.PARSE_COMPLETE: _fixed(ParseComplete()),
    BackendType.BIND_COMPLETE: _fixed(BindComplete()),
    BackendType.CLOSE_COMPLETE: _fixed(CloseComplete()),
    BackendType.NO_DATA: _fixed(NoData()),
    BackendType.PORTAL_SUSPENDED: _fixed(PortalSuspended()),
    BackendType.PARAMETER_DESCRIPTION: _d_parameter_description,
    BackendType.NOTIFICATION_RESPONSE: _d_notification,
    BackendType.COPY_IN_RESPONSE: lambda p: CopyInResponse(*_d_copy_response(p)),
    BackendType.COPY_OUT_RESPONSE: lambda p: CopyOutResponse(*_d_copy_response(p)),
    BackendType.COPY_BOTH_RESPONSE: lambda p: CopyBothResponse(*_d_copy_response(p)),
    BackendType.COPY_DATA: CopyData,
    BackendType.COPY_DONE: _fixed(_COPY_DONE),
    BackendType.NEGOTIATE_PROTOCOL_VERSION: _d_negotiate,
    BackendType.FUNCTION_CALL_RESPONSE: _d_function_call_response,
}


def decode_backend(type_code: int, payload: bytes) -> BackendMessage:
    """Decode one typed backend message."""
    fn = _BACKEND_DECODERS.get(type_code)
    if fn is None:
        raise ProtocolViolation(f"invalid backend message type {_type_repr(type_code)}")
    try:
        return fn(payload)
    except _DECODE_ERRORS as exc:
        raise ProtocolViolation(f"invalid backend message {_type_repr(type_code)}: {exc}") from None


FRONTEND_TYPES: Final = frozenset(_FRONTEND_DECODERS)
BACKEND_TYPES: Final = frozenset(_BACKEND_DECODERS)
