"""PostgreSQL's legacy MD5 password scheme (AuthenticationMD5Password), both sides.

Stored hash: ``"md5" + md5(password || username)``. Wire response to a 4-byte salt:
``"md5" + md5(hex(md5(password || username)) || salt)``. MD5 is weak (the stored hash is
itself a password equivalent); offer SCRAM wherever the client supports it.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlproxy.protocol.errors import LocalProtocolError

__all__ = ["is_md5_hash", "md5_password_hash", "md5_response", "md5_response_from_hash", "md5_verify"]


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_password_hash(user: str, password: str) -> str:
    """The ``md5...`` string PostgreSQL stores in pg_authid.rolpassword."""
    return "md5" + _md5_hex(password.encode("utf-8") + user.encode("utf-8"))


def is_md5_hash(text: str) -> bool:
    return len(text) == 35 and text.startswith("md5") and all(c in "0123456789abcdef" for c in text[3:])


def md5_response_from_hash(stored_hash: str, salt: bytes) -> str:
    """The PasswordMessage a client sends, computed from the stored hash (which is all the
    proxy may know about an upstream password)."""
    if not is_md5_hash(stored_hash):
        raise LocalProtocolError("not an md5 password hash")
    if len(salt) != 4:
        raise LocalProtocolError("MD5 salt must be 4 bytes")
    return "md5" + _md5_hex(stored_hash[3:].encode("ascii") + salt)


def md5_response(user: str, password: str, salt: bytes) -> str:
    """Client side: the PasswordMessage answering AuthenticationMD5Password(salt)."""
    return md5_response_from_hash(md5_password_hash(user, password), salt)


def md5_verify(stored_hash: str | None, salt: bytes, response: str) -> bool:
    """Server side: check a client's response. ``stored_hash`` None (unknown user, or a SCRAM
    secret that MD5 cannot use) still does the same work and fails."""
    if stored_hash is None or not is_md5_hash(stored_hash):
        stored_hash = "md5" + "0" * 32
        known = False
    else:
        known = True
    expected = md5_response_from_hash(stored_hash, salt)
    same = hmac.compare_digest(expected.encode("ascii"), response.encode("utf-8", "surrogateescape"))
    return same and known
