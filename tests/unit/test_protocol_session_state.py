"""SessionState: table-driven conversations, each step with the phase expected after it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sqlproxy.protocol.errors import LocalProtocolError, ProtocolViolation
from sqlproxy.protocol.messages import (
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    ParameterStatus,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
)
from sqlproxy.protocol.session_state import Phase, SessionState

P = Phase


def rfq(status: str = "I") -> tuple[str, str, bytes]:
    return ("s", "Z", status.encode())


ERR = ("s", "E", b"SERROR\x00VERROR\x00C42601\x00Mx\x00\x00")
FATAL = ("s", "E", b"SFATAL\x00VFATAL\x00C57P01\x00Mbye\x00\x00")


def c(t: str) -> tuple[str, str, bytes]:
    return ("c", t, b"")


def s(t: str) -> tuple[str, str, bytes]:
    return ("s", t, b"")


def phase_of(st: SessionState) -> Phase:
    return st.phase


def ready_state() -> SessionState:
    st = SessionState()
    st.client_sent_startup(StartupMessage((("user", "u"),)))
    st.server_sent_message(AuthenticationOk())
    st.server_sent_message(ReadyForQuery("I"))
    assert st.phase is P.READY
    return st


def play(st: SessionState, steps: list[tuple[tuple[str, str, bytes], Phase]]) -> None:
    for i, ((who, t, payload), phase) in enumerate(steps):
        if who == "c":
            st.client_sent(ord(t))
        else:
            st.server_sent(ord(t), payload)
        assert st.phase is phase, f"step {i}: {who} {t!r}"


CONVERSATIONS: dict[str, list[tuple[tuple[str, str, bytes], Phase]]] = {
    "simple query": [
        (c("Q"), P.SIMPLE_QUERY),
        (s("T"), P.SIMPLE_QUERY),
        (s("D"), P.SIMPLE_QUERY),
        (s("C"), P.SIMPLE_QUERY),
        (rfq(), P.READY),
    ],
    "simple query error": [(c("Q"), P.SIMPLE_QUERY), (ERR, P.SIMPLE_QUERY), (rfq(), P.READY)],
    "extended batch": [
        (c("P"), P.EXTENDED),
        (c("B"), P.EXTENDED),
        (c("D"), P.EXTENDED),
        (c("E"), P.EXTENDED),
        (c("S"), P.EXTENDED),
        (s("1"), P.EXTENDED),
        (s("2"), P.EXTENDED),
        (s("T"), P.EXTENDED),
        (s("D"), P.EXTENDED),
        (s("C"), P.EXTENDED),
        (rfq("T"), P.READY),
    ],
    "pipelined": [
        (c("Q"), P.SIMPLE_QUERY),
        (c("P"), P.EXTENDED),
        (c("S"), P.SIMPLE_QUERY),
        (c("F"), P.SIMPLE_QUERY),
        (rfq(), P.EXTENDED),
        (rfq(), P.FUNCTION_CALL),
        (rfq(), P.READY),
    ],
    "copy in, simple": [
        (c("Q"), P.SIMPLE_QUERY),
        (s("G"), P.COPY_IN),
        (c("d"), P.COPY_IN),
        (c("d"), P.COPY_IN),
        (c("c"), P.COPY_IN),
        (s("C"), P.SIMPLE_QUERY),
        (rfq(), P.READY),
    ],
    "copy in, extended (libpq sends Sync before knowing it is COPY)": [
        (c("P"), P.EXTENDED),
        (c("B"), P.EXTENDED),
        (c("E"), P.EXTENDED),
        (c("S"), P.EXTENDED),
        (s("1"), P.EXTENDED),
        (s("2"), P.EXTENDED),
        (s("G"), P.COPY_IN),
        (c("d"), P.COPY_IN),
        (c("S"), P.COPY_IN),  # ignored by the server during COPY FROM STDIN
        (c("c"), P.COPY_IN),
        (c("S"), P.COPY_IN),  # this one counts
        (s("C"), P.EXTENDED),
        (rfq(), P.READY),
    ],
    "copy in aborted by server": [
        (c("Q"), P.SIMPLE_QUERY),
        (s("G"), P.COPY_IN),
        (c("d"), P.COPY_IN),
        (ERR, P.SIMPLE_QUERY),
        (c("d"), P.SIMPLE_QUERY),  # ignored by the server; allowed through
        (c("c"), P.SIMPLE_QUERY),
        (rfq(), P.READY),
    ],
    "copy fail": [
        (c("Q"), P.SIMPLE_QUERY),
        (s("G"), P.COPY_IN),
        (c("f"), P.COPY_IN),
        (ERR, P.SIMPLE_QUERY),
        (rfq(), P.READY),
    ],
    "copy out": [
        (c("Q"), P.SIMPLE_QUERY),
        (s("H"), P.COPY_OUT),
        (s("d"), P.COPY_OUT),
        (s("c"), P.SIMPLE_QUERY),
        (s("C"), P.SIMPLE_QUERY),
        (rfq(), P.READY),
    ],
    "copy both": [
        (c("Q"), P.SIMPLE_QUERY),
        (s("W"), P.COPY_BOTH),
        (s("d"), P.COPY_BOTH),
        (c("d"), P.COPY_BOTH),
        (c("c"), P.COPY_BOTH),
        (s("c"), P.SIMPLE_QUERY),
        (rfq(), P.READY),
    ],
    "async messages change nothing": [
        (s("N"), P.READY),
        (s("A"), P.READY),
        (s("S"), P.READY),
        (c("H"), P.READY),
    ],
    "terminate": [(c("X"), P.TERMINATED)],
    "fatal while idle": [(FATAL, P.TERMINATED)],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation(name: str) -> None:
    play(ready_state(), CONVERSATIONS[name])


def test_transaction_status_follows_ready_for_query() -> None:
    st = ready_state()
    assert st.is_idle
    for status in ("T", "E", "I"):
        st.client_sent(ord("Q"))
        st.server_sent(ord("Z"), status.encode())
        assert st.transaction_status == status
        assert st.is_idle is (status == "I")


def test_startup_scram_flow_sets_auth_expectations() -> None:
    st = SessionState()
    assert phase_of(st) is P.STARTUP
    st.client_sent_startup(SSLRequest())
    assert phase_of(st) is P.STARTUP
    st.client_sent_startup(StartupMessage((("user", "u"),)))
    assert phase_of(st) is P.AUTHENTICATING
    with pytest.raises(ProtocolViolation):
        st.client_sent(ord("p"))  # nobody asked yet
    expectations = [
        (AuthenticationSASL(("SCRAM-SHA-256",)), "sasl_initial"),
        (AuthenticationSASLContinue(b"r=..."), "sasl"),
    ]
    for msg, kind in expectations:
        st.server_sent_message(msg)
        assert st.expected_auth_response == kind
        assert st.client_sent(ord("p"))
        assert st.expected_auth_response is None
    st.server_sent_message(AuthenticationSASLFinal(b"v=..."))
    assert st.expected_auth_response is None
    st.server_sent_message(AuthenticationOk())
    assert phase_of(st) is P.STARTING
    st.server_sent_message(ParameterStatus("server_version", "15.4"))
    st.server_sent_message(BackendKeyData(123, b"\x00\x00\x00\x07"))
    st.server_sent_message(ReadyForQuery("I"))
    assert phase_of(st) is P.READY
    assert st.server_parameters == {"server_version": "15.4"}
    assert st.backend_key == (123, b"\x00\x00\x00\x07")


def test_md5_expectation_and_auth_failure_terminates() -> None:
    st = SessionState()
    st.client_sent_startup(StartupMessage((("user", "u"),)))
    st.server_sent_message(AuthenticationMD5Password(b"salt"))
    assert st.expected_auth_response == "password"
    st.client_sent(ord("p"))
    st.server_sent_message(ErrorResponse.build("28P01", "password authentication failed", severity="FATAL"))
    assert st.phase is P.TERMINATED


def test_cancel_request_terminates() -> None:
    st = SessionState()
    st.client_sent_startup(CancelRequest(1, b"abcd"))
    assert st.phase is P.TERMINATED
    with pytest.raises(ProtocolViolation):
        st.client_sent(ord("Q"))


# --- the proxy's own "error -> discard until Sync" ------------------------------------------


def test_fail_batch_discards_until_sync() -> None:
    st = ready_state()
    assert st.client_sent(ord("P"))
    st.fail_batch()  # the proxy denied the Parse and sent its own ErrorResponse
    assert st.discarding
    for t in "BDEHC":
        assert st.client_sent(ord(t)) is False
        assert st.phase is P.EXTENDED
    assert st.client_sent(ord("S")) is True  # the Sync goes through
    assert not st.discarding
    assert st.pending_ready == 1
    st.server_sent(ord("Z"), b"I")  # forwarded or synthesized
    assert st.phase is P.READY


def test_fail_batch_outside_batch_is_misuse() -> None:
    st = ready_state()
    with pytest.raises(LocalProtocolError):
        st.fail_batch()
    st.client_sent(ord("Q"))
    with pytest.raises(LocalProtocolError):
        st.fail_batch()


def test_terminate_while_discarding() -> None:
    st = ready_state()
    st.client_sent(ord("B"))
    st.fail_batch()
    assert st.client_sent(ord("X"))
    assert st.phase is P.TERMINATED


# --- violations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [
        [c("Q")],  # before startup
    ],
)
def test_query_before_startup(steps) -> None:
    with pytest.raises(ProtocolViolation):
        play(SessionState(), [(st, P.STARTUP) for st in steps])


def test_violations_when_ready() -> None:
    cases: list[Callable[[SessionState], object]] = [
        lambda st: st.server_sent(ord("Z"), b"I"),  # nothing pending
        lambda st: st.server_sent(ord("Z"), b"X"),
        lambda st: st.server_sent(ord("G")),  # a second COPY response while in COPY OUT
        lambda st: st.client_sent(ord("p")),
        lambda st: st.server_sent(ord("R"), b"\x00\x00\x00\x00"),
        lambda st: st.server_sent(ord("K"), b"\x00\x00\x00\x01abcd"),
        lambda st: st.client_sent_startup(StartupMessage(())),
    ]
    for i, case in enumerate(cases):
        st = ready_state()
        if i == 2:
            st.server_sent(ord("H"))
        with pytest.raises(ProtocolViolation):
            case(st)


def test_unexpected_message_during_copy_in() -> None:
    st = ready_state()
    st.client_sent(ord("Q"))
    st.server_sent(ord("G"))
    with pytest.raises(ProtocolViolation):
        st.client_sent(ord("Q"))


def test_auth_violations() -> None:
    st = SessionState()
    st.client_sent_startup(StartupMessage((("user", "u"),)))
    with pytest.raises(ProtocolViolation):
        st.server_sent(ord("R"), b"\x00\x00\x00\x63")
    with pytest.raises(ProtocolViolation):
        st.server_sent(ord("R"), b"\x00")
    with pytest.raises(ProtocolViolation):
        st.server_sent(ord("Z"), b"I")  # before AuthenticationOk
    with pytest.raises(ProtocolViolation):
        st.client_sent(ord("Q"))


def test_after_terminate_everything_is_a_violation() -> None:
    st = ready_state()
    st.client_sent(ord("X"))
    with pytest.raises(ProtocolViolation):
        st.client_sent(ord("Q"))
