"""Property tests: round trips for generated messages, split invariance, and the guarantee that
arbitrary or mutated bytes only ever raise ProtocolViolation and never loop forever."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlproxy.protocol.errors import ProtocolViolation
from sqlproxy.protocol.framing import BackendDecoder, FrontendDecoder
from sqlproxy.protocol.messages import (
    FRONTEND_TYPES,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    AuthenticationCleartextPassword,
    AuthenticationGSSContinue,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthResponse,
    BackendKeyData,
    BackendMessage,
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
    FrontendMessage,
    FunctionCall,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PortalSuspended,
    Query,
    ReadyForQuery,
    RowDescription,
    StartupMessage,
    Sync,
    Terminate,
)
from sqlproxy.protocol.session_state import SessionState

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
name = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
blob = st.binary(max_size=24)
value = st.none() | blob
values = st.lists(value, max_size=5).map(tuple)
i16 = st.integers(-(2**15), 2**15 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
fmts = st.lists(st.integers(0, 1), max_size=4).map(tuple)
key = st.binary(min_size=4, max_size=256)

frontend_msgs: st.SearchStrategy[FrontendMessage] = st.one_of(
    st.builds(Query, text),
    st.builds(Parse, text, text, st.lists(u32, max_size=4).map(tuple)),
    st.builds(Bind, text, text, fmts, values, fmts),
    st.builds(Describe, st.sampled_from(["S", "P"]), text),
    st.builds(Execute, text, u32),
    st.builds(Close, st.sampled_from(["S", "P"]), text),
    st.just(Sync()),
    st.just(Flush()),
    st.builds(CopyData, blob),
    st.just(CopyDone()),
    st.builds(CopyFail, text),
    st.builds(FunctionCall, u32, fmts, values, i16),
    st.builds(AuthResponse, blob),
)

fields = st.lists(st.tuples(st.sampled_from("SVCMDHPqWFLRxy"), text), max_size=6).map(tuple)
field_desc = st.builds(FieldDescription, text, u32, i16, u32, i16, i32, i16)

backend_msgs: st.SearchStrategy[BackendMessage] = st.one_of(
    st.just(AuthenticationOk()),
    st.just(AuthenticationCleartextPassword()),
    st.builds(AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(AuthenticationSASL, st.lists(name, max_size=3).map(tuple)),
    st.builds(AuthenticationSASLContinue, blob),
    st.builds(AuthenticationSASLFinal, blob),
    st.builds(AuthenticationGSSContinue, blob),
    st.builds(BackendKeyData, i32, key),
    st.builds(ParameterStatus, text, text),
    st.builds(ReadyForQuery, st.sampled_from(["I", "T", "E"])),
    st.builds(RowDescription, st.lists(field_desc, max_size=3).map(tuple)),
    st.builds(DataRow, values),
    st.builds(CommandComplete, text),
    st.just(EmptyQueryResponse()),
    st.builds(ErrorResponse, fields),
    st.builds(NoticeResponse, fields),
    st.just(ParseComplete()),
    st.just(BindComplete()),
    st.just(CloseComplete()),
    st.just(NoData()),
    st.just(PortalSuspended()),
    st.builds(ParameterDescription, st.lists(u32, max_size=4).map(tuple)),
    st.builds(NotificationResponse, i32, text, text),
    st.builds(CopyInResponse, st.integers(0, 1), fmts),
    st.builds(CopyOutResponse, st.integers(0, 1), fmts),
    st.builds(CopyBothResponse, st.integers(0, 1), fmts),
    st.builds(CopyData, blob),
    st.just(CopyDone()),
    st.builds(NegotiateProtocolVersion, u32, st.lists(text, max_size=3).map(tuple)),
    st.builds(FunctionCallResponse, value),
)

startup_msgs = st.one_of(
    st.builds(
        StartupMessage,
        st.lists(st.tuples(name, text), max_size=4).map(tuple),
        st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_2]),
    ),
    st.builds(CancelRequest, i32, key),
)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def decode_all(dec: FrontendDecoder | BackendDecoder, chunks: list[bytes]) -> list[object]:
    got: list[object] = []
    for chunk in chunks:
        dec.feed(chunk)
        got.extend(dec)
    return got


@given(st.lists(frontend_msgs, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
def test_frontend_round_trip_any_split(msgs: list[FrontendMessage], cuts: list[int]) -> None:
    wire = b"".join(m.encode() for m in msgs)
    assert decode_all(FrontendDecoder(startup=False), splits(wire, cuts)) == msgs
    assert b"".join(m.encode() for m in msgs) == wire


@given(st.lists(backend_msgs, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
def test_backend_round_trip_any_split(msgs: list[BackendMessage], cuts: list[int]) -> None:
    wire = b"".join(m.encode() for m in msgs)
    assert decode_all(BackendDecoder(), splits(wire, cuts)) == msgs


@given(startup_msgs, st.lists(frontend_msgs, max_size=4), st.lists(st.integers(0, 1000), max_size=4))
def test_startup_round_trip(first, msgs: list[FrontendMessage], cuts: list[int]) -> None:
    wire = first.encode()
    if isinstance(first, StartupMessage):
        wire += b"".join(m.encode() for m in msgs)
        expected = [first, *msgs]
    else:
        expected = [first]
    assert decode_all(FrontendDecoder(), splits(wire, cuts)) == expected


@given(st.lists(backend_msgs, max_size=10), st.frozensets(st.sampled_from(b"ZECTDGHdR")))
def test_take_frames_until_agrees_with_next_frame(msgs: list[BackendMessage], stop: frozenset[int]) -> None:
    wire = b"".join(m.encode() for m in msgs)
    dec = BackendDecoder()
    dec.feed(wire)
    out = b""
    while True:
        chunk = dec.take_frames_until(stop)
        out += chunk
        frame = dec.next_frame()
        if frame is None:
            break
        assert frame[0] in stop
        out += frame[1]
    assert out == wire


def run_to_end(dec: FrontendDecoder | BackendDecoder, chunks: list[bytes]) -> None:
    """Feed everything; only ProtocolViolation may escape. Each next() that returns a message
    consumes at least one byte, so the loop is bounded by the input size."""
    total = sum(len(c) for c in chunks)
    steps = 0
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while dec.next() is not None:
                steps += 1
                assert steps <= total
        dec.feed_eof()
        dec.next()
    except ProtocolViolation:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.lists(st.integers(0, 1000), max_size=4), st.booleans())
def test_random_bytes_frontend(data: bytes, cuts: list[int], startup: bool) -> None:
    run_to_end(FrontendDecoder(startup=startup), splits(data, cuts))


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(0, 1000), max_size=4))
def test_random_bytes_backend(data: bytes, cuts: list[int]) -> None:
    run_to_end(BackendDecoder(), splits(data, cuts))


@settings(max_examples=300)
@given(
    st.lists(frontend_msgs, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(["password", "sasl_initial", "sasl", "gss", None]),
)
def test_mutated_frontend_stream(msgs: list[FrontendMessage], flips, auth_kind) -> None:
    wire = bytearray(b"".join(m.encode() for m in msgs))
    for pos, byte in flips:
        wire[pos % len(wire)] = byte
    dec = FrontendDecoder(startup=False)
    dec.expect_auth_response(auth_kind)
    run_to_end(dec, [bytes(wire)])


@settings(max_examples=300)
@given(
    st.lists(backend_msgs, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_backend_stream(msgs: list[BackendMessage], flips) -> None:
    wire = bytearray(b"".join(m.encode() for m in msgs))
    for pos, byte in flips:
        wire[pos % len(wire)] = byte
    run_to_end(BackendDecoder(), [bytes(wire)])


@settings(max_examples=200)
@given(startup_msgs, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3))
def test_mutated_startup(first, flips) -> None:
    wire = bytearray(first.encode() + Query("SELECT 1").encode() + Terminate().encode())
    for pos, byte in flips:
        wire[pos % len(wire)] = byte
    run_to_end(FrontendDecoder(), [bytes(wire)])


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(b"QPBDESHXdcfFpZECGHWTRKNA")), max_size=30))
def test_session_state_only_raises_protocol_violation(events) -> None:
    state = SessionState()
    state.client_sent_startup(StartupMessage((("user", "u"),)))
    payloads = {ord("Z"): b"I", ord("R"): b"\x00\x00\x00\x00", ord("E"): b"SERROR\x00\x00"}
    for from_client, t in events:
        try:
            if from_client:
                state.client_sent(t)
            else:
                state.server_sent(t, payloads.get(t, b""))
        except ProtocolViolation:
            pass
        assert state.pending_ready >= 0


# -- the raw paths the wire session reads with ------------------------------------------------
# WireSession reads client messages with next_raw() (and next_frame() while relaying COPY), not
# with next(); the properties above exercise next(). These give the raw readers the same random
# and mutated bytes: only ProtocolViolation escapes, every call that returns consumes bytes, and
# what comes out is exactly the input, frame by frame, up to the first bad header.

readers = st.lists(st.sampled_from(["raw", "frame", "until"]), min_size=1, max_size=8)


def run_raw(dec: FrontendDecoder, chunks: list[bytes], order: list[str]) -> bytes:
    """Feed ``chunks``, reading with the raw readers in ``order`` (cycled); return the bytes
    of every frame handed out, re-framed, in order."""
    out = bytearray()
    total = sum(len(c) for c in chunks)
    steps = 0
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while True:
                how = order[steps % len(order)]
                steps += 1
                assert steps <= 2 * total + 2 * len(chunks) + 2
                if how == "until":
                    block = dec.take_frames_until({ord("Q")})
                    if block:
                        out += block
                        continue
                    how = "frame"
                if how == "raw":
                    raw = dec.next_raw()
                    if raw is None:
                        break
                    out += bytes([raw[0]]) + (len(raw[1]) + 4).to_bytes(4, "big") + raw[1]
                else:
                    fr = dec.next_frame()
                    if fr is None:
                        break
                    assert fr[1][0] == fr[0]
                    out += fr[1]
        dec.feed_eof()
        assert dec.next_raw() is None
    except ProtocolViolation:
        pass
    return bytes(out)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=4), readers)
def test_random_bytes_frontend_raw_readers(data: bytes, cuts: list[int], order: list[str]) -> None:
    out = run_raw(FrontendDecoder(startup=False, max_message_length=1024), splits(data, cuts), order)
    assert data.startswith(out)


@settings(max_examples=300)
@given(
    st.lists(frontend_msgs, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.lists(st.integers(0, 1000), max_size=4),
    readers,
)
def test_mutated_frontend_stream_raw_readers(
    msgs: list[FrontendMessage], flips, cuts: list[int], order: list[str]
) -> None:
    wire = bytearray(b"".join(m.encode() for m in msgs))
    for pos, byte in flips:
        wire[pos % len(wire)] = byte
    data = bytes(wire)
    out = run_raw(FrontendDecoder(startup=False), splits(data, cuts), order)
    assert data.startswith(out)


@given(st.sampled_from(sorted(FRONTEND_TYPES)), st.integers(5, 2**32 - 1), st.integers(5, 1 << 20))
def test_oversized_length_is_refused_from_the_header_alone(t: int, n: int, limit: int) -> None:
    """A declared length over the limit is refused as soon as the 5-byte header is in, before
    any payload: a client cannot make the proxy wait for (or buffer) a 2 GB message."""
    dec = FrontendDecoder(startup=False, max_message_length=limit)
    dec.feed(bytes([t]) + n.to_bytes(4, "big"))
    if n <= min(limit, dec._limits[t]):
        assert dec.next_raw() is None  # a legal length: wait for the payload
        return
    try:
        dec.next_raw()
    except ProtocolViolation as e:
        assert e.sqlstate in ("08P01", "54000")
    else:
        raise AssertionError(f"length {n} over limit {limit} for type {t!r} was not refused")


@given(st.integers(0, 2**32 - 1), st.binary(max_size=8))
def test_startup_length_is_checked_before_the_body(n: int, rest: bytes) -> None:
    dec = FrontendDecoder()
    dec.feed(n.to_bytes(4, "big") + rest)
    try:
        msg = dec.next()
    except ProtocolViolation:
        assert not 8 <= n <= dec.max_startup_length or len(rest) >= n - 4
        return
    assert 8 <= n <= dec.max_startup_length
    if len(rest) < n - 4:
        assert msg is None
