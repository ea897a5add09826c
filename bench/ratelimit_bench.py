"""Rate limiter benchmark (issue #5).

  (a) the cost of one local check (in-process, no Redis), in ns, for 1, 2 and 4 levels;
  (b) accuracy of the distributed limiter: 3 node processes on one Redis, a global limit of a few
      thousand per second, offered 1.5x the limit, evenly and with 90% on one node:
      admitted / (rate x duration + burst);
  (c) what is admitted while Redis is down (stopped mid-run, restarted later).

    .venv/bin/python bench/ratelimit_bench.py [--duration 60] [--rate 3000] [--skip-distributed]

Starts its own redis-server (or uses SQLPROXY_BENCH_REDIS_URL, but then (c) is skipped).
Figures depend on the machine and its load; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from sqlproxy.embedded.redis import EmbeddedRedis
from sqlproxy.pipeline.errors import RateLimited
from sqlproxy.ratelimit import Hierarchy, RateLimitConfig, RateLimiter
from sqlproxy.ratelimit.config import DistributedRateLimitConfig

BIG = {"rate": 1e12, "burst": 1e12}


def local_cost(n: int = 300_000, repeat: int = 7) -> None:
    print("(a) one local check (Hierarchy.try_acquire, admitted), best of", repeat, "runs of", n)
    cases = {
        "1 level (global)": {"global": BIG},
        "2 levels (global, user)": {"global": BIG, "user_default": BIG},
        "4 levels (all)": {
            "global": BIG,
            "user_default": BIG,
            "database_default": BIG,
            "user_database_default": BIG,
        },
    }
    roles = frozenset({"analyst"})
    for name, limits in cases.items():
        h = Hierarchy(RateLimitConfig.model_validate(limits))
        f = h.try_acquire
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter_ns()
            for _ in range(n):
                f("alice", roles, "demo")
            best = min(best, (time.perf_counter_ns() - t) / n)
        print(f"    {name:28s} {best:8.0f} ns")
    rl = RateLimiter(
        RateLimitConfig.model_validate({"global": BIG, "user_default": BIG}), DistributedRateLimitConfig()
    )

    async def via_acquire() -> float:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter_ns()
            for _ in range(n // 3):
                await rl.acquire("alice", roles, "demo")
            best = min(best, (time.perf_counter_ns() - t) / (n // 3))
        return best

    print(f"    {'2 levels via await acquire()':28s} {asyncio.run(via_acquire()):8.0f} ns")
    # A rejection builds an exception with a message; it is the cost a client over its limit pays.
    rl2 = RateLimiter(
        RateLimitConfig.model_validate({"global": {"rate": 1e-9, "burst": 1}}), DistributedRateLimitConfig()
    )

    async def rejections() -> float:
        t = time.perf_counter_ns()
        k = 50_000
        for _ in range(k):
            with contextlib.suppress(RateLimited):
                await rl2.acquire("alice", roles, "demo")
        return (time.perf_counter_ns() - t) / k

    print(f"    {'rejection (raises RateLimited)':28s} {asyncio.run(rejections()):8.0f} ns")


class Node:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sqlproxy.ratelimit.loadnode", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reports: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.reports.append(json.loads(line))

    def at(self, t: float) -> dict[str, Any]:
        """The last report at or before t seconds into the load."""
        best = self.reports[0]
        for r in self.reports:
            if r["t"] <= t:
                best = r
        return best

    def wait(self) -> dict[str, Any]:
        self.proc.wait()
        deadline = time.monotonic() + 10
        while (not self.reports or not self.reports[-1]["final"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.reports[-1]


def run_cluster(
    url: str, rate: float, burst: float, offered: list[float], duration: float, sync: float, prefix: str
) -> list[Node]:
    start_at = time.time() + 4.0
    return [
        Node(
            [
                "--redis",
                url,
                "--prefix",
                prefix,
                "--node-id",
                f"n{i}",
                "--rate",
                str(rate),
                "--burst",
                str(burst),
                "--offered",
                str(o),
                "--sync",
                str(sync),
                "--expect-nodes",
                str(len(offered)),
                "--start-at",
                str(start_at),
                "--duration",
                str(duration),
                "--report",
                "0.25",
            ]
        )
        for i, o in enumerate(offered)
    ]


def accuracy(url: str, rate: float, duration: float, sync: float) -> None:
    burst = rate
    total = 1.5 * rate
    print(
        f"(b) accuracy: 3 nodes, global limit {rate:g}/s burst {burst:g}, offered {total:g}/s, "
        f"{duration:g} s, sync every {sync:g} s"
    )
    for name, split in (("even", [1 / 3, 1 / 3, 1 / 3]), ("90% on one node", [0.9, 0.05, 0.05])):
        offered = [total * s for s in split]
        nodes = run_cluster(url, rate, burst, offered, duration, sync, f"bench{uuid.uuid4().hex[:6]}")
        finals = [n.wait() for n in nodes]
        admitted = sum(f["admitted"] for f in finals)
        ideal = rate * duration + burst
        static = sum(min(o * duration, rate / 3 * duration + burst / 3) for o in offered)
        print(
            f"    {name:16s} admitted {admitted:7d} / ideal {ideal:7.0f} = {admitted / ideal:6.3f}"
            f"  (error {abs(1 - admitted / ideal) * 100:4.1f}%; static 1/N split would admit"
            f" {static / ideal:5.3f}); per node {[f['admitted'] for f in finals]},"
            f" final shares {[f['share'] for f in finals]}"
        )


def outage(server: EmbeddedRedis, rate: float, sync: float) -> None:
    down_at, up_at, duration = 10.0, 25.0, 35.0
    print(
        f"(c) Redis outage: 3 nodes, limit {rate:g}/s, offered 1.5x; Redis stopped at "
        f"{down_at:g}s, restarted at {up_at:g}s, run {duration:g}s"
    )
    for name, split in (("even", [1 / 3, 1 / 3, 1 / 3]), ("90% on one node", [0.9, 0.05, 0.05])):
        offered = [1.5 * rate * s for s in split]
        nodes = run_cluster(server.url, rate, rate, offered, duration, sync, f"out{uuid.uuid4().hex[:6]}")
        deadline = time.monotonic() + 60
        while not all(n.reports and n.reports[-1]["t"] >= down_at for n in nodes):
            if time.monotonic() > deadline:
                raise SystemExit("nodes did not start")
            time.sleep(0.01)
        server.stop()
        while not all(n.reports[-1]["t"] >= up_at for n in nodes):
            time.sleep(0.01)
        server.restart()
        for n in nodes:
            n.wait()

        def window(t1: float, t2: float, nodes: list[Node] = nodes) -> tuple[float, list[int]]:
            per = [n.at(t2)["admitted"] - n.at(t1)["admitted"] for n in nodes]
            span = nodes[0].at(t2)["t"] - nodes[0].at(t1)["t"]
            return sum(per) / span, per

        before, _ = window(2.0, down_at)
        during, per = window(down_at + 1.0, up_at)
        after, _ = window(up_at + 3.0, duration - 0.5)
        rec = next(
            (
                n.reports[i]["t"]
                for n in nodes[:1]
                for i in range(len(n.reports))
                if n.reports[i]["t"] > up_at and not n.reports[i]["degraded"]
            ),
            None,
        )
        print(
            f"    {name:16s} admitted/s before {before:6.0f} ({before / rate:4.2f} of limit), "
            f"during outage {during:6.0f} ({during / rate:4.2f}; per node {per}), "
            f"after {after:6.0f} ({after / rate:4.2f}); node n0 back in the cluster "
            f"{(rec - up_at) if rec else float('nan'):.2f}s after restart"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=3000.0)
    ap.add_argument("--sync", type=float, default=5.0)
    ap.add_argument("--skip-distributed", action="store_true")
    a = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    local_cost()
    if a.skip_distributed:
        return
    external = os.environ.get("SQLPROXY_BENCH_REDIS_URL")
    server = None if external else EmbeddedRedis().start()
    try:
        url = external or (server.url if server else "")
        accuracy(url, a.rate, a.duration, a.sync)
        if server is not None:
            outage(server, a.rate, a.sync)
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
