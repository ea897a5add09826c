"""Sans-IO PostgreSQL v3 protocol: messages, framing, session state, SCRAM and MD5.

Nothing here does I/O or imports asyncio: bytes go in, messages come out (the h11 style).
"""

from sqlproxy.protocol.errors import AuthenticationFailed, LocalProtocolError, ProtocolViolation
from sqlproxy.protocol.framing import BackendDecoder, FrontendDecoder, is_tls_client_hello
from sqlproxy.protocol.messages import (
    BackendMessage,
    BackendType,
    FrontendMessage,
    FrontendType,
    Message,
    decode_backend,
    decode_frontend,
    decode_startup,
)
from sqlproxy.protocol.session_state import Phase, SessionState

__all__ = [
    "AuthenticationFailed",
    "BackendDecoder",
    "BackendMessage",
    "BackendType",
    "FrontendDecoder",
    "FrontendMessage",
    "FrontendType",
    "LocalProtocolError",
    "Message",
    "Phase",
    "ProtocolViolation",
    "SessionState",
    "decode_backend",
    "decode_frontend",
    "decode_startup",
    "is_tls_client_hello",
]
