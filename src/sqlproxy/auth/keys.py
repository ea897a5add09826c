"""API keys: how they are made and how they are stored."""

from __future__ import annotations

import hashlib
import secrets

API_KEY_PREFIX = "sqp_"


def hash_api_key(key: str) -> str:
    """The hex SHA-256 of ``key``, as stored in ``users.NAME.api_key_sha256``.

    A plain fast hash is right here, unlike for passwords: generated keys carry 256 bits of
    randomness, so there is no dictionary to run and a slow KDF would only add latency to every
    request. The hash exists so that a leaked config file does not leak usable keys.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def generate_api_key() -> str:
    """A new random key: ``sqp_`` and 32 random bytes, base64url. The prefix lets secret scanners
    and humans recognise a sqlproxy key in a log or a repository."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)
