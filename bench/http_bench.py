"""HTTP throughput and latency of POST /api/v1/query against direct queries with the same driver.

Starts its own PostgreSQL (or uses SQLPROXY_BENCH_PG_DSN), loads the demo schema, runs
`sqlproxy serve` as a separate process with the full pipeline (policy, masking, row filters,
classification, audit to JSONL + SQLite), and drives both with the same number of concurrent
clients for the same time: the proxy with wrk (a C load generator, so the client is not the
bottleneck: a Python HTTP client measured itself, not the proxy), PostgreSQL directly with
asyncpg, the driver the proxy uses upstream. Every request carries a new literal, as real
traffic does (the analyst's statements share one shape, so after the first they take the rewrite
cache's fast path: sql/rewrite_cache.py). Prints requests/s, p50/p99 latency, the ratio proxy /
direct and the ratio analyst / admin.

    .venv/bin/python bench/http_bench.py --duration 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx

from sqlproxy.auth.keys import generate_api_key
from sqlproxy.demo.launcher import DEMO_USERS, write_demo_config
from sqlproxy.embedded._process import free_port
from sqlproxy.embedded.demo_data import load_demo
from sqlproxy.embedded.postgres import EmbeddedPostgres

POINT = "SELECT id, name, email, region FROM customers WHERE id = {}"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def drive(
    name: str, one: Callable[[int], Awaitable[None]], concurrency: int, duration: float
) -> tuple[str, float, float, float, int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        rnd = random.Random()
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                await one(rnd.randint(1, 200))
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    rps = len(latencies) / elapsed
    return name, rps, pct(latencies, 50) * 1000, pct(latencies, 99) * 1000, errors


WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  local id = math.random(1, 200)
  local body = '{"sql": "SELECT id, name, email, region FROM customers WHERE id = ' .. id .. '"}'
  return wrk.format("POST", "/api/v1/query", {["Content-Type"] = "application/json",
                    ["Authorization"] = "Bearer %s"}, body)
end
"""


def _ms(text: str) -> float:
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def run_wrk(
    url: str, key: str, concurrency: int, duration: float, tmp: Path
) -> tuple[float, float, float, int]:
    script = tmp / "query.lua"
    script.write_text(WRK_SCRIPT % key)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{concurrency}", f"-d{int(duration)}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    rps = p50 = p99 = 0.0
    errors = 0
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            p50 = _ms(parts[1])
        elif parts[:1] == ["99%"]:
            p99 = _ms(parts[1])
        elif "Non-2xx" in line:
            errors = int(parts[-1])
    return rps, p50, p99, errors


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sqlproxy-bench-"))
    tmp.chmod(0o755)  # noqa: ASYNC240 - once, before anything runs
    pg: EmbeddedPostgres | None = None
    dsn = os.environ.get("SQLPROXY_BENCH_PG_DSN")
    if dsn is None:
        pg = EmbeddedPostgres(tmp / "pg")
        pg.start()
        dsn = load_demo(pg)
    port = free_port()
    keys = {u: generate_api_key() for u in DEMO_USERS}
    (tmp / "state").mkdir()
    cfg = write_demo_config(tmp / "state", dsn, port, keys)
    # The demo's rate limits (1,000 statements/s per user) would answer part of the load with
    # 429 and flatter the figures: the limiter still checks every request, but never refuses.
    text = cfg.read_text()
    demo_limits = ("global = { rate = 5000, burst = 10000 }", "user_default = { rate = 1000, burst = 2000 }")
    for old_limit in demo_limits:
        if old_limit not in text:
            print(f"demo config changed: {old_limit!r} not found", file=sys.stderr)
            return 1
        name = old_limit.split(" = ", 1)[0]
        text = text.replace(old_limit, f"{name} = {{ rate = 10000000, burst = 10000000 }}")
    cfg.write_text(text)
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(
            base_url=base, timeout=30, limits=httpx.Limits(max_connections=args.concurrency)
        ) as client:
            for _ in range(300):
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                print("proxy did not come up", file=sys.stderr)
                return 1

            def via_proxy(user: str) -> tuple[str, float, float, float, int]:
                rps, p50, p99, errs = run_wrk(
                    f"{base}/api/v1/query", keys[user], args.concurrency, args.duration, tmp
                )
                label = "proxy, admin (no masks)" if user == "admin" else "proxy, analyst (mask+filter)"
                return label, rps, p50, p99, errs

            pool = await asyncpg.create_pool(dsn, min_size=args.concurrency, max_size=args.concurrency)

            async def direct(i: int) -> None:
                async with pool.acquire() as conn:
                    await conn.fetch(POINT.format(i))

            rows = []
            for _ in range(args.rounds):
                rows.append(await drive("direct asyncpg", direct, args.concurrency, args.duration))
                rows.append(await asyncio.to_thread(via_proxy, "admin"))
                rows.append(await asyncio.to_thread(via_proxy, "analyst"))
            await pool.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if pg is not None:
            pg.stop()

    print(
        f"\nHTTP benchmark: {args.concurrency} concurrent clients, {args.duration:.0f} s per run, "
        f"{args.rounds} round(s), point SELECT on customers"
    )
    print(f"{'target':32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, rps, p50, p99, errs in rows:
        print(f"{name:32} {rps:9.0f} {p50:8.2f} {p99:8.2f} {errs:7d}")
    by: dict[str, list[float]] = {}
    for name, rps, *_ in rows:
        by.setdefault(name, []).append(rps)
    direct_rps = statistics.mean(by["direct asyncpg"])
    for name, vals in by.items():
        if name != "direct asyncpg":
            print(f"ratio {name} / direct: {statistics.mean(vals) / direct_rps:.3f}")
    # The cost of masking and filtering alone (direct asyncpg varies more from run to run).
    admin, analyst = by["proxy, admin (no masks)"], by["proxy, analyst (mask+filter)"]
    print(f"ratio analyst / admin: {statistics.mean(analyst) / statistics.mean(admin):.3f}")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
