"""The distributed two-tier limiter.

Local tier: every bucket of the hierarchy holds a share of its cluster-wide limit (1/N to start,
N = live nodes seen through Redis heartbeats) and is checked in-process, with no round trip.

Global tier (Redis, Lua scripts in ``scripts``): when a local bucket refuses, the node borrows
from the shared pool of unused budget; budget a node cannot use (its bucket is full) is donated
to that pool in the background; every ``sync_interval_s`` each node reports its demand and gets
a share rebalanced by demand, so the node receiving most of the traffic holds most of the budget.

When Redis is unreachable the node keeps its static 1/N share (neither fail-open nor
fail-closed), logs it once, exposes it in metrics, and keeps trying; the first sync that works
puts it back in the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sqlproxy.ratelimit import scripts
from sqlproxy.ratelimit.config import DistributedRateLimitConfig
from sqlproxy.ratelimit.hierarchy import Bucket, Hierarchy

log = logging.getLogger(__name__)

# Overflow smaller than this is not worth a Redis write; it is dropped like any bucket overflow.
_MIN_DONATION = 0.5
# After Redis comes back, how long a node keeps its static share (see sync()).
_RECOVERY_HOLD_S = 2.0


@dataclass
class DistributedStats:
    syncs: int = 0
    sync_failures: int = 0
    borrow_calls: int = 0
    borrowed_tokens: float = 0.0
    donated_tokens: float = 0.0
    redis_errors: int = 0
    degraded_since: float | None = None
    degraded_episodes: int = 0
    last_sync_ok: float | None = None


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class DistributedLimiter:
    def __init__(self, hierarchy: Hierarchy, config: DistributedRateLimitConfig) -> None:
        self.h = hierarchy
        self.config = config
        self.node_id = config.node_id or default_node_id()
        self.nodes = config.assumed_nodes
        self.degraded = True  # until the first sync succeeds
        self.stats = DistributedStats(degraded_since=time.monotonic())
        self._redis: aioredis.Redis | None = None
        self._sync: Any = None
        self._borrow: Any = None
        self._donate: Any = None
        self._leave: Any = None
        self._task: asyncio.Task[None] | None = None
        self._last_sync_clock = hierarchy.clock()
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Future[float]] = {}
        self._hold_static: tuple[float, int] | None = None
        self._logged_down = False
        self.h.default_share = 1.0 / self.nodes

    @property
    def prefix(self) -> str:
        return self.config.key_prefix

    def _bkey(self, b: Bucket) -> str:
        return f"{self.prefix}:b:{b.key}"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        self._redis = aioredis.Redis.from_url(
            c.url,
            socket_timeout=c.socket_timeout_s,
            socket_connect_timeout=c.socket_timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._sync = self._redis.register_script(scripts.SYNC)
        self._borrow = self._redis.register_script(scripts.BORROW)
        self._donate = self._redis.register_script(scripts.DONATE)
        self._leave = self._redis.register_script(scripts.LEAVE)
        self._apply_static_share()
        await self.sync()
        self._task = asyncio.create_task(self._run(), name="ratelimit-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            if not self.degraded:
                keys = [f"{self.prefix}:nodes", *(self._bkey(b) for b in self.h.buckets())]
                try:
                    await self._leave(keys=keys, args=[self.node_id])
                except (RedisError, OSError) as e:
                    log.warning("rate limiter: could not leave the cluster cleanly: %s", e)
            await self._redis.aclose()
            self._redis = None

    def reconfigure(self, config: DistributedRateLimitConfig) -> bool:
        """Apply new timings; returns False when the change needs a restart (URL, prefix, id)."""
        old = self.config
        if (old.url, old.key_prefix, old.node_id) != (config.url, config.key_prefix, config.node_id):
            return False
        self.config = config
        self._wake.set()
        return True

    # -- background -----------------------------------------------------------------------------
    async def _run(self) -> None:
        next_sync = time.monotonic() + self.config.sync_interval_s
        while True:
            c = self.config
            # While Redis is down, look for it at least every second so recovery is quick.
            interval = min(c.sync_interval_s, 1.0) if self.degraded else c.sync_interval_s
            next_sync = min(next_sync, time.monotonic() + interval)
            wait = min(c.donate_interval_s, max(0.0, next_sync - time.monotonic()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            try:
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.config.sync_interval_s
                    await self.sync()
                    if self._hold_static is not None:
                        # Take the real share as soon as the hold after an outage ends.
                        hold_left = self._hold_static[0] - self.h.clock()
                        next_sync = min(next_sync, time.monotonic() + max(0.0, hold_left) + 0.05)
                elif not self.degraded:
                    await self.donate()
            except Exception:
                # The loop must survive anything: without it the node would keep a stale share.
                log.exception("rate limiter: background sync failed")

    def _apply_static_share(self) -> None:
        now = self.h.clock()
        share = 1.0 / max(1, self.nodes)
        self.h.default_share = share
        for b in self.h.buckets():
            if b.share != share:
                b.set_share(share, now)

    def _went_down(self, err: BaseException) -> None:
        self.stats.redis_errors += 1
        if not self.degraded:
            self.degraded = True
            self.stats.degraded_since = time.monotonic()
            self.stats.degraded_episodes += 1
            self._apply_static_share()
        if not self._logged_down:
            self._logged_down = True
            log.warning(
                "rate limiter: Redis at %s unreachable (%s); using the static 1/%d share until it returns",
                _safe_url(self.config.url),
                err,
                self.nodes,
            )

    def _came_back(self) -> None:
        if self.degraded:
            if self._logged_down:
                log.warning("rate limiter: Redis reachable again; node %s rejoined", self.node_id)
            self.degraded = False
            self.stats.degraded_since = None
            self._logged_down = False

    async def sync(self) -> bool:
        """Heartbeat, report demand and donations, take the rebalanced shares."""
        if self._redis is None:
            return False
        now = self.h.clock()
        elapsed = max(1e-6, now - self._last_sync_clock)
        buckets = list(self.h.buckets())
        args: list[Any] = [self.node_id, int(self.config.ttl_s * 1000), self.config.demand_headroom]
        # Requests keep arriving during the round trip: what is reported is subtracted afterwards
        # rather than reset, so nothing counted meanwhile is lost.
        taken: list[tuple[int, int, float]] = []
        for b in buckets:
            b.refill(now)
            donation = b.overflow if not self.degraded else 0.0
            taken.append((b.admitted, b.rejected, donation))
            demand = (b.admitted + b.rejected) / elapsed
            args += [demand, b.admitted / elapsed, donation, b.limit.capacity, b.limit.rate]
        try:
            reply = await self._sync(keys=[f"{self.prefix}:nodes", *map(self._bkey, buckets)], args=args)
        except (RedisError, OSError) as e:
            self.stats.sync_failures += 1
            self._went_down(e)
            for b in buckets:
                # Budget the node could not use while alone is lost, as a plain bucket's would be.
                b.overflow = 0.0
            return False
        self.stats.syncs += 1
        self.stats.last_sync_ok = time.monotonic()
        self._last_sync_clock = now
        static_nodes = self.nodes
        self.nodes = max(1, int(reply[0]))
        self.h.default_share = 1.0 / self.nodes
        if self.degraded and self.stats.syncs > 1:
            # Back after an outage. A restarted Redis has forgotten every node, and the first
            # node to return would see itself alone and take the whole budget while the others,
            # not yet back, still use their static shares. Keep the static share until all of
            # them have had time to re-register (they retry at least every second).
            self._hold_static = (self.h.clock() + _RECOVERY_HOLD_S, max(static_nodes, self.nodes))
        self._came_back()
        now = self.h.clock()
        cap = 1.0
        if self._hold_static is not None:
            until, n = self._hold_static
            if now < until:
                cap = 1.0 / n
            else:
                self._hold_static = None
        for i, b in enumerate(buckets):
            adm, rej, donated = taken[i]
            b.admitted -= adm
            b.rejected -= rej
            b.overflow = max(0.0, b.overflow - donated)
            self.stats.donated_tokens += donated
            b.pool_full = False
            # A share that shrinks clips the bucket; the clipped part goes out with the next donation.
            b.set_share(min(cap, float(reply[1 + 2 * i])), now)
        return True

    async def donate(self) -> None:
        """Hand budget this node could not use (its buckets were full) to the shared pool."""
        if self._redis is None or self.degraded:
            return
        now = self.h.clock()
        give: list[Bucket] = []
        for b in self.h.buckets():
            b.refill(now)
            if b.overflow >= _MIN_DONATION and not b.pool_full:
                give.append(b)
            elif b.pool_full:
                b.overflow = 0.0
        if not give:
            return
        args: list[Any] = []
        for b in give:
            args += [b.overflow, b.limit.capacity]
        try:
            pools = await self._donate(keys=[self._bkey(b) for b in give], args=args)
        except (RedisError, OSError) as e:
            self._went_down(e)
            return
        for b, amount, pool in zip(give, args[::2], pools, strict=True):
            self.stats.donated_tokens += amount
            b.overflow = max(0.0, b.overflow - amount)
            # A full pool will not take more until someone borrows; stop writing until next sync.
            b.pool_full = float(pool) >= b.limit.capacity

    async def borrow(self, b: Bucket, cost: float) -> float:
        """Ask the global tier for unused budget for ``b``; returns the tokens added to it.
        Concurrent requests short of the same bucket share one round trip."""
        if self._redis is None or self.degraded:
            return 0.0
        if self.h.clock() < b.borrow_after:
            return 0.0
        pending = self._inflight.get(b.key)
        if pending is not None:
            await asyncio.shield(pending)
            return 0.0
        task = asyncio.ensure_future(self._borrow_once(b, cost))
        self._inflight[b.key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if self._inflight.get(b.key) is task:
                del self._inflight[b.key]

    async def _borrow_once(self, b: Bucket, cost: float) -> float:
        need = cost - b.tokens
        # Borrow a little ahead (a tenth of a second of the full rate) so that a node that has
        # run out does not make a round trip per request.
        want = max(need, b.limit.rate * 0.1)
        self.stats.borrow_calls += 1
        try:
            got = float(await self._borrow(keys=[self._bkey(b)], args=[want, need]))
        except (RedisError, OSError) as e:
            self._went_down(e)
            return 0.0
        if got <= 0.0:
            b.borrow_after = self.h.clock() + self.config.borrow_backoff_s
            return 0.0
        b.refill(self.h.clock())
        b.tokens += got
        b.borrowed += got
        self.stats.borrowed_tokens += got
        return got

    async def cluster_view(self, keys: list[str]) -> dict[str, Any]:
        """Per node demand, admission and share for the given buckets, as Redis has them."""
        if self._redis is None or self.degraded:
            return {}
        try:
            nodes = await self._redis.zrange(f"{self.prefix}:nodes", 0, -1)
            pipe = self._redis.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(f"{self.prefix}:b:{k}")
            raw = await pipe.execute()
        except (RedisError, OSError) as e:
            self._went_down(e)
            return {}
        out: dict[str, Any] = {"nodes": [_text(n) for n in nodes], "buckets": {}}
        for k, h in zip(keys, raw, strict=True):
            per: dict[str, dict[str, float]] = {}
            pool = 0.0
            for f, v in h.items():
                name = f.decode()
                if name == "pool":
                    pool = float(v)
                    continue
                kind, node = name[:1], name[2:]
                field = {"d": "demand_per_s", "a": "admitted_per_s", "h": "share"}.get(kind)
                if field is not None:
                    per.setdefault(node, {})[field] = round(float(v), 6)
            out["buckets"][k] = {"pool": round(pool, 3), "nodes": per}
        return out


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _safe_url(url: str) -> str:
    # Never log a password from the URL.
    _, sep, tail = url.rpartition("@")
    return f"{url.split('://', 1)[0]}://***@{tail}" if sep else url
