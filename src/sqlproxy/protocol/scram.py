"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, both sides, sans-IO.

Server side (the proxy authenticating a client)::

    srv = ScramServer(verifier_or_None, username=user, mock_secret=cfg_secret)
    send AuthenticationSASL(srv.mechanisms)
    server_first = srv.process_client_first(initial.mechanism, initial.data)  # SASLContinue
    server_final = srv.process_client_final(response.data)                   # SASLFinal, then Ok

``process_client_final`` raises :class:`AuthenticationFailed` for a wrong password *and* for
an unknown user (verifier None): the unknown user gets a complete mock exchange with a salt
derived from the user name and ``mock_secret``, so the two cases are indistinguishable.
Malformed messages raise :class:`ProtocolViolation`.

Client side (the proxy authenticating to an upstream server): :class:`ScramClient`.

Channel binding: ``tls-server-end-point`` is supported when the caller passes the
certificate hash (RFC 5929: the server certificate hashed with its signature's hash,
SHA-256 for MD5/SHA-1 signatures); without it only plain SCRAM-SHA-256 is offered/used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Self

from sqlproxy.protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    AuthenticationFailed,
    LocalProtocolError,
    ProtocolViolation,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "MECHANISM",
    "MECHANISM_PLUS",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "make_verifier",
    "saslprep",
]

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE: Final = "tls-server-end-point"
DEFAULT_ITERATIONS: Final = 4096  # PostgreSQL's scram_iterations default
SALT_LENGTH: Final = 16  # SCRAM_DEFAULT_SALT_LEN
NONCE_LENGTH: Final = 18  # SCRAM_RAW_NONCE_LEN
KEY_LENGTH: Final = 32

# A per-process fallback. A deployment should pass a configured, persistent mock_secret: with
# this one, an unknown user's fake salt changes on restart, while a real user's salt does not.
_PROCESS_MOCK_SECRET: Final = secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


# --- SASLprep (RFC 4013), as PostgreSQL's pg_saslprep applies it -------------------------------


def saslprep(password: str) -> bytes:
    """Normalize a password the way PostgreSQL and libpq do before hashing it.

    As in pg_saslprep, a password that SASLprep prohibits is used as its raw UTF-8 bytes
    rather than rejected, and a pure-ASCII password is used unchanged.
    """
    raw = password.encode("utf-8", "surrogateescape")
    if password.isascii():
        return raw
    try:
        return _saslprep_strict(password).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return raw


def _saslprep_strict(s: str) -> str:
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in s if not stringprep.in_table_b1(c))
    norm = unicodedata.normalize("NFKC", mapped)
    if not norm:
        raise ValueError("empty after SASLprep")
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,  # PostgreSQL treats unassigned code points as prohibited
    )
    for c in norm:
        if any(f(c) for f in prohibited):
            raise ValueError("prohibited character")
    if any(stringprep.in_table_d1(c) for c in norm):
        if any(stringprep.in_table_d2(c) for c in norm):
            raise ValueError("mixed bidirectional text")
        if not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1])):
            raise ValueError("RandALCat text must start and end with RandALCat")
    return norm


# --- verifiers -------------------------------------------------------------------------------


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def _keys(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey)."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, _sha256(client_key), _hmac(salted, b"Server Key")


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A stored SCRAM secret: ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse PostgreSQL's rolpassword format. Raises ValueError when malformed."""
        try:
            scheme, iter_salt, keys = text.split("$")
            iter_text, salt_b64 = iter_salt.split(":")
            stored_b64, server_b64 = keys.split(":")
            if scheme != MECHANISM or not iter_text.isdigit():
                raise ValueError(text)
            v = cls(int(iter_text), _unb64(salt_b64), _unb64(stored_b64), _unb64(server_b64))
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise ValueError("not a SCRAM-SHA-256 verifier") from None
        if (
            v.iterations < 1
            or not v.salt
            or len(v.stored_key) != KEY_LENGTH
            or len(v.server_key) != KEY_LENGTH
        ):
            raise ValueError("not a SCRAM-SHA-256 verifier")
        return v

    @classmethod
    def from_password(
        cls, password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
    ) -> Self:
        if iterations < 1:
            raise LocalProtocolError("iterations must be positive")
        if salt is None:
            salt = secrets.token_bytes(SALT_LENGTH)
        _, stored, server = _keys(_salted_password(password, salt, iterations))
        return cls(iterations, salt, stored, server)

    def verify_password(self, password: str) -> bool:
        """Check a cleartext password (e.g. from AuthenticationCleartextPassword over TLS)."""
        _, stored, _ = _keys(_salted_password(password, self.salt, self.iterations))
        return hmac.compare_digest(stored, self.stored_key)

    def __str__(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


def make_verifier(password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A verifier string in PostgreSQL's stored format, as ``CREATE ROLE ... PASSWORD`` makes."""
    return str(ScramVerifier.from_password(password, iterations, salt))


def is_scram_verifier(text: str) -> bool:
    try:
        ScramVerifier.parse(text)
    except ValueError:
        return False
    return True


# --- message parsing -------------------------------------------------------------------------


def _malformed(detail: str) -> ProtocolViolation:
    return ProtocolViolation(f"malformed SCRAM message: {detail}")


def _text(data: bytes | None) -> str:
    if data is None:
        raise _malformed("no data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("not UTF-8") from None


def _attr(part: str, name: str) -> str:
    if len(part) < 2 or part[0] != name or part[1] != "=":
        raise _malformed(f"expected attribute {name!r}")
    return part[2:]


def _valid_nonce(nonce: str) -> bool:
    # printable ASCII except ',' (RFC 5802 section 7)
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


# --- server ----------------------------------------------------------------------------------


class ScramServer:
    """Server side of one SCRAM-SHA-256 exchange."""

    def __init__(
        self,
        verifier: ScramVerifier | str | None,
        *,
        username: str = "",
        mock_secret: bytes | None = None,
        channel_binding: bytes | None = None,
        nonce: str | None = None,
    ) -> None:
        """``verifier`` None (or not a SCRAM verifier) runs the mock exchange for ``username``.
        ``channel_binding``: the tls-server-end-point hash of the proxy's certificate when the
        client connection uses TLS. ``nonce`` fixes the server nonce (tests only)."""
        if isinstance(verifier, str):
            try:
                verifier = ScramVerifier.parse(verifier)
            except ValueError:
                verifier = None
        self._mock = verifier is None
        if verifier is None:
            secret = mock_secret if mock_secret is not None else _PROCESS_MOCK_SECRET
            salt = _hmac(secret, b"scram mock salt\0" + username.encode("utf-8", "surrogateescape"))
            # Random keys: no proof can match, yet every step does the same work as a real one.
            verifier = ScramVerifier(
                DEFAULT_ITERATIONS,
                salt[:SALT_LENGTH],
                secrets.token_bytes(KEY_LENGTH),
                secrets.token_bytes(KEY_LENGTH),
            )
        self._verifier = verifier
        self._cb_data = channel_binding
        if nonce is not None and not _valid_nonce(nonce):
            raise LocalProtocolError("invalid server nonce")
        self._server_nonce = nonce if nonce is not None else _b64(secrets.token_bytes(NONCE_LENGTH))
        self._step = 0
        self._gs2_header = ""
        self._cb_used = False
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """What to offer in AuthenticationSASL, preferred first."""
        if self._cb_data is not None:
            return (MECHANISM_PLUS, MECHANISM)
        return (MECHANISM,)

    @property
    def done(self) -> bool:
        return self._step == 2

    def process_client_first(self, mechanism: str, data: bytes | None) -> bytes:
        """Handle SASLInitialResponse; returns the server-first-message (SASLContinue data)."""
        if self._step != 0:
            raise LocalProtocolError("client-first already processed")
        if mechanism not in self.mechanisms:
            raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
        text = _text(data)
        parts = text.split(",")
        if len(parts) < 4:
            raise _malformed("client-first-message too short")
        flag = parts[0]
        if flag == "n":
            if mechanism == MECHANISM_PLUS:
                raise _malformed("SCRAM-SHA-256-PLUS selected without channel binding")
        elif flag == "y":
            if mechanism == MECHANISM_PLUS:
                raise _malformed("SCRAM-SHA-256-PLUS selected without channel binding")
            if self._cb_data is not None:
                # The client can bind but believes we cannot: someone stripped -PLUS from our
                # offer. RFC 5802 section 6 requires failing here.
                raise ProtocolViolation("SCRAM channel binding negotiation error")
        elif flag.startswith("p="):
            if mechanism != MECHANISM_PLUS:
                raise _malformed("channel binding data sent with SCRAM-SHA-256 (no -PLUS)")
            if flag[2:] != CHANNEL_BINDING_TYPE:
                raise ProtocolViolation(f"unsupported SCRAM channel-binding type {flag[2:]!r}")
            self._cb_used = True
        else:
            raise _malformed("invalid gs2 header")
        if parts[1]:
            raise ProtocolViolation(
                "client uses authorization identity, but it is not supported", FEATURE_NOT_SUPPORTED
            )
        if parts[2].startswith("m="):
            raise ProtocolViolation("client requires an unsupported SCRAM extension", FEATURE_NOT_SUPPORTED)
        _attr(parts[2], "n")  # the user name in the startup packet is the one that counts
        client_nonce = _attr(parts[3], "r")
        if not _valid_nonce(client_nonce):
            raise _malformed("invalid client nonce")
        self._gs2_header = f"{parts[0]},{parts[1]},"
        self._client_first_bare = ",".join(parts[2:])
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._step = 1
        return self._server_first.encode("ascii")

    def process_client_final(self, data: bytes) -> bytes:
        """Handle SASLResponse; returns the server-final-message (SASLFinal data).
        Raises AuthenticationFailed for a wrong password or an unknown user."""
        if self._step != 1:
            raise LocalProtocolError("process_client_first() must come first")
        text = _text(data)
        head, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise _malformed("missing proof")
        parts = head.split(",")
        if len(parts) < 2:
            raise _malformed("client-final-message too short")
        try:
            cbind = _unb64(_attr(parts[0], "c"))
            proof = _unb64(proof_b64)
        except (binascii.Error, ValueError):
            raise _malformed("invalid base64") from None
        expected_cbind = self._gs2_header.encode("utf-8")
        if self._cb_used:
            assert self._cb_data is not None
            expected_cbind += self._cb_data
        if not hmac.compare_digest(cbind, expected_cbind):
            raise ProtocolViolation("SCRAM channel binding check failed")
        if not hmac.compare_digest(
            _attr(parts[1], "r").encode("ascii", "replace"), self._nonce.encode("ascii")
        ):
            raise _malformed("nonce does not match")
        if len(proof) != KEY_LENGTH:
            raise _malformed("invalid proof length")
        self._step = 2
        auth_message = f"{self._client_first_bare},{self._server_first},{head}".encode()
        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        ok = hmac.compare_digest(_sha256(client_key), v.stored_key)
        if not ok or self._mock:
            raise AuthenticationFailed()
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode("ascii")


# --- client ----------------------------------------------------------------------------------


class ScramClient:
    """Client side of one SCRAM-SHA-256 exchange (the proxy logging in to PostgreSQL)."""

    def __init__(
        self,
        password: str,
        *,
        username: str = "",
        channel_binding: bytes | None = None,
        nonce: str | None = None,
        max_iterations: int = 10_000_000,
    ) -> None:
        """``username`` is sent in the SCRAM message; PostgreSQL ignores it (libpq sends an
        empty one). ``channel_binding``: the upstream certificate's tls-server-end-point hash
        when the connection uses TLS. ``max_iterations`` bounds the PBKDF2 work a server can
        make us do."""
        self._password = password
        self._username = username
        self._cb_data = channel_binding
        if nonce is not None and not _valid_nonce(nonce):
            raise LocalProtocolError("invalid client nonce")
        self._client_nonce = nonce if nonce is not None else _b64(secrets.token_bytes(NONCE_LENGTH))
        self._max_iterations = max_iterations
        self.mechanism = MECHANISM
        self._gs2_header = "n,,"
        self._step = 0
        self._client_first_bare = ""
        self._auth_message = b""
        self._server_key = b""

    def select_mechanism(self, offered: Sequence[str]) -> str:
        """Pick from AuthenticationSASL's list: -PLUS when we can bind and the server offers it."""
        if self._cb_data is not None and MECHANISM_PLUS in offered:
            self.mechanism = MECHANISM_PLUS
            self._gs2_header = f"p={CHANNEL_BINDING_TYPE},,"
        elif MECHANISM in offered:
            self.mechanism = MECHANISM
            # 'y': we could bind but the server did not offer it (lets it detect a downgrade).
            self._gs2_header = "y,," if self._cb_data is not None else "n,,"
        else:
            raise ProtocolViolation(
                f"server offered no supported SASL mechanism: {list(offered)}", FEATURE_NOT_SUPPORTED
            )
        return self.mechanism

    def client_first(self) -> bytes:
        """SASLInitialResponse data (send with ``self.mechanism``)."""
        if self._step != 0:
            raise LocalProtocolError("client_first() called twice")
        self._step = 1
        self._client_first_bare = f"n={_saslname(self._username)},r={self._client_nonce}"
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def process_server_first(self, data: bytes) -> bytes:
        """Handle AuthenticationSASLContinue; returns SASLResponse data (client-final)."""
        if self._step != 1:
            raise LocalProtocolError("client_first() must come first")
        text = _text(data)
        parts = text.split(",")
        if len(parts) < 3:
            raise _malformed("server-first-message too short")
        if parts[0].startswith("m="):
            raise ProtocolViolation("server requires an unsupported SCRAM extension", FEATURE_NOT_SUPPORTED)
        nonce = _attr(parts[0], "r")
        try:
            salt = _unb64(_attr(parts[1], "s"))
        except (binascii.Error, ValueError):
            raise _malformed("invalid salt") from None
        iter_text = _attr(parts[2], "i")
        if not iter_text.isdigit():
            raise _malformed("invalid iteration count")
        iterations = int(iter_text)
        if (
            not nonce.startswith(self._client_nonce)
            or len(nonce) == len(self._client_nonce)
            or not _valid_nonce(nonce)
        ):
            raise _malformed("server nonce does not extend the client nonce")
        if not salt:
            raise _malformed("empty salt")
        if not 1 <= iterations <= self._max_iterations:
            raise ProtocolViolation(f"SCRAM iteration count {iterations} out of range")
        cbind = self._gs2_header.encode("utf-8")
        if self.mechanism == MECHANISM_PLUS:
            assert self._cb_data is not None
            cbind += self._cb_data
        final_without_proof = f"c={_b64(cbind)},r={nonce}"
        self._auth_message = f"{self._client_first_bare},{text},{final_without_proof}".encode()
        client_key, stored_key, self._server_key = _keys(_salted_password(self._password, salt, iterations))
        proof = _xor(client_key, _hmac(stored_key, self._auth_message))
        self._step = 2
        return f"{final_without_proof},p={_b64(proof)}".encode("ascii")

    def process_server_final(self, data: bytes) -> None:
        """Handle AuthenticationSASLFinal: make sure the *server* knew the password too."""
        if self._step != 2:
            raise LocalProtocolError("process_server_first() must come first")
        text = _text(data)
        if text.startswith("e="):
            raise AuthenticationFailed(f"server rejected SCRAM authentication: {text[2:]}")
        first = text.split(",")[0]
        try:
            signature = _unb64(_attr(first, "v"))
        except (binascii.Error, ValueError):
            raise _malformed("invalid server signature") from None
        self._step = 3
        if not hmac.compare_digest(signature, _hmac(self._server_key, self._auth_message)):
            raise AuthenticationFailed(
                "server SCRAM signature mismatch: the server does not know the password"
            )

    @property
    def done(self) -> bool:
        return self._step == 3
