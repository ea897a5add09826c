from typing import Any

import pytest

from sqlproxy.auth.keys import generate_api_key, hash_api_key
from sqlproxy.auth.lockout import Lockout
from sqlproxy.auth.users import AuthFailure, Identity, UserDirectory, parse_source_ip
from sqlproxy.config.loader import ConfigError
from sqlproxy.config.models import ProxyConfig

ALICE_KEY = "sqp_alice_0123456789abcdefghijklmnopqrstuvwxyzAB"
BOB_KEY = "sqp_bob_0123456789abcdefghijklmnopqrstuvwxyzABCD"
CAROL_KEY = "sqp_carol_0123456789abcdefghijklmnopqrstuvwxyzAB"
DAVE_KEY = "sqp_dave_0123456789abcdefghijklmnopqrstuvwxyzABC"
ENV_KEY = "sqp_env_0123456789abcdefghijklmnopqrstuvwxyzABCDE"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def config(**users: dict[str, Any]) -> ProxyConfig:
    return ProxyConfig.model_validate(
        {
            "roles": {"analyst": {}, "dba": {"admin": True}},
            "users": users,
            "auth": {"lockout_threshold": 3, "lockout_window_s": 60, "lockout_duration_s": 300},
        }
    )


def standard_config() -> ProxyConfig:
    return config(
        alice={
            "api_key_sha256": hash_api_key(ALICE_KEY),
            "roles": ["analyst"],
            "attributes": {"region": "eu", "level": 3},
        },
        bob={"api_key_sha256": hash_api_key(BOB_KEY), "roles": ["analyst", "dba"], "disabled": True},
        carol={
            "api_key_sha256": hash_api_key(CAROL_KEY),
            "allowed_cidrs": ["10.0.0.0/8", "2001:db8:1::/48"],
        },
        dave={"api_key_env": "DAVE_KEY", "roles": ["dba"], "password": "md5" + "0" * 32},
    )


def directory(clock: FakeClock | None = None, env: dict[str, str] | None = None) -> UserDirectory:
    return UserDirectory(
        standard_config(), {"DAVE_KEY": DAVE_KEY} if env is None else env, clock=clock or FakeClock()
    )


def test_valid_key_gives_identity() -> None:
    d = directory()
    r = d.authenticate_api_key(ALICE_KEY, "192.0.2.1")
    assert r.ok and r.reason is None and r.http_status == 200
    assert r.identity == Identity(
        name="alice", roles=frozenset({"analyst"}), attributes={"region": "eu", "level": 3}
    )
    assert r.identity.admin is False
    # Attributes cannot be changed through the identity.
    with pytest.raises(TypeError):
        r.identity.attributes["region"] = "us"  # type: ignore[index]


def test_admin_comes_from_any_admin_role() -> None:
    r = directory().authenticate_api_key(DAVE_KEY, "192.0.2.1")
    assert r.identity is not None
    assert r.identity.admin is True
    assert r.identity.roles == {"dba"}


@pytest.mark.parametrize("presented", [None, ""])
def test_missing_key(presented: str | None) -> None:
    r = directory().authenticate_api_key(presented, "192.0.2.1")
    assert r.identity is None and r.reason == "missing" and r.http_status == 401


def test_unknown_key_is_invalid() -> None:
    r = directory().authenticate_api_key(generate_api_key(), "192.0.2.1")
    assert r.identity is None and r.reason is AuthFailure.INVALID and r.user is None


def test_key_differing_in_last_or_first_char_or_length_fails() -> None:
    d = directory()
    last = ALICE_KEY[:-1] + ("C" if ALICE_KEY[-1] != "C" else "D")
    first = "t" + ALICE_KEY[1:]
    wrongs = (last, first, ALICE_KEY + "x", ALICE_KEY[:-1], ALICE_KEY.upper(), " " + ALICE_KEY)
    for i, wrong in enumerate(wrongs):
        # A fresh source each time, or the source lockout would answer first.
        assert d.authenticate_api_key(wrong, f"192.0.2.{i}").reason is AuthFailure.INVALID, wrong
    assert d.authenticate_api_key(ALICE_KEY, "192.0.2.200").ok


def test_presenting_the_stored_hash_is_not_the_key() -> None:
    r = directory().authenticate_api_key(hash_api_key(ALICE_KEY), "192.0.2.1")
    assert r.reason is AuthFailure.INVALID


def test_overlong_key_is_invalid() -> None:
    r = directory().authenticate_api_key("x" * 100_000, "192.0.2.1")
    assert r.reason is AuthFailure.INVALID


def test_disabled_user_is_refused_and_named_for_audit() -> None:
    r = directory().authenticate_api_key(BOB_KEY, "192.0.2.1")
    assert r.identity is None and r.reason is AuthFailure.DISABLED and r.user == "bob"
    assert r.http_status == 401


@pytest.mark.parametrize(
    ("ip", "ok"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("::ffff:10.1.2.3", True),  # IPv4 client on a dual-stack listener
        ("2001:db8:1:42::7", True),
        ("2001:db8:2::7", False),
        ("::1", False),
        ("testclient", False),  # not an address: an allowlist cannot vouch for it
        ("", False),
    ],
)
def test_ip_allowlist(ip: str, ok: bool) -> None:
    r = directory().authenticate_api_key(CAROL_KEY, ip)
    if ok:
        assert r.identity is not None and r.identity.name == "carol"
    else:
        assert r.identity is None and r.reason is AuthFailure.IP_NOT_ALLOWED and r.user == "carol"
        assert r.http_status == 403


def test_no_allowlist_means_any_source() -> None:
    d = directory()
    for ip in ("192.0.2.1", "2001:db8::1", "testclient"):
        assert d.authenticate_api_key(ALICE_KEY, ip).ok


def test_env_key_is_hashed_at_load_and_later_env_changes_do_not_matter() -> None:
    env = {"DAVE_KEY": f"  {DAVE_KEY}\n"}  # as read from a file with a trailing newline
    d = directory(env=env)
    env["DAVE_KEY"] = "something else"
    r = d.authenticate_api_key(DAVE_KEY, "192.0.2.1")
    assert r.identity is not None and r.identity.name == "dave"


@pytest.mark.parametrize("env", [{}, {"DAVE_KEY": ""}, {"DAVE_KEY": "   "}])
def test_missing_env_key_is_a_config_error_naming_the_key_path(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        directory(env=env)
    assert [p.path for p in ei.value.problems] == ["users.dave.api_key_env"]
    assert "DAVE_KEY" in str(ei.value)


def test_duplicate_keys_across_users_are_an_error() -> None:
    cfg = config(
        alice={"api_key_sha256": hash_api_key(ALICE_KEY)},
        eve={"api_key_env": "EVE_KEY"},
    )
    with pytest.raises(ConfigError) as ei:
        UserDirectory(cfg, {"EVE_KEY": ALICE_KEY})
    [problem] = ei.value.problems
    assert problem.path == "users.eve.api_key_env"
    assert "users.alice.api_key_sha256" in problem.reason


def test_one_user_may_hold_the_same_key_twice_and_two_keys() -> None:
    cfg = config(alice={"api_key_sha256": hash_api_key(ALICE_KEY), "api_key_env": "ALICE_KEY2"})
    d = UserDirectory(cfg, {"ALICE_KEY2": ALICE_KEY})
    assert d.authenticate_api_key(ALICE_KEY, "192.0.2.1").ok
    d = UserDirectory(cfg, {"ALICE_KEY2": ENV_KEY})
    assert d.authenticate_api_key(ALICE_KEY, "192.0.2.1").ok
    assert d.authenticate_api_key(ENV_KEY, "192.0.2.1").ok


# -- lockout -----------------------------------------------------------------------------------


def test_unknown_keys_lock_the_source_even_for_a_valid_key_until_expiry() -> None:
    clock = FakeClock()
    d = directory(clock)
    for i in range(3):
        if i:
            clock.advance(1)
        assert d.authenticate_api_key(generate_api_key(), "203.0.113.9").reason is AuthFailure.INVALID
    # Locked at the third failure, for 300 s.
    assert d.authenticate_api_key(ALICE_KEY, "203.0.113.9").reason is AuthFailure.LOCKED
    # Other sources are unaffected, and so is alice from elsewhere.
    assert d.authenticate_api_key(ALICE_KEY, "203.0.113.10").ok
    clock.advance(299)
    assert d.authenticate_api_key(ALICE_KEY, "203.0.113.9").reason is AuthFailure.LOCKED
    clock.advance(1)
    assert d.authenticate_api_key(ALICE_KEY, "203.0.113.9").ok


def test_ipv6_sources_are_locked_per_64() -> None:
    d = directory(FakeClock())
    for i in range(3):
        d.authenticate_api_key(generate_api_key(), f"2001:db8:5:6::{i + 1}")
    assert d.authenticate_api_key(ALICE_KEY, "2001:db8:5:6:ffff::1").reason is AuthFailure.LOCKED
    assert d.authenticate_api_key(ALICE_KEY, "2001:db8:5:7::1").ok


def test_rejected_known_key_locks_the_user_from_everywhere() -> None:
    clock = FakeClock()
    d = directory(clock)
    for i in range(3):
        assert d.authenticate_api_key(CAROL_KEY, f"192.0.2.{i}").reason is AuthFailure.IP_NOT_ALLOWED
    r = d.authenticate_api_key(CAROL_KEY, "10.0.0.1")
    assert r.reason is AuthFailure.LOCKED and r.user == "carol"
    # Other users from the same sources are fine: these were not guesses at unknown keys.
    assert d.authenticate_api_key(ALICE_KEY, "192.0.2.0").ok
    clock.advance(300)
    assert d.authenticate_api_key(CAROL_KEY, "10.0.0.1").ok


def test_success_resets_the_user_failure_count() -> None:
    d = directory(FakeClock())
    for _ in range(5):
        d.authenticate_api_key(CAROL_KEY, "192.0.2.1")
        d.authenticate_api_key(CAROL_KEY, "192.0.2.1")
        assert d.authenticate_api_key(CAROL_KEY, "10.0.0.1").ok


def test_missing_keys_do_not_count_towards_lockout() -> None:
    d = directory(FakeClock())
    for _ in range(10):
        d.authenticate_api_key("", "203.0.113.9")
    assert d.authenticate_api_key(ALICE_KEY, "203.0.113.9").ok


def test_lockout_state_can_be_carried_over_a_reload() -> None:
    clock = FakeClock()
    d = directory(clock)
    for _ in range(3):
        d.authenticate_api_key(generate_api_key(), "203.0.113.9")
    reloaded = UserDirectory(standard_config(), {"DAVE_KEY": DAVE_KEY}, lockout=d.lockout)
    assert reloaded.authenticate_api_key(ALICE_KEY, "203.0.113.9").reason is AuthFailure.LOCKED
    # A fresh, empty Lockout passed in is used (and not mistaken for "none given").
    fresh = Lockout(1, 60, 300, clock)
    d2 = UserDirectory(standard_config(), {"DAVE_KEY": DAVE_KEY}, lockout=fresh)
    d2.authenticate_api_key(generate_api_key(), "203.0.113.20")
    assert fresh.locked("ip:203.0.113.20")


# -- other accessors ---------------------------------------------------------------------------


def test_accessors_for_the_wire_door() -> None:
    d = directory()
    assert d.password_verifier("dave") == "md5" + "0" * 32
    assert d.password_verifier("alice") is None
    assert d.password_verifier("bob") is None  # disabled
    assert d.password_verifier("nobody") is None
    assert d.source_allowed("carol", "10.9.9.9")
    assert not d.source_allowed("carol", "192.0.2.1")
    assert not d.source_allowed("nobody", "10.9.9.9")
    assert d.is_disabled("bob") and not d.is_disabled("alice") and d.is_disabled("nobody")
    assert "alice" in d and "nobody" not in d
    assert set(d.names) == {"alice", "bob", "carol", "dave"}
    ident = d.identity("bob")
    assert ident is not None and ident.admin is True


def test_parse_source_ip() -> None:
    assert str(parse_source_ip("::ffff:192.0.2.1")) == "192.0.2.1"
    assert str(parse_source_ip(" 192.0.2.1 ")) == "192.0.2.1"
    assert parse_source_ip("localhost") is None
