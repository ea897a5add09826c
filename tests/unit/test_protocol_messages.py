"""Byte tables for every v3 message: encode() gives exactly these bytes, and the decoder for
that direction turns exactly these bytes back into the object."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sqlproxy.protocol import errors as E
from sqlproxy.protocol.errors import LocalProtocolError, ProtocolViolation
from sqlproxy.protocol.framing import BackendDecoder, FrontendDecoder
from sqlproxy.protocol.messages import (
    PROTOCOL_3_2,
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSSPI,
    AuthResponse,
    BackendKeyData,
    Bind,
    BindComplete,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    FunctionCall,
    FunctionCallResponse,
    GSSENCRequest,
    GSSResponse,
    Message,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PortalSuspended,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
    decode_backend,
    decode_frontend,
    decode_startup,
)

FRONTEND = [
    (Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (Query(""), b"Q\x00\x00\x00\x05\x00"),
    (Query("SELECT 'é'"), b"Q\x00\x00\x00\x10SELECT '\xc3\xa9'\x00"),
    (Parse(), b"P\x00\x00\x00\x08\x00\x00\x00\x00"),
    (
        Parse("s1", "SELECT $1", (23,)),
        b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17",
    ),
    (Bind(), b"B\x00\x00\x00\x0c\x00\x00\x00\x00\x00\x00\x00\x00"),
    (
        Bind("p", "s", (1,), (b"\x00\x01", None), (0,)),
        b"B\x00\x00\x00\x1cp\x00s\x00\x00\x01\x00\x01\x00\x02\x00\x00\x00\x02\x00\x01"
        b"\xff\xff\xff\xff\x00\x01\x00\x00",
    ),
    (Bind(params=(b"",)), b"B\x00\x00\x00\x10\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
    (Describe("P", "c"), b"D\x00\x00\x00\x07Pc\x00"),
    (Describe("S", ""), b"D\x00\x00\x00\x06S\x00"),
    (Execute(), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    (Execute("p", 10), b"E\x00\x00\x00\x0ap\x00\x00\x00\x00\x0a"),
    (Close("S", "s1"), b"C\x00\x00\x00\x08Ss1\x00"),
    (Close("P", ""), b"C\x00\x00\x00\x06P\x00"),
    (Sync(), b"S\x00\x00\x00\x04"),
    (Flush(), b"H\x00\x00\x00\x04"),
    (Terminate(), b"X\x00\x00\x00\x04"),
    (CopyData(b"a\tb\n"), b"d\x00\x00\x00\x08a\tb\n"),
    (CopyDone(), b"c\x00\x00\x00\x04"),
    (CopyFail("oops"), b"f\x00\x00\x00\x09oops\x00"),
    (
        FunctionCall(1598, (0,), (b"x",), 1),
        b"F\x00\x00\x00\x15\x00\x00\x06\x3e\x00\x01\x00\x00\x00\x01\x00\x00\x00\x01x\x00\x01",
    ),
    (AuthResponse(b"secret\x00"), b"p\x00\x00\x00\x0bsecret\x00"),
]

# 'p' messages: encoded bytes, and how they read once the expected kind is known.
AUTH_RESPONSES = [
    (PasswordMessage("secret"), "password", b"p\x00\x00\x00\x0bsecret\x00"),
    (
        SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
        "sasl_initial",
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc",
    ),
    (SASLInitialResponse("X", None), "sasl_initial", b"p\x00\x00\x00\x0aX\x00\xff\xff\xff\xff"),
    (SASLResponse(b"c=biws"), "sasl", b"p\x00\x00\x00\x0ac=biws"),
    (GSSResponse(b"\x01\x02"), "gss", b"p\x00\x00\x00\x06\x01\x02"),
]

STARTUP = [
    (
        StartupMessage((("user", "u"), ("database", "d"))),
        b"\x00\x00\x00\x1b\x00\x03\x00\x00user\x00u\x00database\x00d\x00\x00",
    ),
    (StartupMessage((), PROTOCOL_3_2), b"\x00\x00\x00\x09\x00\x03\x00\x02\x00"),
    (
        StartupMessage((("user", "u"), ("_pq_.x", "1")), PROTOCOL_3_2),
        b"\x00\x00\x00\x19\x00\x03\x00\x02user\x00u\x00_pq_.x\x001\x00\x00",
    ),
    (SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (
        CancelRequest(1234, b"\x01\x02\x03\x04"),
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\x01\x02\x03\x04",
    ),
    (
        CancelRequest(7, bytes(range(32))),
        b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x00\x07" + bytes(range(32)),
    ),
]

BACKEND = [
    (AuthenticationOk(), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (AuthenticationKerberosV5(), b"R\x00\x00\x00\x08\x00\x00\x00\x02"),
    (AuthenticationCleartextPassword(), b"R\x00\x00\x00\x08\x00\x00\x00\x03"),
    (AuthenticationMD5Password(b"abcd"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"),
    (AuthenticationGSS(), b"R\x00\x00\x00\x08\x00\x00\x00\x07"),
    (AuthenticationGSSContinue(b"tok"), b"R\x00\x00\x00\x0b\x00\x00\x00\x08tok"),
    (AuthenticationSSPI(), b"R\x00\x00\x00\x08\x00\x00\x00\x09"),
    (
        AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00",
    ),
    (AuthenticationSASLContinue(b"r=x"), b"R\x00\x00\x00\x0b\x00\x00\x00\x0br=x"),
    (AuthenticationSASLFinal(b"v=y"), b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=y"),
    (BackendKeyData(42, b"\xde\xad\xbe\xef"), b"K\x00\x00\x00\x0c\x00\x00\x00\x2a\xde\xad\xbe\xef"),
    (BackendKeyData(42, b"k" * 32), b"K\x00\x00\x00\x28\x00\x00\x00\x2a" + b"k" * 32),
    (
        ParameterStatus("client_encoding", "UTF8"),
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
    ),
    (ReadyForQuery("I"), b"Z\x00\x00\x00\x05I"),
    (ReadyForQuery("T"), b"Z\x00\x00\x00\x05T"),
    (ReadyForQuery("E"), b"Z\x00\x00\x00\x05E"),
    (
        RowDescription((FieldDescription("id", 16384, 1, 23, 4, -1, 0),)),
        b"T\x00\x00\x00\x1b\x00\x01id\x00\x00\x00\x40\x00\x00\x01\x00\x00\x00\x17\x00\x04"
        b"\xff\xff\xff\xff\x00\x00",
    ),
    (RowDescription(()), b"T\x00\x00\x00\x06\x00\x00"),
    (
        DataRow((b"1", None, b"")),
        b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00",
    ),
    (DataRow(()), b"D\x00\x00\x00\x06\x00\x00"),
    (CommandComplete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
    (EmptyQueryResponse(), b"I\x00\x00\x00\x04"),
    (
        ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "42501"), ("M", "denied"))),
        b"E\x00\x00\x00\x22SERROR\x00VERROR\x00C42501\x00Mdenied\x00\x00",
    ),
    (NoticeResponse((("S", "NOTICE"), ("M", "hi"))), b"N\x00\x00\x00\x11SNOTICE\x00Mhi\x00\x00"),
    (ParseComplete(), b"1\x00\x00\x00\x04"),
    (BindComplete(), b"2\x00\x00\x00\x04"),
    (CloseComplete(), b"3\x00\x00\x00\x04"),
    (NoData(), b"n\x00\x00\x00\x04"),
    (PortalSuspended(), b"s\x00\x00\x00\x04"),
    (
        ParameterDescription((23, 25)),
        b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19",
    ),
    (NotificationResponse(7, "ch", "hello"), b"A\x00\x00\x00\x11\x00\x00\x00\x07ch\x00hello\x00"),
    (CopyInResponse(0, (0, 0)), b"G\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"),
    (CopyOutResponse(1, (1,)), b"H\x00\x00\x00\x09\x01\x00\x01\x00\x01"),
    (CopyBothResponse(0, ()), b"W\x00\x00\x00\x07\x00\x00\x00"),
    (CopyData(b"x"), b"d\x00\x00\x00\x05x"),
    (CopyDone(), b"c\x00\x00\x00\x04"),
    (
        NegotiateProtocolVersion(0, ("_pq_.foo",)),
        b"v\x00\x00\x00\x15\x00\x00\x00\x00\x00\x00\x00\x01_pq_.foo\x00",
    ),
    (FunctionCallResponse(b"ab"), b"V\x00\x00\x00\x0a\x00\x00\x00\x02ab"),
    (FunctionCallResponse(None), b"V\x00\x00\x00\x08\xff\xff\xff\xff"),
]


def _ids(table: Sequence[tuple[Message, bytes]]) -> list[str]:
    return [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(table)]


@pytest.mark.parametrize(("msg", "wire"), FRONTEND, ids=_ids(FRONTEND))
def test_frontend_encode_decode(msg: Message, wire: bytes) -> None:
    assert msg.encode() == wire
    assert decode_frontend(wire[0], wire[5:]) == msg
    dec = FrontendDecoder(startup=False)
    dec.feed(wire)
    assert dec.next() == msg
    assert dec.next() is None


@pytest.mark.parametrize(("msg", "kind", "wire"), AUTH_RESPONSES, ids=[k for _, k, _ in AUTH_RESPONSES])
def test_auth_responses(msg: Message, kind, wire: bytes) -> None:
    assert msg.encode() == wire
    raw = decode_frontend(wire[0], wire[5:])
    assert raw == AuthResponse(wire[5:])
    assert isinstance(raw, AuthResponse)
    assert raw.interpret(kind) == msg
    dec = FrontendDecoder(startup=False)
    dec.expect_auth_response(kind)
    dec.feed(wire)
    assert dec.next() == msg


@pytest.mark.parametrize(("msg", "wire"), STARTUP, ids=_ids(STARTUP))
def test_startup_encode_decode(msg: Message, wire: bytes) -> None:
    assert msg.encode() == wire
    assert decode_startup(wire[4:]) == msg
    dec = FrontendDecoder()
    dec.feed(wire)
    assert dec.next() == msg


@pytest.mark.parametrize(("msg", "wire"), BACKEND, ids=_ids(BACKEND))
def test_backend_encode_decode(msg: Message, wire: bytes) -> None:
    assert msg.encode() == wire
    assert decode_backend(wire[0], wire[5:]) == msg
    dec = BackendDecoder()
    dec.feed(wire)
    assert dec.next() == msg
    assert dec.next() is None


def test_startup_message_helpers() -> None:
    m = StartupMessage.build({"user": "alice", "application_name": "x"})
    assert m.user == "alice"
    assert m.database == "alice"  # the server's default
    assert m.major == 3 and m.minor == 0
    assert m.as_dict() == {"user": "alice", "application_name": "x"}
    dup = StartupMessage((("user", "a"), ("user", "b")))
    assert dup.user == "b"  # last one wins, like the server


def test_error_response_helpers() -> None:
    e = ErrorResponse.build("42501", "no", detail="d", hint="h", extra=[("P", "12")])
    assert (e.severity, e.sqlstate, e.message, e.detail, e.hint, e.position) == (
        "ERROR",
        "42501",
        "no",
        "d",
        "h",
        12,
    )
    assert e.get("Z") is None
    localized = ErrorResponse((("S", "FEHLER"), ("V", "ERROR"), ("C", "22012"), ("M", "x")))
    assert localized.severity == "ERROR"  # the non-localized V wins over S
    n = NoticeResponse.build("careful", severity="WARNING")
    assert n.severity == "WARNING" and n.sqlstate == "00000"
    unknown = decode_backend(0x45, b"Zfuture\x00Mm\x00\x00")
    assert isinstance(unknown, ErrorResponse)
    assert unknown.as_dict() == {"Z": "future", "M": "m"}


@pytest.mark.parametrize(
    ("tag", "command", "rows"),
    [
        ("SELECT 3", "SELECT", 3),
        ("INSERT 0 5", "INSERT", 5),
        ("BEGIN", "BEGIN", None),
        ("COPY 10", "COPY", 10),
    ],
)
def test_command_complete_rows(tag: str, command: str, rows: int | None) -> None:
    c = CommandComplete(tag)
    assert (c.command, c.row_count) == (command, rows)


# --- errors.py builders ----------------------------------------------------------------------


def test_error_response_builder_bytes() -> None:
    wire = E.error_response(E.INSUFFICIENT_PRIVILEGE, "denied")
    assert wire == b"E\x00\x00\x00\x22SERROR\x00VERROR\x00C42501\x00Mdenied\x00\x00"
    fatal = E.fatal_response(E.INVALID_PASSWORD, "password authentication failed", hint="h")
    msg = decode_backend(fatal[0], fatal[5:])
    assert isinstance(msg, ErrorResponse)
    assert (msg.severity, msg.sqlstate, msg.message, msg.hint) == (
        "FATAL",
        "28P01",
        "password authentication failed",
        "h",
    )
    pos = E.error_response(E.SYNTAX_ERROR, "syntax error", position=8, detail="d")
    m2 = decode_backend(pos[0], pos[5:])
    assert isinstance(m2, ErrorResponse) and m2.position == 8 and m2.detail == "d"
    stale = E.error_response(
        "0A000", "cached plan must not change result type", routine="RevalidateCachedQuery"
    )
    assert stale.endswith(b"RRevalidateCachedQuery\x00\x00")
    m4 = decode_backend(stale[0], stale[5:])
    assert isinstance(m4, ErrorResponse) and ("R", "RevalidateCachedQuery") in m4.fields
    note = E.notice_response("hello", severity="WARNING")
    m3 = decode_backend(note[0], note[5:])
    assert isinstance(m3, NoticeResponse) and m3.severity == "WARNING"
    assert E.RATE_LIMITED == "53400"


@pytest.mark.parametrize(
    "call",
    [
        lambda: E.error_response("4250", "x"),
        lambda: E.error_response("42501", "x", severity="NOTICE"),
        lambda: E.error_response("42501", "a\x00b"),
        lambda: E.notice_response("x", severity="ERROR"),
    ],
)
def test_error_builder_misuse(call) -> None:
    with pytest.raises(LocalProtocolError):
        call()


# --- encode misuse is LocalProtocolError ------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Query("a\x00b"),
        Query("\ud800"),
        Parse("", "x", (-1,)),
        Parse("", "x", (2**32,)),
        Bind(params=(None,) * 70000),
        Bind(param_formats=(40000,)),
        Describe("X", ""),  # type: ignore[arg-type]
        Close("", ""),  # type: ignore[arg-type]
        Execute("", -1),
        ReadyForQuery("X"),  # type: ignore[arg-type]
        AuthenticationMD5Password(b"abc"),
        AuthenticationSASL(("",)),
        CancelRequest(1, b"abc"),
        CancelRequest(1, b"x" * 257),
        CancelRequest(2**31, b"abcd"),
        BackendKeyData(1, b""),
        StartupMessage((("", "x"),)),
        StartupMessage((("user", "a\x00"),)),
        ErrorResponse((("SS", "x"),)),
        ErrorResponse((("\x00", "x"),)),
        RowDescription((FieldDescription("c", type_size=40000),)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_encode_misuse(msg: Message) -> None:
    with pytest.raises(LocalProtocolError):
        msg.encode()


# --- malformed payloads are ProtocolViolation -----------------------------------------------

BAD_FRONTEND = [
    (b"Q", b"SELECT 1"),  # no terminator
    (b"Q", b"a\x00b\x00"),  # embedded NUL
    (b"Q", b""),
    (b"S", b"x"),  # Sync has no body
    (b"X", b"\x00"),
    (b"D", b"X\x00"),  # bad kind
    (b"D", b""),
    (b"C", b"Sname"),
    (b"P", b"\x00\x00\x00\x01"),  # one param type declared, none present
    (b"P", b"\x00\x00\x00\x00junk"),  # trailing bytes
    (b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
    (b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),  # value overruns
    (b"B", b"\x00\x00"),  # truncated
    (b"E", b"\x00\x00\x00"),
    (b"F", b"\x00\x00\x00\x01"),
    (b"f", b"x"),
    (b"c", b"x"),
]


@pytest.mark.parametrize(("t", "payload"), BAD_FRONTEND)
def test_bad_frontend_payload(t: bytes, payload: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode_frontend(t[0], payload)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("password", b"pw"),
        ("password", b"p\x00w\x00"),
        ("sasl_initial", b"SCRAM-SHA-256\x00\x00\x00\x00\x05ab"),
        ("sasl_initial", b"SCRAM-SHA-256\x00\xff\xff\xff\xfe"),
        ("sasl_initial", b"SCRAM-SHA-256"),
        ("sasl_initial", b"M\x00\xff\xff\xff\xffextra"),
    ],
)
def test_bad_auth_response(kind, payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        AuthResponse(payload).interpret(kind)


BAD_BACKEND = [
    (b"Z", b"X"),
    (b"Z", b"II"),
    (b"Z", b""),
    (b"R", b"\x00\x00\x00\x63"),  # unknown auth code
    (b"R", b"\x00\x00"),
    (b"R", b"\x00\x00\x00\x00x"),  # Ok with a body
    (b"R", b"\x00\x00\x00\x05abc"),  # short MD5 salt
    (b"R", b"\x00\x00\x00\x0aSCRAM"),  # unterminated mechanism list
    (b"K", b"\x00\x00\x00\x01abc"),  # key too short
    (b"K", b"\x00\x00\x00\x01" + b"k" * 257),
    (b"D", b"\x00\x01\x00\x00\x00\x09abc"),
    (b"D", b"\x00\x01\xff\xff\xff\xf0"),
    (b"D", b"\x00\x02\xff\xff\xff\xff"),
    (b"T", b"\x00\x01id\x00\x00\x00"),
    (b"E", b"SERROR\x00"),  # no final terminator
    (b"E", b""),
    (b"C", b"SELECT"),
    (b"I", b"\x00"),
    (b"G", b"\x00\x00\x01"),
    (b"G", b"\xff\x00\x00"),
    (b"V", b"\xff\xff\xff\xfe"),
    (b"v", b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00"),
    (b"S", b"name\x00"),
    (b"A", b"\x00\x00\x00\x01ch\x00"),
    (b"t", b"\x00\x02\x00\x00\x00\x17"),
]


@pytest.mark.parametrize(("t", "payload"), BAD_BACKEND)
def test_bad_backend_payload(t: bytes, payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_backend(t[0], payload)


@pytest.mark.parametrize(
    ("body", "sqlstate"),
    [
        (b"\x00\x02\x00\x00user\x00u\x00\x00", "0A000"),  # protocol 2.0
        (b"\x00\x04\x00\x00\x00", "0A000"),  # protocol 4.0
        (b"\x00\x03\x00\x00user\x00u\x00", "08P01"),  # no final NUL
        (b"\x00\x03\x00\x00user\x00u\x00\x00x", "08P01"),  # trailing
        (b"\x00\x03\x00\x00user\x00", "08P01"),  # name without value
        (b"\x04\xd2\x16\x2fxxxx", "08P01"),  # SSLRequest with a body
        (b"\x04\xd2\x16\x30x", "08P01"),
        (b"\x04\xd2\x16\x2e\x00\x00\x00\x01ab", "08P01"),  # cancel key too short
        (b"\x04\xd2\x16\x2e\x00\x00\x00\x01" + b"k" * 257, "08P01"),
        (b"\x04\xd2", "08P01"),
    ],
)
def test_bad_startup(body: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode_startup(body)
    assert info.value.sqlstate == sqlstate


def test_unknown_type_codes() -> None:
    with pytest.raises(ProtocolViolation):
        decode_frontend(ord("Z"), b"")
    with pytest.raises(ProtocolViolation):
        decode_backend(ord("Q"), b"")


def test_surrogateescape_round_trip() -> None:
    # Non-UTF-8 bytes (a LATIN1 client) survive decode/encode unchanged.
    wire = b"Q\x00\x00\x00\x0bSEL\xe9CT\x00"
    msg = decode_frontend(wire[0], wire[5:])
    assert msg.encode() == wire
