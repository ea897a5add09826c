"""Token buckets at four levels, checked together.

A request must pass every level that has a limit, and the check is atomic across levels: the
buckets are refilled and tested first, and tokens are taken from all of them only when all of
them have enough, so a request rejected at one level costs nothing at the others. The whole check
runs without an ``await``, so on one event loop it is atomic without a lock.

Each bucket may hold only a ``share`` of its configured limit: the distributed limiter gives every
node a share of the cluster-wide budget (``sqlproxy.ratelimit.distributed``); alone, a node's share
is 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlproxy.ratelimit.config import Limit, RateLimitConfig

Clock = Callable[[], float]

LEVELS = ("global", "user", "database", "user_database")
LEVEL_LABELS = {
    "global": "global",
    "user": "per-user",
    "database": "per-database",
    "user_database": "per-user-per-database",
}

# A rejection never tells a client to wait longer than this: limits may be raised by a reload,
# and borrowed budget may arrive sooner than the local refill suggests.
MAX_RETRY_AFTER_S = 60.0


class Bucket:
    """One token bucket. ``tokens`` may exceed ``burst`` only by borrowed tokens; refill beyond
    ``burst`` is counted in ``overflow`` (budget this node could not use, which the distributed
    limiter hands to other nodes)."""

    __slots__ = (
        "admitted",
        "borrow_after",
        "borrowed",
        "burst",
        "key",
        "level",
        "limit",
        "overflow",
        "pool_full",
        "rate",
        "rejected",
        "share",
        "stamp",
        "subject",
        "tokens",
    )

    def __init__(self, level: str, subject: str, limit: Limit, now: float, share: float = 1.0) -> None:
        self.level = level
        self.subject = subject
        self.key = f"{level}:{subject}" if subject else level
        self.limit = limit
        self.share = share
        self.rate = limit.rate * share
        self.burst = _local_burst(limit, share)
        self.tokens = self.burst
        self.stamp = now
        self.overflow = 0.0
        # Counters since the last distributed sync (demand = admitted + rejected here alone).
        self.admitted = 0
        self.rejected = 0
        self.borrowed = 0.0
        self.borrow_after = 0.0
        self.pool_full = False

    def refill(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0.0:
            self.stamp = now
            add = dt * self.rate
            t = self.tokens + add
            if t > self.burst:
                over = add if self.tokens >= self.burst else t - self.burst
                self.overflow += over
                t = self.tokens if self.tokens >= self.burst else self.burst
            self.tokens = t

    def set_limit(self, limit: Limit, now: float) -> None:
        """A reload changed the limit: keep the bucket's level (clipped to the new burst)."""
        self.refill(now)
        self.limit = limit
        self.set_share(self.share, now)

    def set_share(self, share: float, now: float) -> None:
        self.refill(now)
        old_burst = self.burst
        self.share = share
        self.rate = self.limit.rate * share
        self.burst = _local_burst(self.limit, share)
        # A smaller share takes away at most the burst it no longer owns (tokens borrowed above
        # the burst stay: they were paid for); what is taken goes back to the cluster's pool.
        excess = min(self.tokens - self.burst, old_burst - self.burst)
        if excess > 0:
            self.overflow += excess
            self.tokens -= excess

    def wait_for(self, cost: float) -> float:
        deficit = cost - self.tokens
        if deficit <= 0:
            return 0.0
        if self.rate <= 0:
            return MAX_RETRY_AFTER_S
        return min(MAX_RETRY_AFTER_S, deficit / self.rate)

    def describe(self) -> str:
        who = f" for {self.subject!r}" if self.subject else ""
        return f"{LEVEL_LABELS[self.level]} limit{who} ({self.limit.describe()})"


def _local_burst(limit: Limit, share: float) -> float:
    # A share smaller than one request would never admit anything locally; one token keeps a
    # small node useful at the price of a burst of at most one request per node.
    return max(limit.capacity * share, 1.0)


@dataclass(frozen=True, slots=True)
class Rejection:
    bucket: Bucket  # the first level that refused (global, user, database, user_database order)
    failed: tuple[Bucket, ...]  # every level that refused
    retry_after: float

    @property
    def level(self) -> str:
        return self.bucket.level

    def message(self) -> str:
        return f"rate limit exceeded: {self.bucket.describe()}; retry after {self.retry_after:.3g}s"


class Hierarchy:
    """The buckets of one node. ``try_acquire`` is the hot path."""

    def __init__(self, config: RateLimitConfig, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.config = config
        self._buckets: dict[str, Bucket] = {}
        self._chains: dict[tuple[str, str | None], tuple[frozenset[str], tuple[Bucket, ...]]] = {}
        self._roles: dict[str, frozenset[str]] = {}
        # Share a newly created bucket starts with (1/N when distributed).
        self.default_share = 1.0

    @property
    def active(self) -> bool:
        return self.config.any_limit

    def buckets(self) -> Iterable[Bucket]:
        return self._buckets.values()

    def bucket(self, key: str) -> Bucket | None:
        return self._buckets.get(key)

    def try_acquire(
        self, user: str, roles: frozenset[str], database: str | None, cost: float = 1.0
    ) -> Rejection | None:
        """Take ``cost`` tokens from every level, or from none. None means admitted."""
        now = self.clock()
        entry = self._chains.get((user, database))
        if entry is None or (entry[0] is not roles and entry[0] != roles):
            chain = self._resolve(user, roles, database, now)
        else:
            chain = entry[1]
        # Optimistic: take as we go and give back if a later level refuses; the success path is
        # then one pass. This loop is the per-request cost of the limiter, hence the inlining.
        for b in chain:
            t = b.tokens
            dt = now - b.stamp
            if dt > 0.0:
                b.stamp = now
                add = dt * b.rate
                nt = t + add
                burst = b.burst
                if nt > burst:
                    if t >= burst:
                        b.overflow += add
                        nt = t
                    else:
                        b.overflow += nt - burst
                        nt = burst
                t = nt
            left = t - cost
            if left < 0.0:
                b.tokens = t
                return self._reject(chain, b, now, cost)
            b.tokens = left
            b.admitted += 1
        return None

    def _reject(self, chain: tuple[Bucket, ...], at: Bucket, now: float, cost: float) -> Rejection:
        seen = True
        for b in chain:
            if b is at:
                seen = False
            elif seen:
                b.tokens += cost
                b.admitted -= 1
            else:
                b.refill(now)
        failed = tuple(b for b in chain if b.tokens < cost)
        if len(failed) == 1:
            # Demand seen by a level is what it alone turned away plus what it admitted; a
            # request refused by several levels says nothing about any single one of them.
            failed[0].rejected += 1
        retry = max(b.wait_for(cost) for b in failed)
        return Rejection(failed[0], failed, retry)

    # -- resolution and reload ------------------------------------------------------------------
    def limits_for(
        self, user: str, roles: frozenset[str], database: str | None
    ) -> list[tuple[str, str, Limit]]:
        """(level, subject, limit) for every level that limits this user on this database."""
        c = self.config
        if not c.enabled:
            return []
        out: list[tuple[str, str, Limit]] = []
        if c.global_ is not None:
            out.append(("global", "", c.global_))
        ul = self._user_limit(user, roles)
        if ul is not None:
            out.append(("user", user, ul))
        if database is not None:
            dl = c.databases.get(database, c.database_default)
            if dl is not None:
                out.append(("database", database, dl))
            udl = c.user_databases.get(user, {}).get(database, c.user_database_default)
            if udl is not None:
                out.append(("user_database", f"{user}/{database}", udl))
        return out

    def _user_limit(self, user: str, roles: frozenset[str]) -> Limit | None:
        c = self.config
        if user in c.users:
            return c.users[user]
        by_role = [c.roles[r] for r in roles if r in c.roles]
        if by_role:
            return max(by_role, key=lambda lim: (lim.rate, lim.capacity))
        return c.user_default

    def _resolve(
        self, user: str, roles: frozenset[str], database: str | None, now: float
    ) -> tuple[Bucket, ...]:
        chain: list[Bucket] = []
        for level, subject, limit in self.limits_for(user, roles, database):
            key = f"{level}:{subject}" if subject else level
            b = self._buckets.get(key)
            if b is None:
                b = Bucket(level, subject, limit, now, self.default_share)
                self._buckets[key] = b
            elif b.limit != limit:
                b.set_limit(limit, now)
            chain.append(b)
        self._roles[user] = roles
        result = tuple(chain)
        self._chains[(user, database)] = (roles, result)
        return result

    def configure(self, config: RateLimitConfig) -> None:
        """Apply new limits (a reload). Buckets keep their tokens, clipped to the new bursts, so
        raising a limit is no way to refill a bucket. A bucket whose own limit was removed (a
        per-user or per-database override deleted, or a level switched off) is dropped: the
        operator lifted that throttle, and the subject starts afresh under what applies now."""
        now = self.clock()
        old_sources = {key: self._source_of(b) for key, b in self._buckets.items()}
        self.config = config
        self._chains.clear()
        for key, b in list(self._buckets.items()):
            limit = self._limit_of(b)
            if limit is None or self._source_of(b) != old_sources[key]:
                del self._buckets[key]
            elif limit != b.limit:
                b.set_limit(limit, now)

    def _source_of(self, b: Bucket) -> str:
        """Which configuration entry gives the bucket its limit."""
        c = self.config
        if b.level == "user":
            if b.subject in c.users:
                return "users"
            roles = self._roles.get(b.subject, frozenset())
            return "roles" if any(r in c.roles for r in roles) else "user_default"
        if b.level == "database":
            return "databases" if b.subject in c.databases else "database_default"
        if b.level == "user_database":
            user, _, db = b.subject.partition("/")
            return "user_databases" if db in c.user_databases.get(user, {}) else "user_database_default"
        return "global"

    def _limit_of(self, b: Bucket) -> Limit | None:
        c = self.config
        if not c.enabled:
            return None
        if b.level == "global":
            return c.global_
        if b.level == "user":
            return self._user_limit(b.subject, self._roles.get(b.subject, frozenset()))
        if b.level == "database":
            return c.databases.get(b.subject, c.database_default)
        user, _, db = b.subject.partition("/")
        return c.user_databases.get(user, {}).get(db, c.user_database_default)
