"""The local hierarchy of token buckets, on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

from sqlproxy.config.loader import ConfigError, parse_config
from sqlproxy.pipeline.errors import RateLimited
from sqlproxy.ratelimit import Hierarchy, RateLimitConfig, RateLimiter
from sqlproxy.ratelimit.config import DistributedRateLimitConfig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def cfg(**kw: Any) -> RateLimitConfig:
    return RateLimitConfig.model_validate(kw)


NOROLES: frozenset[str] = frozenset()


def admit_all(h: Hierarchy, n: int, user: str = "alice", db: str | None = "demo", roles=NOROLES) -> int:
    return sum(h.try_acquire(user, roles, db) is None for _ in range(n))


def test_no_limits_admits_everything_and_keeps_nothing() -> None:
    h = Hierarchy(cfg(), Clock())
    assert not h.active
    assert admit_all(h, 1000) == 1000
    assert list(h.buckets()) == []


def test_bucket_burst_then_refill_at_rate() -> None:
    clock = Clock()
    h = Hierarchy(cfg(**{"global": {"rate": 10, "burst": 5}}), clock)
    assert admit_all(h, 8) == 5
    r = h.try_acquire("alice", NOROLES, "demo")
    assert r is not None and r.level == "global"
    assert r.retry_after == pytest.approx(0.1)
    clock.advance(0.35)  # 3.5 tokens
    assert admit_all(h, 10) == 3
    clock.advance(100)  # refill stops at the burst
    assert admit_all(h, 100) == 5


def test_default_burst_is_one_second_of_rate() -> None:
    h = Hierarchy(cfg(user_default={"rate": 20}), Clock())
    assert admit_all(h, 50) == 20


@pytest.mark.parametrize(
    ("limits", "level", "subject"),
    [
        ({"global": {"rate": 1, "burst": 3}}, "global", ""),
        ({"user_default": {"rate": 1, "burst": 3}}, "user", "alice"),
        ({"users": {"alice": {"rate": 1, "burst": 3}}}, "user", "alice"),
        ({"database_default": {"rate": 1, "burst": 3}}, "database", "demo"),
        ({"databases": {"demo": {"rate": 1, "burst": 3}}}, "database", "demo"),
        ({"user_database_default": {"rate": 1, "burst": 3}}, "user_database", "alice/demo"),
        ({"user_databases": {"alice": {"demo": {"rate": 1, "burst": 3}}}}, "user_database", "alice/demo"),
    ],
)
def test_every_level_is_enforced_and_named(limits: dict[str, Any], level: str, subject: str) -> None:
    h = Hierarchy(cfg(**limits), Clock())
    assert admit_all(h, 10) == 3
    r = h.try_acquire("alice", NOROLES, "demo")
    assert r is not None
    assert (r.level, r.bucket.subject) == (level, subject)
    label = {"global": "global", "user": "per-user", "database": "per-database"}.get(
        level, "per-user-per-database"
    )
    assert r.message().startswith(f"rate limit exceeded: {label} limit")


def test_levels_are_separate_per_subject() -> None:
    h = Hierarchy(
        cfg(user_default={"rate": 1, "burst": 2}, database_default={"rate": 1, "burst": 3}), Clock()
    )
    assert admit_all(h, 5, user="alice", db="a") == 2
    assert admit_all(h, 5, user="bob", db="a") == 1  # database a has one token left
    assert admit_all(h, 5, user="bob", db="b") == 1  # bob had one left; database b is fresh


def test_rejection_at_one_level_consumes_nothing_at_the_others() -> None:
    clock = Clock()
    h = Hierarchy(
        cfg(
            **{"global": {"rate": 1, "burst": 100}},
            users={"alice": {"rate": 1, "burst": 2}},
            databases={"demo": {"rate": 1, "burst": 50}},
        ),
        clock,
    )
    assert admit_all(h, 1000, user="alice") == 2
    g, d = h.bucket("global"), h.bucket("database:demo")
    assert g is not None and d is not None
    # 998 rejections at the user level left the global and database buckets as 2 admissions did.
    assert g.tokens == pytest.approx(98)
    assert d.tokens == pytest.approx(48)
    # ...and the other way round: the database is exhausted by bob; alice's refilled user bucket
    # is not charged for her rejected attempts.
    clock.advance(10)  # alice's bucket back to 2, database +10 -> 50 (cap)
    assert admit_all(h, 1000, user="bob") == 50
    u = h.bucket("user:alice")
    assert u is not None
    assert admit_all(h, 10, user="alice") == 0
    u.refill(clock())
    assert u.tokens == pytest.approx(2)
    assert g.tokens == pytest.approx(100 - 50)  # refilled to its burst, then bob's 50


def test_user_limit_precedence_user_then_best_role_then_default() -> None:
    h = Hierarchy(
        cfg(
            user_default={"rate": 1, "burst": 1},
            roles={"slow": {"rate": 1, "burst": 2}, "fast": {"rate": 1, "burst": 7}},
            users={"vip": {"rate": 1, "burst": 11}},
        ),
        Clock(),
    )
    assert admit_all(h, 20, user="nobody") == 1
    assert admit_all(h, 20, user="carol", roles=frozenset({"slow"})) == 2
    assert admit_all(h, 20, user="dave", roles=frozenset({"slow", "fast"})) == 7
    assert admit_all(h, 20, user="vip", roles=frozenset({"fast"})) == 11


def test_reload_keeps_bucket_state() -> None:
    clock = Clock()
    users = {"alice": {"rate": 1, "burst": 8}}
    h = Hierarchy(cfg(**{"global": {"rate": 1, "burst": 10}}, users=users), clock)
    assert admit_all(h, 6) == 6
    g, u = h.bucket("global"), h.bucket("user:alice")
    assert g is not None and u is not None
    # Raising the rate keeps the 4 tokens left: a reload is not a way to reset a budget.
    h.configure(cfg(**{"global": {"rate": 2, "burst": 10}}, users=users))
    assert h.bucket("global") is g and h.bucket("user:alice") is u
    assert g.tokens == pytest.approx(4)
    assert u.tokens == pytest.approx(2)
    assert admit_all(h, 10, user="bob") == 4
    clock.advance(1)  # the new rate: +2
    assert admit_all(h, 10, user="bob") == 2
    # A smaller burst clips the bucket.
    clock.advance(100)
    h.configure(cfg(**{"global": {"rate": 2, "burst": 3}}, users=users))
    assert admit_all(h, 10, user="bob") == 3
    # A level removed by the reload is no longer checked and its buckets are gone; alice's user
    # bucket, still configured, kept its level (full after 101 s).
    h.configure(cfg(users=users))
    assert h.bucket("global") is None
    assert h.bucket("user:alice") is u
    assert admit_all(h, 100, user="bob") == 100
    assert admit_all(h, 100, user="alice") == 8


def test_reload_that_changes_a_users_roles_takes_effect() -> None:
    clock = Clock()
    h = Hierarchy(cfg(roles={"a": {"rate": 1, "burst": 2}, "b": {"rate": 1, "burst": 5}}), clock)
    assert admit_all(h, 10, roles=frozenset({"a"})) == 2
    # Same user, new roles (after a reload of the users): the bucket keeps its level (empty)...
    assert admit_all(h, 10, roles=frozenset({"b"})) == 0
    # ...and the new role's limit is the one in force.
    clock.advance(100)
    assert admit_all(h, 10, roles=frozenset({"b"})) == 5


def test_shares_scale_the_local_bucket_and_clip_into_overflow() -> None:
    clock = Clock()
    h = Hierarchy(cfg(**{"global": {"rate": 90, "burst": 30}}), clock)
    h.default_share = 1 / 3
    assert admit_all(h, 100) == 10
    b = h.bucket("global")
    assert b is not None and b.rate == pytest.approx(30)
    clock.advance(10)
    b.refill(clock())
    assert b.tokens == pytest.approx(10)
    assert b.overflow == pytest.approx(300 - 10)  # what it could not keep, for the pool
    b.set_share(0.1, clock())
    assert b.tokens == pytest.approx(3)
    assert b.overflow == pytest.approx(290 + 7)
    b.set_share(0.0, clock())
    # A share smaller than one request still admits one at a time.
    assert b.burst == 1 and b.rate == 0


async def test_limiter_raises_rate_limited_naming_the_level() -> None:
    clock = Clock()
    rl = RateLimiter(cfg(users={"alice": {"rate": 2, "burst": 1}}), DistributedRateLimitConfig(), clock=clock)
    await rl.start()
    await rl.acquire("alice", NOROLES, "demo")
    with pytest.raises(RateLimited) as ei:
        await rl.acquire("alice", NOROLES, "demo")
    e = ei.value
    assert (e.http_status, e.sqlstate, e.decision) == (429, "53400", "rate_limited")
    assert e.rule == "rate-limit:user"
    assert "per-user limit for 'alice' (2/s, burst 1)" in e.message
    assert e.retry_after == pytest.approx(0.5)
    assert rl.admitted == 1 and rl.rejected["user"] == 1
    snap = await rl.snapshot()
    assert snap["buckets"][0]["key"] == "user:alice"
    assert snap["distributed"] == {"enabled": False}
    await rl.close()


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"rate_limits": {"global": {"rate": 0}}})
    assert ei.value.problems[0].path == "rate_limits.global.rate"
    with pytest.raises(ConfigError) as ei:
        parse_config({"rate_limits": {"roles": {"nosuch": {"rate": 1}}}})
    assert "rate_limits.roles.nosuch: unknown role" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        parse_config({"distributed_rate_limiting": {"enabled": True, "url": "http://x"}})
    assert "redis://" in str(ei.value)
    ok = parse_config({"rate_limits": {"global": {"rate": 5}}})
    assert ok.rate_limits.global_ is not None and ok.rate_limits.global_.capacity == 5


def test_removing_a_users_override_lifts_it_at_once() -> None:
    clock = Clock()
    users = {"alice": {"rate": 0.001, "burst": 2}}
    h = Hierarchy(cfg(user_default={"rate": 1, "burst": 5}, users=users), clock)
    assert admit_all(h, 10) == 2
    # Raising the override keeps the empty bucket...
    h.configure(cfg(user_default={"rate": 1, "burst": 5}, users={"alice": {"rate": 0.001, "burst": 9}}))
    assert admit_all(h, 10) == 0
    # ...removing it hands alice to the default, with a bucket of its own.
    h.configure(cfg(user_default={"rate": 1, "burst": 5}))
    assert admit_all(h, 10) == 5
