"""The rate limiter as the runtime sees it: one object for the life of the process (bucket state
must survive reloads), reconfigured in place, with the distributed tier switched on by config.

Rejections raise ``RateLimited``: HTTP 429 with ``Retry-After``; on the PostgreSQL wire an
ErrorResponse with SQLSTATE 53400 (configuration_limit_exceeded, class 53 "insufficient
resources", which drivers treat as retryable). The message names the level that refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from sqlproxy.pipeline.errors import RateLimited
from sqlproxy.ratelimit.config import DistributedRateLimitConfig, RateLimitConfig
from sqlproxy.ratelimit.distributed import DistributedLimiter
from sqlproxy.ratelimit.hierarchy import LEVELS, Clock, Hierarchy, Rejection

log = logging.getLogger(__name__)

# Levels in the order a request is checked, for display.
_LEVEL_ORDER = {lvl: i for i, lvl in enumerate(LEVELS)}


class RateLimiter:
    def __init__(
        self,
        limits: RateLimitConfig,
        distributed: DistributedRateLimitConfig,
        clock: Clock = time.monotonic,
    ) -> None:
        self.hierarchy = Hierarchy(limits, clock)
        self.dist_config = distributed
        self.distributed: DistributedLimiter | None = None
        # The share of every limit this process holds when it is not a node of a distributed
        # cluster: 1, or 1/N in each of N wire worker processes.
        self.alone_share = 1.0
        self.admitted = 0
        self.rejected: Counter[str] = Counter()
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        return self.hierarchy.active

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        if not self.dist_config.enabled:
            self._set_share(self.alone_share)
        if self.dist_config.enabled:
            self.distributed = DistributedLimiter(self.hierarchy, self.dist_config)
            await self.distributed.start()

    async def close(self) -> None:
        self._started = False
        if self.distributed is not None:
            await self.distributed.close()
            self.distributed = None

    def apply(self, limits: RateLimitConfig, distributed: DistributedRateLimitConfig) -> None:
        """A reload, from synchronous code: the new limits apply before this returns; a changed
        Redis connection is reopened in the background."""
        self.hierarchy.configure(limits)
        if distributed == self.dist_config:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.dist_config = distributed  # not started yet: start() will use it
            return
        task = loop.create_task(self.reconfigure(limits, distributed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reconfigure(self, limits: RateLimitConfig, distributed: DistributedRateLimitConfig) -> None:
        """A reload: new limits apply to the existing buckets (their tokens are kept)."""
        self.hierarchy.configure(limits)
        if distributed == self.dist_config:
            return
        old, self.dist_config = self.dist_config, distributed
        if not self._started:
            return
        d = self.distributed
        if d is not None and distributed.enabled and d.reconfigure(distributed):
            return
        log.info("rate limiter: distributed settings changed (%s -> %s)", old.enabled, distributed.enabled)
        if d is not None:
            await d.close()
            self.distributed = None
            if not distributed.enabled:
                # Alone again: this node's buckets hold the whole limit (its part of it, in a
                # wire worker process).
                self._set_share(self.alone_share)
        if distributed.enabled:
            self.distributed = DistributedLimiter(self.hierarchy, distributed)
            await self.distributed.start()

    def _set_share(self, share: float) -> None:
        now = self.hierarchy.clock()
        self.hierarchy.default_share = share
        for b in self.hierarchy.buckets():
            b.set_share(share, now)

    # -- the check ------------------------------------------------------------------------------
    def try_acquire(self, user: str, roles: frozenset[str], database: str | None) -> Rejection | None:
        """Local tier only (no I/O)."""
        r = self.hierarchy.try_acquire(user, roles, database)
        if r is None:
            self.admitted += 1
        return r

    async def acquire(self, user: str, roles: frozenset[str], database: str | None) -> None:
        """Admit the request or raise RateLimited naming the level that refused."""
        pending = self.admit(user, roles, database)
        if pending is not None:
            await pending

    def admit(
        self, user: str, roles: frozenset[str], database: str | None
    ) -> Coroutine[Any, Any, None] | None:
        """``acquire`` without a coroutine on the common path: None when the local tier
        admits the request; else a coroutine to await, which borrows from the cluster or
        raises RateLimited."""
        r = self.try_acquire(user, roles, database)
        return None if r is None else self.after_rejection(r, user, roles, database)

    async def after_rejection(
        self, r: Rejection, user: str, roles: frozenset[str], database: str | None
    ) -> None:
        """What ``acquire`` does when the local tier said no (``try_acquire`` returned ``r``):
        borrow from the cluster, or raise RateLimited. A caller that must not await on the
        common path checks ``try_acquire`` itself and comes here only when refused."""
        h = self.hierarchy
        d = self.distributed
        if d is not None:
            # Local shares said no; the cluster may have budget other nodes do not use. Borrow
            # for every level that refused, then check all levels again from scratch (state may
            # have moved during the round trips). Borrowed tokens that do not end up used stay
            # in the local bucket for the next request.
            got = 0.0
            for b in r.failed:
                got += await d.borrow(b, 1.0)
            if got > 0.0:
                again = h.try_acquire(user, roles, database)
                if again is None:
                    # The first attempt was counted as a rejection at its level; it was not one.
                    if len(r.failed) == 1:
                        r.failed[0].rejected -= 1
                    self.admitted += 1
                    return
                r = again
        self.rejected[r.level] += 1
        raise RateLimited(r.message(), rule=f"rate-limit:{r.level}", retry_after=r.retry_after)

    # -- visibility -----------------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        h = self.hierarchy
        now = h.clock()
        c = h.config
        buckets = sorted(h.buckets(), key=lambda b: (_LEVEL_ORDER[b.level], b.subject))
        rows = []
        for b in buckets:
            b.refill(now)
            rows.append(
                {
                    "level": b.level,
                    "subject": b.subject or None,
                    "key": b.key,
                    "limit": {"rate": b.limit.rate, "burst": b.limit.capacity},
                    "share": round(b.share, 6),
                    "local": {
                        "rate": round(b.rate, 6),
                        "burst": round(b.burst, 6),
                        "tokens": round(b.tokens, 3),
                    },
                    "borrowed": round(b.borrowed, 3),
                }
            )
        out: dict[str, Any] = {
            "enabled": h.active,
            "limits": c.model_dump(mode="json", by_alias=True, exclude_none=True),
            "admitted": self.admitted,
            "rejected": dict(self.rejected),
            "buckets": rows,
            "distributed": {"enabled": False},
        }
        d = self.distributed
        if d is not None:
            st = d.stats
            view = await d.cluster_view([b.key for b in buckets[:100]])
            out["distributed"] = {
                "enabled": True,
                "node_id": d.node_id,
                "redis": "down" if d.degraded else "up",
                "mode": "static-share" if d.degraded else "shared",
                "nodes": d.nodes,
                "live_nodes": view.get("nodes"),
                "sync_interval_s": d.config.sync_interval_s,
                "syncs": st.syncs,
                "sync_failures": st.sync_failures,
                "borrowed_tokens": round(st.borrowed_tokens, 3),
                "donated_tokens": round(st.donated_tokens, 3),
                "cluster": view.get("buckets", {}),
            }
        return out

    def collector(self) -> Collector:
        return _Collector(self)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(self.collector())


class _Collector(Collector):
    """Read at scrape time, so the hot path only bumps plain integers."""

    def __init__(self, rl: RateLimiter) -> None:
        self.rl = rl

    def collect(self) -> Iterator[Any]:
        rl = self.rl
        dec = CounterMetricFamily(
            "sqlproxy_ratelimit_decisions", "Rate limiter decisions by level", labels=["level", "result"]
        )
        dec.add_metric(["all", "admitted"], rl.admitted)
        for level in LEVELS:
            dec.add_metric([level, "rejected"], rl.rejected.get(level, 0))
        yield dec
        share = GaugeMetricFamily(
            "sqlproxy_ratelimit_share", "Share of the cluster-wide limit this node holds", labels=["level"]
        )
        tokens = GaugeMetricFamily(
            "sqlproxy_ratelimit_tokens", "Tokens available in this node's global bucket", labels=["level"]
        )
        g = rl.hierarchy.bucket("global")
        if g is not None:
            share.add_metric(["global"], g.share)
            tokens.add_metric(["global"], g.tokens)
        yield share
        yield tokens
        d = rl.distributed
        up = GaugeMetricFamily(
            "sqlproxy_ratelimit_redis_up",
            "1 when the distributed limiter reaches Redis; 0 means the static 1/N share is in force",
        )
        nodes = GaugeMetricFamily("sqlproxy_ratelimit_nodes", "Live proxy nodes seen through Redis")
        degraded = CounterMetricFamily(
            "sqlproxy_ratelimit_fallbacks", "Times this node fell back to its static share (Redis down)"
        )
        errs = CounterMetricFamily("sqlproxy_ratelimit_redis_errors", "Failed Redis calls of the limiter")
        syncs = CounterMetricFamily("sqlproxy_ratelimit_syncs", "Successful syncs with Redis")
        borrowed = CounterMetricFamily(
            "sqlproxy_ratelimit_borrowed_tokens", "Tokens borrowed from the cluster pool"
        )
        donated = CounterMetricFamily(
            "sqlproxy_ratelimit_donated_tokens", "Unused tokens given to the cluster pool"
        )
        if d is not None:
            up.add_metric([], 0 if d.degraded else 1)
            nodes.add_metric([], d.nodes)
            degraded.add_metric([], d.stats.degraded_episodes)
            errs.add_metric([], d.stats.redis_errors)
            syncs.add_metric([], d.stats.syncs)
            borrowed.add_metric([], d.stats.borrowed_tokens)
            donated.add_metric([], d.stats.donated_tokens)
        yield from (up, nodes, degraded, errs, syncs, borrowed, donated)
