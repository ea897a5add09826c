"""Protocol error kinds, the SQLSTATE codes the proxy emits, and ErrorResponse builders.

Two exception families, as in h11: :class:`ProtocolViolation` means the *peer* sent bytes we
cannot accept (the connection should get an ErrorResponse with ``sqlstate`` and be closed);
:class:`LocalProtocolError` means *our* code misused the API (a bug, never the peer's fault).

The builders here encode ErrorResponse / NoticeResponse bytes directly rather than through
``messages`` so that this module stays import-cycle free: ``messages`` imports the exceptions.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "ADMIN_SHUTDOWN",
    "CONFIGURATION_LIMIT_EXCEEDED",
    "CONNECTION_FAILURE",
    "FEATURE_NOT_SUPPORTED",
    "INSUFFICIENT_PRIVILEGE",
    "INVALID_AUTHORIZATION_SPECIFICATION",
    "INVALID_PASSWORD",
    "PROGRAM_LIMIT_EXCEEDED",
    "PROTOCOL_VIOLATION",
    "QUERY_CANCELED",
    "RATE_LIMITED",
    "SYNTAX_ERROR",
    "TOO_MANY_CONNECTIONS",
    "AuthenticationFailed",
    "LocalProtocolError",
    "ProtocolViolation",
    "error_response",
    "fatal_response",
    "notice_response",
]

# --- SQLSTATE codes (PostgreSQL Appendix A) -------------------------------------------------
PROTOCOL_VIOLATION: Final = "08P01"
CONNECTION_FAILURE: Final = "08006"
INVALID_AUTHORIZATION_SPECIFICATION: Final = "28000"
INVALID_PASSWORD: Final = "28P01"  # noqa: S105 (a SQLSTATE, not a secret)
INSUFFICIENT_PRIVILEGE: Final = "42501"
SYNTAX_ERROR: Final = "42601"
FEATURE_NOT_SUPPORTED: Final = "0A000"
TOO_MANY_CONNECTIONS: Final = "53300"
CONFIGURATION_LIMIT_EXCEEDED: Final = "53400"
PROGRAM_LIMIT_EXCEEDED: Final = "54000"
QUERY_CANCELED: Final = "57014"
ADMIN_SHUTDOWN: Final = "57P01"
# PostgreSQL has no rate-limit SQLSTATE. 53400 (configuration_limit_exceeded) is in class 53
# "insufficient resources", which drivers and poolers already treat as transient/retryable, and
# it is what sqlproxy.pipeline.errors.RateLimited uses, so the wire and HTTP doors agree.
RATE_LIMITED: Final = CONFIGURATION_LIMIT_EXCEEDED


class ProtocolViolation(Exception):
    """The peer sent bytes that break the protocol. Reply with ``sqlstate`` and disconnect."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, sqlstate={self.sqlstate!r})"


class LocalProtocolError(Exception):
    """Our own code used the codec wrongly (e.g. encoding a NUL inside a C string)."""


class AuthenticationFailed(Exception):
    """A password or SCRAM proof did not verify (or the server's SCRAM signature did not).

    Distinct from :class:`ProtocolViolation`: the bytes were well formed, the secret was wrong.
    The message is deliberately generic; do not leak whether the user exists.
    """

    def __init__(self, message: str = "password authentication failed", sqlstate: str = INVALID_PASSWORD):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


# --- ErrorResponse builders ------------------------------------------------------------------

_I32 = struct.Struct("!I")


def _field(code: bytes, value: str) -> bytes:
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"lone surrogate in error field {code.decode()!r}") from None
    if b"\0" in raw:
        raise LocalProtocolError(f"NUL byte in error field {code.decode()!r}")
    return code + raw + b"\0"


def _fields_message(
    type_code: bytes,
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None,
    hint: str | None,
    position: int | None,
    routine: str | None = None,
) -> bytes:
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise LocalProtocolError(f"invalid SQLSTATE {sqlstate!r}")
    # S is localized, V is the non-localized severity (since 9.6); libpq prefers V when present.
    parts = [
        _field(b"S", severity),
        _field(b"V", severity),
        _field(b"C", sqlstate),
        _field(b"M", message),
    ]
    if detail is not None:
        parts.append(_field(b"D", detail))
    if hint is not None:
        parts.append(_field(b"H", hint))
    if position is not None:
        parts.append(_field(b"P", str(position)))
    if routine is not None:
        parts.append(_field(b"R", routine))
    body = b"".join(parts) + b"\0"
    return type_code + _I32.pack(len(body) + 4) + body


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    position: int | None = None,
    routine: str | None = None,
) -> bytes:
    """Encoded ErrorResponse ('E'). ``severity`` is ERROR (statement fails, session lives) or
    FATAL (the session ends after this message). ``routine`` is the R field: the name of the
    server routine that reported it, which some drivers read (asyncpg tells a stale prepared
    statement by ``RevalidateCachedQuery``)."""
    if severity not in ("ERROR", "FATAL", "PANIC"):
        raise LocalProtocolError(f"ErrorResponse severity must be ERROR/FATAL/PANIC, not {severity!r}")
    return _fields_message(b"E", severity, sqlstate, message, detail, hint, position, routine)


def fatal_response(
    sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> bytes:
    """Encoded FATAL ErrorResponse: send it, then close the connection."""
    return error_response(sqlstate, message, severity="FATAL", detail=detail, hint=hint)


def notice_response(
    message: str,
    *,
    severity: str = "NOTICE",
    sqlstate: str = "00000",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """Encoded NoticeResponse ('N'), e.g. WARNING / NOTICE / INFO."""
    if severity not in ("WARNING", "NOTICE", "DEBUG", "INFO", "LOG"):
        raise LocalProtocolError(f"invalid notice severity {severity!r}")
    return _fields_message(b"N", severity, sqlstate, message, detail, hint, None)
