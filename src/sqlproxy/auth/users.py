"""The user directory: who a presented API key belongs to, and whether they may come in.

Built once per configuration (a reload builds a new one; pass the old ``lockout`` along to keep
lock state across reloads). All failure reasons are returned to the caller for audit and
metrics, but a door must show the client one generic message: telling "unknown key" from
"disabled user" apart would let a client probe which keys exist.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from sqlproxy.auth.keys import hash_api_key
from sqlproxy.auth.lockout import Clock, Lockout
from sqlproxy.config.loader import ConfigError, ConfigProblem
from sqlproxy.config.models import ProxyConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AttributeValue = str | int | float | bool

# Generated keys are 47 characters; anything far longer is not a key, and hashing megabytes of
# header on every attempt would be an easy way to burn CPU.
_MAX_KEY_CHARS = 1024
# Lockout keys for sources that are not IP addresses (a test client, a Unix socket) are cut to
# this length so a hostile value cannot make one entry large.
_MAX_SOURCE_KEY_CHARS = 64


class AuthFailure(StrEnum):
    MISSING = "missing"
    INVALID = "invalid"
    LOCKED = "locked"
    IP_NOT_ALLOWED = "ip_not_allowed"
    DISABLED = "disabled"

    @property
    def http_status(self) -> int:
        # A known key from the wrong network is an authorisation problem, not an identity one.
        return 403 if self is AuthFailure.IP_NOT_ALLOWED else 401


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user, with the fields ``policy.principal.Principal`` takes."""

    name: str
    roles: frozenset[str]
    attributes: Mapping[str, AttributeValue] = field(default_factory=lambda: MappingProxyType({}))
    admin: bool = False


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Either ``identity`` (success) or ``reason`` (failure). ``user`` names the user whose key was
    presented when the key was known but refused, for the audit record; never show it to the
    client."""

    identity: Identity | None = None
    reason: AuthFailure | None = None
    user: str | None = None

    @property
    def ok(self) -> bool:
        return self.identity is not None

    @property
    def http_status(self) -> int:
        return 200 if self.reason is None else self.reason.http_status


@dataclass(frozen=True, slots=True)
class _User:
    identity: Identity
    networks: tuple[IPNetwork, ...]
    disabled: bool
    password: str | None
    wire_auth: str = "password"

    def allows(self, addr: IPAddress | None) -> bool:
        if not self.networks:
            return True
        if addr is None:
            # The source is not an IP address at all: an allowlist cannot vouch for it.
            return False
        return any(addr.version == n.version and addr in n for n in self.networks)


@dataclass(frozen=True, slots=True)
class _Key:
    user: str
    digest: str  # hex SHA-256 of the key
    path: str  # the config key it came from, for error messages


def parse_source_ip(source_ip: str) -> IPAddress | None:
    """The client address as an ``ipaddress`` object, IPv4-mapped IPv6 unwrapped to IPv4 (a
    dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d, and an IPv4 allowlist must still
    apply). None when ``source_ip`` is not an address."""
    try:
        addr = ipaddress.ip_address(source_ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _source_lock_key(addr: IPAddress | None, source_ip: str) -> str:
    if addr is None:
        return "src:" + source_ip[:_MAX_SOURCE_KEY_CHARS]
    if isinstance(addr, ipaddress.IPv6Address):
        # One IPv6 client usually holds a whole /64; counting per address would let it rotate
        # through 2**64 fresh lockout keys.
        return "ip:" + str(ipaddress.IPv6Network((addr, 64), strict=False))
    return "ip:" + str(addr)


def _user_lock_key(name: str) -> str:
    return "user:" + name


class UserDirectory:
    def __init__(
        self,
        config: ProxyConfig,
        env: Mapping[str, str] = os.environ,
        *,
        clock: Clock = time.monotonic,
        lockout: Lockout | None = None,
    ) -> None:
        a = config.auth
        # Not `lockout or ...`: an empty Lockout has len() 0 and is falsy.
        self.lockout = (
            lockout
            if lockout is not None
            else Lockout(a.lockout_threshold, a.lockout_window_s, a.lockout_duration_s, clock)
        )
        admin_roles = frozenset(r for r, rc in config.roles.items() if rc.admin)
        self._users: dict[str, _User] = {}
        self._by_hash: dict[str, _Key] = {}
        problems: list[ConfigProblem] = []
        for name, u in config.users.items():
            roles = frozenset(u.roles)
            self._users[name] = _User(
                identity=Identity(
                    name=name,
                    roles=roles,
                    attributes=MappingProxyType(dict(u.attributes)),
                    admin=bool(roles & admin_roles),
                ),
                networks=tuple(ipaddress.ip_network(c, strict=False) for c in u.allowed_cidrs),
                disabled=u.disabled,
                password=u.password,
                wire_auth=u.wire_auth,
            )
            hashes: list[tuple[str, str]] = []
            if u.api_key_sha256 is not None:
                hashes.append((u.api_key_sha256, f"users.{name}.api_key_sha256"))
            if u.api_key_env is not None:
                path = f"users.{name}.api_key_env"
                value = env.get(u.api_key_env, "").strip()
                if not value:
                    problems.append(
                        ConfigProblem(path, f"environment variable {u.api_key_env} is not set or empty")
                    )
                else:
                    hashes.append((hash_api_key(value), path))
            for digest, path in hashes:
                prev = self._by_hash.get(digest)
                if prev is None:
                    self._by_hash[digest] = _Key(name, digest, path)
                elif prev.user != name:
                    # A shared key would make one user's requests run as the other.
                    problems.append(ConfigProblem(path, f"the same API key as {prev.path}"))
        if problems:
            raise ConfigError("<config>", problems)
        # Compared against when no user matched, so an unknown key costs the same as a known one.
        self._dummy_hash = hash_api_key(secrets.token_urlsafe(32))

    # -- lookups -------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._users

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._users)

    def identity(self, name: str) -> Identity | None:
        """The identity of user ``name``, or None if there is no such user. Ignores ``disabled``."""
        u = self._users.get(name)
        return u.identity if u is not None else None

    def is_disabled(self, name: str) -> bool:
        u = self._users.get(name)
        return u is None or u.disabled

    def password_verifier(self, name: str) -> str | None:
        """The stored SCRAM-SHA-256 verifier or md5 hash for the wire door; None for an unknown or
        disabled user or one without a password."""
        u = self._users.get(name)
        if u is None or u.disabled:
            return None
        return u.password

    def wire_auth(self, name: str) -> str:
        """How user ``name`` logs in on the wire door: "password", "cert" or "cert+password".
        "password" for an unknown user, whose login then fails like a wrong password."""
        u = self._users.get(name)
        return "password" if u is None else u.wire_auth

    def source_allowed(self, name: str, source_ip: str) -> bool:
        """Whether user ``name`` may connect from ``source_ip`` (for doors that authenticate
        differently, such as the wire door)."""
        u = self._users.get(name)
        return u is not None and u.allows(parse_source_ip(source_ip))

    # -- API keys ------------------------------------------------------------------------------
    def authenticate_api_key(self, presented: str | None, source_ip: str) -> AuthResult:
        if not presented:
            return AuthResult(reason=AuthFailure.MISSING)
        addr = parse_source_ip(source_ip)
        source_key = _source_lock_key(addr, source_ip)
        if self.lockout.locked(source_key):
            return AuthResult(reason=AuthFailure.LOCKED)

        digest = hash_api_key(presented) if len(presented) <= _MAX_KEY_CHARS else ""
        hit = self._by_hash.get(digest)
        # The dict lookup only picks a candidate (it hashes the digest, so its timing says nothing
        # about stored keys); the decision is compare_digest against the stored hash, run against
        # a dummy when there is no candidate so that both paths do the same work.
        expected = hit.digest if hit is not None else self._dummy_hash
        if not hmac.compare_digest(digest, expected) or hit is None:
            self.lockout.record_failure(source_key)
            return AuthResult(reason=AuthFailure.INVALID)

        name = hit.user
        user = self._users[name]
        user_key = _user_lock_key(name)
        if self.lockout.locked(user_key):
            return AuthResult(reason=AuthFailure.LOCKED, user=name)
        if user.disabled:
            self.lockout.record_failure(user_key)
            return AuthResult(reason=AuthFailure.DISABLED, user=name)
        if not user.allows(addr):
            self.lockout.record_failure(user_key)
            return AuthResult(reason=AuthFailure.IP_NOT_ALLOWED, user=name)
        self.lockout.reset(user_key)
        return AuthResult(identity=user.identity)
