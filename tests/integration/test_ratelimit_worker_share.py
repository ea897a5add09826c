"""The rate limiter of a wire worker process ([wire] workers = N): 1/N of every limit alone,
a node of the cluster with distributed rate limiting on a real Redis, 1/N again when a reload
switches that off."""

from __future__ import annotations

from sqlproxy.pipeline.errors import RateLimited
from sqlproxy.ratelimit import RateLimiter
from sqlproxy.ratelimit.config import DistributedRateLimitConfig
from tests.unit.test_ratelimit_hierarchy import NOROLES, Clock, cfg


async def test_a_wire_workers_limiter_holds_its_share_alone_and_again_after_redis(redis_url: str) -> None:
    # Each of N wire worker processes holds 1/N of every limit when not distributed, from the
    # start and again when a reload switches distributed rate limiting off.
    clock = Clock()
    limits = cfg(users={"alice": {"rate": 10, "burst": 8}})
    rl = RateLimiter(limits, DistributedRateLimitConfig(), clock=clock)
    rl.alone_share = 0.5
    await rl.start()
    admitted = 0
    for _ in range(20):
        try:
            await rl.acquire("alice", NOROLES, "demo")
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 4  # half of the burst of 8
    bucket = rl.hierarchy.bucket("user:alice")
    assert bucket is not None and bucket.rate == 5
    # A reload switches distributed rate limiting on (this worker is a node of the cluster,
    # the only one: it holds the whole limit) and then off again.
    await rl.reconfigure(limits, DistributedRateLimitConfig(enabled=True, url=redis_url))
    assert rl.distributed is not None and bucket.rate == 10
    await rl.reconfigure(limits, DistributedRateLimitConfig())
    assert rl.distributed is None and bucket.rate == 5 and rl.hierarchy.default_share == 0.5
    await rl.close()
