"""A load-generating proxy node, for the distributed tests and the benchmark.

    python -m sqlproxy.ratelimit.loadnode --redis URL --node-id n1 --rate 3000 --offered 1500

Runs the real ``RateLimiter`` (global level, distributed on Redis) in its own process and offers
requests at a steady rate, printing one JSON line per report interval:
``{"node", "t", "admitted", "offered", "share", "nodes", "degraded", "borrowed"}`` (counters are
cumulative since the start of the load). Reads commands on stdin: ``offered X`` changes the
offered rate, ``quit`` leaves the cluster cleanly and exits after a final line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

from sqlproxy.pipeline.errors import RateLimited
from sqlproxy.ratelimit.config import DistributedRateLimitConfig, RateLimitConfig
from sqlproxy.ratelimit.service import RateLimiter

_TICK_S = 0.002


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--prefix", default="sqlproxy:rl")
    p.add_argument("--rate", type=float, required=True, help="global limit, requests/s (cluster)")
    p.add_argument("--burst", type=float, default=None)
    p.add_argument("--offered", type=float, required=True, help="requests/s this node offers")
    p.add_argument("--sync", type=float, default=5.0, help="sync interval, s")
    p.add_argument("--ttl", type=float, default=None, help="heartbeat TTL, s")
    p.add_argument("--report", type=float, default=0.1, help="report interval, s")
    p.add_argument("--start-at", type=float, default=None, help="wall-clock time to start offering")
    p.add_argument("--duration", type=float, default=None, help="stop offering after this long, s")
    p.add_argument("--assumed-nodes", type=int, default=1)
    p.add_argument("--expect-nodes", type=int, default=1, help="wait until this many nodes are live")
    return p.parse_args(argv)


async def _main(a: argparse.Namespace) -> None:
    limits = RateLimitConfig.model_validate({"global": {"rate": a.rate, "burst": a.burst}})
    dist = DistributedRateLimitConfig(
        enabled=True,
        url=a.redis,
        key_prefix=a.prefix,
        node_id=a.node_id,
        sync_interval_s=a.sync,
        node_ttl_s=a.ttl,
        assumed_nodes=a.assumed_nodes,
    )
    rl = RateLimiter(limits, dist)
    await rl.start()
    d = rl.distributed
    assert d is not None
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"offered_rate": a.offered, "quit": False}

    def on_line(line: str) -> None:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "offered":
            state["offered_rate"] = float(arg)
        elif cmd == "quit":
            state["quit"] = True

    def reader() -> None:
        # End of input is not "quit": a driver that only waits for --duration closes stdin.
        for line in sys.stdin:
            loop.call_soon_threadsafe(on_line, line)

    threading.Thread(target=reader, daemon=True).start()
    # Buckets start with 1/N of the burst; a node that starts offering before it has seen the
    # others would start with too large a share (that is bounded, but it is not what we measure).
    deadline = time.monotonic() + 30.0
    while d.nodes < a.expect_nodes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        await d.sync()
    if a.start_at is not None:
        await asyncio.sleep(max(0.0, a.start_at - time.time()))
    roles: frozenset[str] = frozenset()
    t0 = time.monotonic()
    admitted = offered = 0
    owed = 0.0  # requests due but not yet offered
    last = t0
    next_report = t0

    def report(final: bool = False) -> None:
        g = rl.hierarchy.bucket("global")
        line = {
            "node": a.node_id,
            "t": round(time.monotonic() - t0, 4),
            "admitted": admitted,
            "offered": offered,
            "share": round(g.share, 4) if g is not None else None,
            "nodes": d.nodes,
            "degraded": d.degraded,
            "borrowed": round(d.stats.borrowed_tokens, 1),
            "donated": round(d.stats.donated_tokens, 1),
            "final": final,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    while not state["quit"]:
        now = time.monotonic()
        if a.duration is not None and now - t0 >= a.duration:
            break
        owed += (now - last) * state["offered_rate"]
        last = now
        while owed >= 1.0:
            owed -= 1.0
            offered += 1
            try:
                await rl.acquire("load", roles, None)
                admitted += 1
            except RateLimited:
                pass
        if now >= next_report:
            report()
            next_report = now + a.report
        await asyncio.sleep(_TICK_S)
    report(final=True)
    await rl.close()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_main(_parse(argv)))


if __name__ == "__main__":
    main()
