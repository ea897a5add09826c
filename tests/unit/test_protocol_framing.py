"""Framing: startup variants, splits, limits, poison, EOF, raw modes. Bytes only."""

from __future__ import annotations

import pytest

from sqlproxy.protocol.errors import LocalProtocolError, ProtocolViolation
from sqlproxy.protocol.framing import (
    HARD_MESSAGE_LIMIT,
    BackendDecoder,
    FrontendDecoder,
    is_tls_client_hello,
)
from sqlproxy.protocol.messages import (
    AuthenticationOk,
    AuthenticationSASL,
    AuthResponse,
    BackendKeyData,
    Bind,
    CancelRequest,
    CommandComplete,
    DataRow,
    Describe,
    ErrorResponse,
    Execute,
    GSSENCRequest,
    GSSENCResponse,
    ParameterStatus,
    Parse,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SSLRequest,
    SSLResponse,
    StartupMessage,
    Sync,
    Terminate,
)

STARTUP = StartupMessage((("user", "alice"), ("database", "db")))
CLIENT_MSGS = [
    STARTUP,
    Query("SELECT 1"),
    Parse("", "SELECT $1", (23,)),
    Bind("", "", (0,), (b"42",), ()),
    Describe("P", ""),
    Execute("", 0),
    Sync(),
    Terminate(),
]
CLIENT_STREAM = b"".join(m.encode() for m in CLIENT_MSGS)

SERVER_MSGS = [
    AuthenticationOk(),
    ParameterStatus("server_version", "15.0"),
    BackendKeyData(99, b"abcd"),
    ReadyForQuery("I"),
    RowDescription(()),
    DataRow((b"1",)),
    DataRow((None,)),
    CommandComplete("SELECT 2"),
    ReadyForQuery("I"),
]
SERVER_STREAM = b"".join(m.encode() for m in SERVER_MSGS)


def drain(dec: FrontendDecoder | BackendDecoder) -> list[object]:
    return list(dec)


# --- splits ----------------------------------------------------------------------------------


def test_frontend_one_feed() -> None:
    dec = FrontendDecoder()
    dec.feed(CLIENT_STREAM)
    assert drain(dec) == CLIENT_MSGS
    assert dec.buffered == 0


def test_frontend_byte_by_byte() -> None:
    dec = FrontendDecoder()
    got = []
    for i in range(len(CLIENT_STREAM)):
        dec.feed(CLIENT_STREAM[i : i + 1])
        got.extend(drain(dec))
    assert got == CLIENT_MSGS


def test_backend_byte_by_byte() -> None:
    dec = BackendDecoder()
    got = []
    for i in range(len(SERVER_STREAM)):
        dec.feed(memoryview(SERVER_STREAM)[i : i + 1])
        got.extend(drain(dec))
    assert got == SERVER_MSGS


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 6, 27, 28, 40])
def test_frontend_two_chunks(cut: int) -> None:
    dec = FrontendDecoder()
    dec.feed(CLIENT_STREAM[:cut])
    first = drain(dec)
    dec.feed(CLIENT_STREAM[cut:])
    assert first + drain(dec) == CLIENT_MSGS


# --- startup phase ---------------------------------------------------------------------------


def test_ssl_then_startup() -> None:
    dec = FrontendDecoder()
    dec.feed(SSLRequest().encode())
    assert dec.next() == SSLRequest()
    assert dec.in_startup
    dec.feed(STARTUP.encode())
    assert dec.next() == STARTUP
    assert not dec.in_startup


def test_gss_refused_then_ssl_then_startup() -> None:
    dec = FrontendDecoder()
    for m in (GSSENCRequest(), SSLRequest(), STARTUP):
        dec.feed(m.encode())
        assert dec.next() == m


@pytest.mark.parametrize("first", [SSLRequest(), GSSENCRequest()])
def test_data_after_encryption_request_is_refused(first) -> None:
    # CVE-2021-23214: bytes pipelined before the TLS handshake could be injected.
    dec = FrontendDecoder()
    dec.feed(first.encode() + STARTUP.encode())
    with pytest.raises(ProtocolViolation, match="unencrypted"):
        dec.next()


@pytest.mark.parametrize("req", [SSLRequest(), GSSENCRequest()])
def test_duplicate_encryption_request(req) -> None:
    dec = FrontendDecoder()
    dec.feed(req.encode())
    assert dec.next() == req
    dec.feed(req.encode())
    with pytest.raises(ProtocolViolation, match="duplicate"):
        dec.next()


def test_cancel_request_ends_the_stream() -> None:
    dec = FrontendDecoder()
    cancel = CancelRequest(7, b"k" * 32)
    dec.feed(cancel.encode())
    assert dec.next() == cancel
    assert dec.next() is None
    dec.feed(b"x")
    with pytest.raises(ProtocolViolation):
        dec.next()


def test_data_after_terminate() -> None:
    dec = FrontendDecoder(startup=False)
    dec.feed(Terminate().encode())
    assert dec.next() == Terminate()
    assert dec.next() is None
    dec.feed(Sync().encode())
    with pytest.raises(ProtocolViolation):
        dec.next()


@pytest.mark.parametrize(
    "header",
    [
        b"\x80\x00\x00\x00",  # 2 GiB
        b"\xff\xff\xff\xff",
        b"\x00\x00\x27\x11",  # 10001 > startup limit
        b"\x00\x00\x00\x00",
        b"\x00\x00\x00\x07",  # shorter than length + code
    ],
)
def test_startup_length_refused_from_header_alone(header: bytes) -> None:
    dec = FrontendDecoder()
    dec.feed(header)
    with pytest.raises(ProtocolViolation) as info:
        dec.next()
    assert info.value.sqlstate == "08P01"


def test_startup_limit_is_configurable() -> None:
    big = StartupMessage((("user", "u"), ("options", "x" * 200))).encode()
    dec = FrontendDecoder(max_startup_length=100)
    dec.feed(big[:4])
    with pytest.raises(ProtocolViolation):
        dec.next()
    dec2 = FrontendDecoder(max_startup_length=8 << 20)
    dec2.feed(big)
    assert isinstance(dec2.next(), StartupMessage)


def test_direct_tls_detected() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert is_tls_client_hello(hello)
    assert not is_tls_client_hello(STARTUP.encode())
    assert not is_tls_client_hello(b"\x16")
    dec = FrontendDecoder()
    dec.feed(hello)
    with pytest.raises(ProtocolViolation) as info:
        dec.next()
    assert info.value.sqlstate == "0A000"


def test_raw_read_during_startup_is_misuse() -> None:
    dec = FrontendDecoder()
    dec.feed(STARTUP.encode())
    with pytest.raises(LocalProtocolError):
        dec.next_raw()
    with pytest.raises(LocalProtocolError):
        dec.next_frame()
    with pytest.raises(LocalProtocolError):
        dec.take_frames_until(())


# --- typed-phase limits ----------------------------------------------------------------------


def test_two_gigabyte_declared_length_refused_before_buffering() -> None:
    dec = FrontendDecoder(startup=False)
    dec.feed(b"Q\x80\x00\x00\x00")
    assert dec.buffered == 5
    with pytest.raises(ProtocolViolation) as info:
        dec.next()
    assert info.value.sqlstate == "08P01"


def test_configured_limit_gives_program_limit_exceeded() -> None:
    dec = FrontendDecoder(startup=False, max_message_length=8 << 20)
    dec.feed(b"Q" + ((8 << 20) + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolViolation) as info:
        dec.next()
    assert info.value.sqlstate == "54000"
    at_limit = FrontendDecoder(startup=False, max_message_length=16)
    at_limit.feed(Query("x" * 11).encode())  # length 16
    assert at_limit.next() == Query("x" * 11)
    at_limit.feed(Query("x" * 12).encode())
    with pytest.raises(ProtocolViolation):
        at_limit.next()


def test_backend_limit() -> None:
    dec = BackendDecoder(max_message_length=1024)
    dec.feed(b"D\x00\x00\x04\x01")
    with pytest.raises(ProtocolViolation) as info:
        dec.next_frame()
    assert info.value.sqlstate == "54000"


@pytest.mark.parametrize("t", [b"S", b"H", b"X", b"D", b"C", b"E", b"c", b"f"])
def test_small_message_types_capped(t: bytes) -> None:
    dec = FrontendDecoder(startup=False)
    dec.feed(t + (20000).to_bytes(4, "big"))
    with pytest.raises(ProtocolViolation):
        dec.next()


def test_auth_response_capped() -> None:
    dec = FrontendDecoder(startup=False)
    dec.feed(b"p" + (70000).to_bytes(4, "big"))
    with pytest.raises(ProtocolViolation):
        dec.next()


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("side", ["frontend", "backend"])
def test_lengths_below_four(n: int, side: str) -> None:
    dec = FrontendDecoder(startup=False) if side == "frontend" else BackendDecoder()
    dec.feed(b"d" + n.to_bytes(4, "big"))
    with pytest.raises(ProtocolViolation):
        dec.next()


@pytest.mark.parametrize("t", [b"\x00", b"?", b"Z", b"T", b"1", b"\xff"])
def test_unknown_frontend_type(t: bytes) -> None:
    dec = FrontendDecoder(startup=False)
    dec.feed(t + b"\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation, match="message type"):
        dec.next()


@pytest.mark.parametrize("t", [b"\x00", b"Q", b"P", b"B", b"X", b"p"])
def test_unknown_backend_type(t: bytes) -> None:
    dec = BackendDecoder()
    dec.feed(t + b"\x00\x00\x00\x04")
    with pytest.raises(ProtocolViolation, match="message type"):
        dec.next()


def test_unknown_type_refused_from_the_first_byte_of_a_header() -> None:
    # Rejected once the 5-byte header is in, however large the declared body.
    dec = FrontendDecoder(startup=False)
    dec.feed(b"?\x10\x00\x00\x00")
    with pytest.raises(ProtocolViolation):
        dec.next()


def test_decoder_is_poisoned_after_a_violation() -> None:
    dec = FrontendDecoder(startup=False)
    dec.feed(b"Q\x00\x00\x00\x05x")  # no NUL terminator
    with pytest.raises(ProtocolViolation) as first:
        dec.next()
    dec.feed(Sync().encode())
    for call in (dec.next, dec.next_raw, dec.next_frame):
        with pytest.raises(ProtocolViolation) as again:
            call()
        assert again.value is first.value


def test_limits_validated() -> None:
    with pytest.raises(LocalProtocolError):
        FrontendDecoder(max_message_length=HARD_MESSAGE_LIMIT + 1)
    with pytest.raises(LocalProtocolError):
        BackendDecoder(max_message_length=4)
    with pytest.raises(LocalProtocolError):
        FrontendDecoder(max_startup_length=7)


# --- EOF -------------------------------------------------------------------------------------


def test_eof_mid_message() -> None:
    dec = BackendDecoder()
    dec.feed(SERVER_STREAM[:-1])
    drain(dec)
    dec.feed_eof()
    with pytest.raises(ProtocolViolation, match="closed"):
        dec.next()
    with pytest.raises(LocalProtocolError):
        dec.feed(b"I")


def test_eof_mid_header_and_mid_startup() -> None:
    dec = FrontendDecoder()
    dec.feed(b"\x00\x00")
    assert dec.next() is None
    dec.feed_eof()
    with pytest.raises(ProtocolViolation):
        dec.next()


def test_eof_at_boundary() -> None:
    dec = BackendDecoder()
    dec.feed(SERVER_STREAM)
    dec.feed_eof()
    assert drain(dec) == SERVER_MSGS
    assert dec.next() is None


# --- raw modes -------------------------------------------------------------------------------


def test_next_raw_and_next_frame() -> None:
    dec = BackendDecoder()
    dec.feed(SERVER_STREAM)
    frames = []
    while (f := dec.next_frame()) is not None:
        frames.append(f)
    assert [t for t, _ in frames] == [m.encode()[0] for m in SERVER_MSGS]
    assert b"".join(b for _, b in frames) == SERVER_STREAM
    dec2 = BackendDecoder()
    dec2.feed(SERVER_STREAM)
    raws = []
    while (r := dec2.next_raw()) is not None:
        raws.append(r)
    assert raws == [(m.encode()[0], m.encode()[5:]) for m in SERVER_MSGS]


def test_take_frames_until_stops_before_stop_types() -> None:
    rows = DataRow((b"1",)).encode() * 3
    tail = CommandComplete("SELECT 3").encode() + ReadyForQuery("T").encode()
    dec = BackendDecoder()
    dec.feed(rows + tail)
    stop = frozenset({ord("Z"), ord("E")})
    assert dec.take_frames_until(stop) == rows + CommandComplete("SELECT 3").encode()
    assert dec.taken == 4
    assert dec.take_frames_until(stop) == b""
    assert dec.taken == 0
    assert dec.next() == ReadyForQuery("T")
    assert dec.take_frames_until(stop) == b""


def test_take_frames_until_leaves_incomplete_message() -> None:
    row = DataRow((b"abc",)).encode()
    dec = BackendDecoder()
    dec.feed(row + row[:7])
    assert dec.take_frames_until(()) == row
    assert dec.buffered == 7
    dec.feed(row[7:])
    assert dec.take_frames_until(()) == row


def test_take_frames_until_hands_over_good_prefix_before_a_bad_header() -> None:
    row = DataRow((b"abc",)).encode()
    dec = BackendDecoder()
    dec.feed(row + b"Q\x00\x00\x00\x04")
    assert dec.take_frames_until(()) == row
    with pytest.raises(ProtocolViolation):
        dec.take_frames_until(())


def test_mixed_raw_and_typed_reads() -> None:
    dec = FrontendDecoder()
    dec.feed(CLIENT_STREAM)
    assert dec.next() == STARTUP
    t, payload = dec.next_raw() or (0, b"")
    assert (t, payload) == (ord("Q"), b"SELECT 1\x00")
    assert dec.next() == CLIENT_MSGS[2]
    assert dec.take_frames_until(frozenset({ord("S")})) == b"".join(m.encode() for m in CLIENT_MSGS[3:6])
    assert dec.next() == Sync()


# --- authentication responses and encryption replies -----------------------------------------


def test_auth_response_expectation() -> None:
    wire = SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x").encode()
    dec = FrontendDecoder(startup=False)
    dec.feed(wire)
    assert dec.next() == AuthResponse(wire[5:])
    dec.expect_auth_response("sasl_initial")
    dec.feed(wire)
    assert dec.next() == SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x")
    dec.feed(b"p\x00\x00\x00\x05x")  # not a valid SASLInitialResponse
    with pytest.raises(ProtocolViolation):
        dec.next()


@pytest.mark.parametrize(
    ("kind", "byte", "expected"),
    [
        ("ssl", b"S", SSLResponse(True)),
        ("ssl", b"N", SSLResponse(False)),
        ("gss", b"G", GSSENCResponse(True)),
        ("gss", b"N", GSSENCResponse(False)),
    ],
)
def test_encryption_response(kind, byte: bytes, expected) -> None:
    dec = BackendDecoder()
    dec.expect_encryption_response(kind)
    assert dec.next() is None
    dec.feed(byte)
    assert dec.next() == expected
    assert expected.encode() == byte
    dec.feed(AuthenticationSASL(("SCRAM-SHA-256",)).encode())
    if byte == b"N":
        assert dec.next() == AuthenticationSASL(("SCRAM-SHA-256",))


def test_encryption_accepted_with_trailing_plaintext_is_refused() -> None:
    dec = BackendDecoder()
    dec.expect_encryption_response("ssl")
    dec.feed(b"SR\x00\x00\x00\x08\x00\x00\x00\x00")
    with pytest.raises(ProtocolViolation, match="unencrypted"):
        dec.next()


def test_encryption_refused_by_error_response() -> None:
    err = ErrorResponse.build("08P01", "unsupported", severity="FATAL")
    dec = BackendDecoder()
    dec.expect_encryption_response("ssl")
    dec.feed(err.encode())
    assert dec.next() == err


def test_encryption_response_garbage_and_misuse() -> None:
    dec = BackendDecoder()
    dec.expect_encryption_response("gss")
    with pytest.raises(LocalProtocolError):
        dec.next_raw()
    dec.feed(b"S")  # 'S' answers SSL, not GSS
    with pytest.raises(ProtocolViolation):
        dec.next()
