"""The protocol state of one PostgreSQL connection, as a proxy needs to see it.

One :class:`SessionState` models one connection leg. Report every message the client side
sends with :meth:`SessionState.client_sent` (typed ones) / :meth:`client_sent_startup`, and
every message the server side sends with :meth:`SessionState.server_sent` — on the
client-facing leg that includes messages the proxy synthesizes itself (a policy denial's
ErrorResponse, the ReadyForQuery that answers a discarded batch's Sync).

It answers: which phase the conversation is in (:class:`Phase`), the transaction status from
the last ReadyForQuery, how many ReadyForQuery messages are still owed (pipelining depth),
which kind of 'p' message to expect during authentication, and whether a client message must
be discarded because the proxy failed the current extended-protocol batch ("after an error,
discard until Sync", which the proxy must honour exactly like the server does).

Limits, documented rather than hidden: the state follows the order in which events are
reported, so when a pipelining client's messages race the server's CopyInResponse the Sync
count may be off by one until the next ReadyForQuery; a simple Query sent inside an unsynced
extended batch is counted as its own request.
"""

from __future__ import annotations

import enum
from collections import deque

from sqlproxy.protocol.errors import LocalProtocolError, ProtocolViolation
from sqlproxy.protocol.messages import (
    AuthCode,
    AuthResponseKind,
    BackendMessage,
    BackendType,
    CancelRequest,
    FrontendMessage,
    FrontendType,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    TransactionStatus,
)

__all__ = ["Phase", "SessionState"]


class Phase(enum.Enum):
    STARTUP = "startup"  # nothing yet, or only SSLRequest/GSSENCRequest
    AUTHENTICATING = "authenticating"  # StartupMessage sent, AuthenticationOk not yet
    STARTING = "starting"  # authenticated; ParameterStatus/BackendKeyData until ReadyForQuery
    READY = "ready"  # idle between requests
    SIMPLE_QUERY = "simple_query"  # a Query awaits its ReadyForQuery
    EXTENDED = "extended"  # extended-protocol messages, until the batch's Sync is answered
    FUNCTION_CALL = "function_call"
    COPY_IN = "copy_in"  # server sent CopyInResponse; client streams CopyData
    COPY_OUT = "copy_out"  # server sent CopyOutResponse; server streams CopyData
    COPY_BOTH = "copy_both"  # replication
    TERMINATED = "terminated"


_OPEN = None  # sentinel for "_base": past startup, see the finer phases

_AUTH_EXPECT: dict[int, AuthResponseKind | None] = {
    AuthCode.OK: None,
    AuthCode.KERBEROS_V5: None,
    AuthCode.CLEARTEXT_PASSWORD: "password",
    AuthCode.MD5_PASSWORD: "password",
    AuthCode.GSS: "gss",
    AuthCode.GSS_CONTINUE: "gss",
    AuthCode.SSPI: "gss",
    AuthCode.SASL: "sasl_initial",
    AuthCode.SASL_CONTINUE: "sasl",
    AuthCode.SASL_FINAL: None,
}

_EXTENDED_TYPES = frozenset(
    {
        FrontendType.PARSE,
        FrontendType.BIND,
        FrontendType.DESCRIBE,
        FrontendType.EXECUTE,
        FrontendType.CLOSE,
    }
)
_COPY_FRONTEND = frozenset({FrontendType.COPY_DATA, FrontendType.COPY_DONE, FrontendType.COPY_FAIL})


class SessionState:
    """Mutable, event-driven; never does I/O. Methods raise :class:`ProtocolViolation` when
    the reported sequence breaks the protocol (the side that sent it is the offender)."""

    __slots__ = (
        "_base",
        "_copy",
        "_copy_client_done",
        "_copy_server_done",
        "_discarding",
        "_in_batch",
        "_pending",
        "backend_key",
        "expected_auth_response",
        "server_parameters",
        "transaction_status",
    )

    def __init__(self) -> None:
        self._base: Phase | None = Phase.STARTUP
        self._pending: deque[Phase] = deque()  # requests owed a ReadyForQuery, oldest first
        self._in_batch = False  # extended messages sent since the last Sync
        self._discarding = False  # proxy failed the batch: drop client messages until Sync
        self._copy: Phase | None = None
        self._copy_client_done = False
        self._copy_server_done = False
        self.transaction_status: TransactionStatus = "I"
        self.expected_auth_response: AuthResponseKind | None = None
        self.server_parameters: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None

    # -- queries --------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        if self._base is not _OPEN:
            return self._base
        if self._copy is not None:
            return self._copy
        if self._in_batch or self._discarding:
            return Phase.EXTENDED
        if self._pending:
            return self._pending[0]
        return Phase.READY

    @property
    def pending_ready(self) -> int:
        """ReadyForQuery messages still owed to the client (pipelined requests)."""
        return len(self._pending)

    @property
    def discarding(self) -> bool:
        return self._discarding

    @property
    def is_idle(self) -> bool:
        """Nothing in flight and no transaction open: the server connection could be reused."""
        return self.phase is Phase.READY and self.transaction_status == "I"

    # -- client -> server -----------------------------------------------------------------

    def client_sent_startup(self, msg: StartupPacket) -> None:
        if self._base is not Phase.STARTUP:
            raise ProtocolViolation(f"unexpected {type(msg).__name__} after startup")
        if isinstance(msg, StartupMessage):
            self._base = Phase.AUTHENTICATING
        elif isinstance(msg, CancelRequest):
            self._base = Phase.TERMINATED
        elif not isinstance(msg, SSLRequest | GSSENCRequest):
            raise LocalProtocolError(f"not a startup packet: {msg!r}")

    def client_sent(self, type_code: int) -> bool:
        """Record a typed message from the client. Returns False when it must be discarded
        (the proxy failed the current extended batch and this is not its Sync)."""
        base = self._base
        if base is not _OPEN:
            return self._client_sent_early(type_code)
        if self._discarding:
            if type_code == FrontendType.SYNC:
                self._discarding = False
                self._in_batch = False
                self._pending.append(Phase.EXTENDED)
                return True
            if type_code == FrontendType.TERMINATE:
                self._terminate()
                return True
            return False
        if self._copy is Phase.COPY_IN and not self._copy_client_done:
            if type_code == FrontendType.COPY_DATA:
                return True
            if type_code in (FrontendType.COPY_DONE, FrontendType.COPY_FAIL):
                self._copy_client_done = True
                return True
            if type_code in (FrontendType.SYNC, FrontendType.FLUSH):
                # The server ignores these during COPY FROM STDIN (libpq sends Sync right after
                # Execute before it knows the statement was a COPY), so they are not counted.
                return True
            if type_code == FrontendType.TERMINATE:
                self._terminate()
                return True
            raise ProtocolViolation(f"unexpected message type {chr(type_code)!r} during COPY from stdin")
        if type_code in _EXTENDED_TYPES:
            self._in_batch = True
        elif type_code == FrontendType.SYNC:
            self._in_batch = False
            self._pending.append(Phase.EXTENDED)
        elif type_code == FrontendType.QUERY:
            self._pending.append(Phase.SIMPLE_QUERY)
        elif type_code == FrontendType.FUNCTION_CALL:
            self._pending.append(Phase.FUNCTION_CALL)
        elif type_code == FrontendType.TERMINATE:
            self._terminate()
        elif type_code == FrontendType.COPY_DONE and self._copy is Phase.COPY_BOTH:
            self._copy_client_done = True
            self._maybe_end_copy_both()
        elif type_code == FrontendType.AUTH_RESPONSE:
            raise ProtocolViolation("authentication response outside authentication")
        # Flush needs nothing; CopyData/CopyDone/CopyFail outside COPY are ignored by the
        # server by design (a COPY that failed early), so they are let through.
        return True

    def _client_sent_early(self, type_code: int) -> bool:
        base = self._base
        if base is Phase.TERMINATED:
            raise ProtocolViolation("message received after the session ended")
        if type_code == FrontendType.TERMINATE and base is not Phase.STARTUP:
            self._terminate()
            return True
        if base is Phase.AUTHENTICATING:
            if type_code != FrontendType.AUTH_RESPONSE or self.expected_auth_response is None:
                raise ProtocolViolation(
                    f"expected an authentication response, got message type {chr(type_code)!r}"
                )
            # One response per request: the next 'p' needs a new request from the server.
            self.expected_auth_response = None
            return True
        if base is Phase.STARTING:
            # The client is not supposed to send anything before ReadyForQuery, but the server
            # would just queue it; treat it as the first request.
            self._base = _OPEN
            return self.client_sent(type_code)
        raise ProtocolViolation(f"expected a startup packet, got message type {chr(type_code)!r}")

    def client_sent_message(self, msg: FrontendMessage) -> bool:
        """Typed convenience over :meth:`client_sent` / :meth:`client_sent_startup`."""
        if isinstance(msg, StartupPacket):
            self.client_sent_startup(msg)
            return True
        return self.client_sent(msg.encode()[0])

    def fail_batch(self) -> None:
        """The proxy answered the current extended-protocol message with an ErrorResponse:
        from now on client messages are discarded until (and not including) Sync, whose
        ReadyForQuery must still be sent (by forwarding the Sync or synthesizing it)."""
        if self._base is not _OPEN or not self._in_batch:
            raise LocalProtocolError("fail_batch() outside an extended-protocol batch")
        self._discarding = True

    def _terminate(self) -> None:
        self._base = Phase.TERMINATED
        self._pending.clear()
        self._discarding = self._in_batch = False
        self._copy = None
        self.expected_auth_response = None

    # -- server -> client -----------------------------------------------------------------

    def server_sent(self, type_code: int, payload: bytes = b"") -> None:
        """Record a message from the server side. ``payload`` (the bytes after the header) is
        needed for Authentication, ReadyForQuery, ErrorResponse, ParameterStatus and
        BackendKeyData; for the rest the type is enough."""
        if type_code == BackendType.READY_FOR_QUERY:
            self._ready(payload)
        elif type_code == BackendType.ERROR_RESPONSE:
            self._error(payload)
        elif type_code == BackendType.AUTHENTICATION:
            self._auth(payload)
        elif type_code in (
            BackendType.COPY_IN_RESPONSE,
            BackendType.COPY_OUT_RESPONSE,
            BackendType.COPY_BOTH_RESPONSE,
        ):
            self._copy_start(type_code)
        elif type_code == BackendType.COPY_DONE:
            if self._copy is Phase.COPY_OUT:
                self._copy = None
            elif self._copy is Phase.COPY_BOTH:
                self._copy_server_done = True
                self._maybe_end_copy_both()
        elif type_code == BackendType.COMMAND_COMPLETE:
            if self._copy is not None:
                self._copy = None
        elif type_code == BackendType.PARAMETER_STATUS:
            parts = bytes(payload).split(b"\0")
            if len(parts) == 3 and parts[2] == b"":
                self.server_parameters[parts[0].decode("utf-8", "surrogateescape")] = parts[1].decode(
                    "utf-8", "surrogateescape"
                )
        elif type_code == BackendType.BACKEND_KEY_DATA:
            if self._base is not Phase.STARTING:
                raise ProtocolViolation("BackendKeyData outside connection startup")
            if len(payload) >= 8:
                self.backend_key = (int.from_bytes(payload[:4], "big", signed=True), bytes(payload[4:]))
        # Notices, notifications, row data, parse/bind completions: no state change.

    def server_sent_message(self, msg: BackendMessage) -> None:
        frame = msg.encode()
        self.server_sent(frame[0], frame[5:])

    def _ready(self, payload: bytes) -> None:
        if len(payload) != 1 or payload[0] not in b"ITE":
            raise ProtocolViolation("invalid ReadyForQuery status")
        status: TransactionStatus = "I" if payload[0] == 0x49 else "T" if payload[0] == 0x54 else "E"
        base = self._base
        if base is Phase.STARTING:
            self._base = _OPEN
        elif base is _OPEN:
            if not self._pending:
                raise ProtocolViolation("ReadyForQuery without a pending request")
            self._pending.popleft()
            self._copy = None
        else:
            raise ProtocolViolation(f"ReadyForQuery during {base.value}")
        self.transaction_status = status

    def _error(self, payload: bytes) -> None:
        base = self._base
        fatal = b"SFATAL\0" in payload or b"VFATAL\0" in payload or b"VPANIC\0" in payload
        if base is not _OPEN and base is not Phase.TERMINATED:
            # Every error before ReadyForQuery is fatal to the connection (bad password, no
            # such database, too many connections).
            fatal = True
        if fatal:
            self._terminate()
            return
        if self._copy is Phase.COPY_IN or self._copy is Phase.COPY_OUT:
            # The COPY is over on the server side; CopyData the client still sends is ignored.
            self._copy = None

    def _auth(self, payload: bytes) -> None:
        if self._base is not Phase.AUTHENTICATING:
            raise ProtocolViolation("authentication request outside authentication")
        if len(payload) < 4:
            raise ProtocolViolation("short authentication request")
        code = int.from_bytes(payload[:4], "big")
        if code not in _AUTH_EXPECT:
            raise ProtocolViolation(f"unknown authentication request code {code}")
        self.expected_auth_response = _AUTH_EXPECT[code]
        if code == AuthCode.OK:
            self._base = Phase.STARTING

    def _copy_start(self, type_code: int) -> None:
        if self._base is not _OPEN or self._copy is not None:
            raise ProtocolViolation("unexpected COPY response")
        if type_code == BackendType.COPY_IN_RESPONSE:
            self._copy = Phase.COPY_IN
            if self._pending and self._pending[0] is Phase.EXTENDED:
                # The COPY came from an Execute whose Sync was already sent: the server ignores
                # that Sync while in COPY FROM STDIN, so no ReadyForQuery will answer it, and
                # the batch stays open on the server until the client's next Sync.
                self._pending.popleft()
                if not self._pending:
                    self._in_batch = True
        elif type_code == BackendType.COPY_OUT_RESPONSE:
            self._copy = Phase.COPY_OUT
        else:
            self._copy = Phase.COPY_BOTH
        self._copy_client_done = self._copy_server_done = False

    def _maybe_end_copy_both(self) -> None:
        if self._copy_client_done and self._copy_server_done:
            self._copy = None
