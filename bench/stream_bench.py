"""The WebSocket stream door under load: rows through the query channel, and audit fan-out.

(a) Rows: streams N rows of ``generate_series`` through the ``query`` channel, flow-controlled
    by credits as the channel documents (the client grants ``--window`` batches up front and
    one more per batch it has taken), and prints rows/s next to the same rows read directly
    with an asyncpg cursor. The proxy is a separate ``sqlproxy serve`` process, a fresh one
    per row count, so its peak RSS (VmHWM, reset after warm-up through /proc/PID/clear_refs,
    and also sampled from VmRSS) is the server's own and belongs to that run alone: with
    100k and 1M rows the peaks show whether memory grows with the row count.
(b) Audit latency: ``--subscribers`` WebSocket clients (spread over ``--workers`` processes so
    the clients are not the bottleneck; 1 and 100 by default, the first as the baseline without
    fan-out) subscribe to the audit channel; the bench sends
    ``--events`` queries at ``--rate`` per second; each subscriber notes, for every record,
    receipt time minus the record's ``ts`` (taken when the request finished, right after its
    statement). Prints p50, p99 and max over all deliveries.

Starts its own PostgreSQL (or uses SQLPROXY_BENCH_PG_DSN). Loopback only; every loop is
bounded in count and time.

    .venv/bin/python bench/stream_bench.py                 # both parts, 100k and 1M rows
    .venv/bin/python bench/stream_bench.py --rows 100000 --skip-audit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect

from sqlproxy.auth.keys import generate_api_key
from sqlproxy.demo.launcher import DEMO_USERS, write_demo_config
from sqlproxy.embedded._process import free_port
from sqlproxy.embedded.demo_data import load_demo
from sqlproxy.embedded.postgres import EmbeddedPostgres

ROWS_SQL = "SELECT g AS id, md5(g::text) AS token, g * 0.5 AS half FROM generate_series(1, {n}) AS g"
HANG_S = 600.0  # a bound on any single wait: past it the bench has hung


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    # Nearest rank: a reported p99 is a latency some delivery really had.
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


# ------------------------------------------------------------------------------------- server


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    keys: dict[str, str]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/stream"

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM of the server process, in KiB."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
        return out

    def reset_peak(self) -> bool:
        """Resets VmHWM to the current RSS (Linux clear_refs 5); False where not permitted."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


async def start_server(tmp: Path, dsn: str, name: str, extra_toml: str = "") -> Server:
    state = tmp / name
    state.mkdir()
    port = free_port()
    keys = {u: generate_api_key() for u in DEMO_USERS}
    cfg = write_demo_config(state, dsn, port, keys)
    with cfg.open("a") as f:
        # Only the HTTP and WebSocket doors: the wire door's fixed port may be someone else's.
        f.write("\n[wire]\nenabled = false\n" + extra_toml + "\n")
    log = state / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg), "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, port, keys, log)
    async with httpx.AsyncClient(base_url=server.base, timeout=10) as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the proxy exited: {log.read_text()}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the proxy did not come up: {log.read_text()}")


async def ws_connect(server: Server, user: str) -> ClientConnection:
    conn = await connect(
        server.ws_url,
        additional_headers={"Authorization": f"Bearer {server.keys[user]}"},
        max_size=None,
        open_timeout=HANG_S,
    )
    ready = json.loads(await asyncio.wait_for(conn.recv(), HANG_S))
    if ready.get("type") != "ready":
        raise RuntimeError(f"no ready frame: {ready}")
    return conn


async def next_frame(conn: ClientConnection) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(conn.recv(), HANG_S))
        if frame.get("type") != "heartbeat":
            return frame


# ---------------------------------------------------------------------------------- (a) rows


async def stream_rows(server: Server, n: int, batch_rows: int, window: int) -> tuple[int, float]:
    """Streams ``n`` rows through the query channel; returns (rows received, seconds)."""
    conn = await ws_connect(server, "admin")
    try:
        start = time.perf_counter()
        await conn.send(
            json.dumps(
                {
                    "type": "subscribe",
                    "channel": "query",
                    "id": "q",
                    "sql": ROWS_SQL.format(n=n),
                    "batch_rows": batch_rows,
                    "credit": window,
                }
            )
        )
        rows = 0
        while True:
            f = await next_frame(conn)
            t = f["type"]
            if t == "data":
                rows += len(f["rows"])
                if not f["last"]:
                    # One batch taken, one more granted: at most `window` batches in flight.
                    await conn.send('{"type":"more","id":"q","batches":1}')
            elif t == "complete":
                elapsed = time.perf_counter() - start
                if f["row_count"] != rows:
                    raise RuntimeError(f"complete says {f['row_count']} rows, received {rows}")
                return rows, elapsed
            elif t == "error":
                raise RuntimeError(f"query failed: {f}")
    finally:
        await conn.close()


async def direct_rows(dsn: str, n: int, batch_rows: int) -> tuple[int, float]:
    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        rows = 0
        async with conn.transaction():
            cur = await conn.cursor(ROWS_SQL.format(n=n))
            while True:
                got = await cur.fetch(batch_rows)
                rows += len(got)
                if len(got) < batch_rows:
                    break
        return rows, time.perf_counter() - start
    finally:
        await conn.close()


@dataclass
class RowsResult:
    rows: int
    seconds: float
    direct_seconds: float
    rss_before_kib: int
    peak_hwm_kib: int | None
    peak_sampled_kib: int


async def rows_run(tmp: Path, dsn: str, n: int, batch_rows: int, window: int) -> RowsResult:
    server = await start_server(tmp, dsn, f"rows-{n}")
    try:
        # Warm-up: imports, pools, the analysis cache, one full small stream.
        await stream_rows(server, 20_000, batch_rows, window)
        reset = server.reset_peak()
        before = server.status()["VmRSS"]
        sampled = before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal sampled
            while not done.is_set():
                sampled = max(sampled, server.status()["VmRSS"])
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            rows, secs = await stream_rows(server, n, batch_rows, window)
        finally:
            done.set()
            await sampler
        status = server.status()
        sampled = max(sampled, status["VmRSS"])
        hwm = status["VmHWM"] if reset else None
    finally:
        server.stop()
    _, direct_secs = await direct_rows(dsn, n, batch_rows)
    return RowsResult(rows, secs, direct_secs, before, hwm, sampled)


# ------------------------------------------------------------------------------ (b) audit


def _subscriber_worker(
    ws_url: str, key: str, count: int, events: int, user: str, ready: Any, results: Any
) -> None:
    """One process holding ``count`` audit subscribers; puts its latencies (ms) on results."""

    async def one(i: int, lat: list[float], live: asyncio.Queue[int]) -> None:
        async with connect(
            ws_url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None, open_timeout=HANG_S
        ) as conn:
            await conn.send(
                json.dumps({"type": "subscribe", "channel": "audit", "id": "a", "filters": {"user": user}})
            )
            got = 0
            while got < events:
                raw = await asyncio.wait_for(conn.recv(), HANG_S)
                now = time.time()
                f = json.loads(raw)
                if f["type"] == "live":
                    live.put_nowait(i)
                elif f["type"] == "data":
                    for r in f["records"]:
                        ts = datetime.fromisoformat(r["ts"]).timestamp()
                        lat.append((now - ts) * 1000.0)
                        got += 1
                elif f["type"] == "error":
                    raise RuntimeError(f"subscriber {i}: {f}")

    async def main() -> list[float]:
        lat: list[float] = []
        live: asyncio.Queue[int] = asyncio.Queue()
        tasks = [asyncio.create_task(one(i, lat, live)) for i in range(count)]
        for _ in range(count):
            await asyncio.wait_for(live.get(), HANG_S)
        ready.put(count)
        await asyncio.gather(*tasks)
        return lat

    try:
        results.put(asyncio.run(main()))
    except BaseException as e:
        results.put(f"error: {e!r}")


async def audit_run(
    tmp: Path, dsn: str, subscribers: int, workers: int, events: int, rate: float
) -> tuple[list[float], float]:
    server = await start_server(tmp, dsn, f"audit-{subscribers}", "[stream]\nmax_connections = 2000\n")
    workers = max(1, min(workers, subscribers))
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    procs = []
    try:
        per = [subscribers // workers + (1 if i < subscribers % workers else 0) for i in range(workers)]
        for n in per:
            p = ctx.Process(
                target=_subscriber_worker,
                args=(server.ws_url, server.keys["auditor"], n, events, "developer", ready, results),
            )
            p.start()
            procs.append(p)
        got = 0
        while got < subscribers:
            got += await asyncio.to_thread(ready.get, True, HANG_S)
        # Open loop at a fixed rate: each query is sent on its slot whatever the last one did.
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            headers = {"Authorization": f"Bearer {server.keys['developer']}"}
            start = time.perf_counter()

            async def one(i: int) -> None:
                r = await client.post(
                    "/api/v1/query",
                    json={"sql": f"SELECT id FROM orders WHERE id = {i % 50 + 1}"},
                    headers=headers,
                )
                r.raise_for_status()

            pending = []
            for i in range(events):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(one(i)))
            await asyncio.gather(*pending)
            sent_secs = time.perf_counter() - start
        lat: list[float] = []
        for _ in procs:
            part = await asyncio.to_thread(results.get, True, HANG_S)
            if isinstance(part, str):
                raise RuntimeError(part)
            lat.extend(part)
        return lat, sent_secs
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        server.stop()


# ------------------------------------------------------------------------------------- main


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sqlproxy-stream-bench-"))
    tmp.chmod(0o755)  # noqa: ASYNC240 - once, before anything runs
    pg: EmbeddedPostgres | None = None
    dsn = os.environ.get("SQLPROXY_BENCH_PG_DSN")
    if dsn is None:
        pg = EmbeddedPostgres(tmp / "pg")
        pg.start()
        dsn = load_demo(pg)
    with open("/proc/loadavg") as f:  # noqa: ASYNC230 - once, before anything runs
        load_before = f.read().split()[:3]
    try:
        rows_results = []
        if not args.skip_rows:
            for n in args.rows:
                rows_results.append(await rows_run(tmp, dsn, n, args.batch_rows, args.window))
        audits: list[tuple[int, list[float], float]] = []
        if not args.skip_audit:
            for n in args.subscribers:
                lat, secs = await audit_run(tmp, dsn, n, args.workers, args.events, args.rate)
                audits.append((n, lat, secs))
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    with open("/proc/loadavg") as f:  # noqa: ASYNC230 - once, after the runs
        load_after = f.read().split()[:3]

    print(f"\nstream benchmark on {os.cpu_count()} cores; load average before {' '.join(load_before)}")
    if rows_results:
        print(
            f"\n(a) query channel: generate_series rows (3 columns), batch_rows={args.batch_rows}, "
            f"credit window {args.window} batches, one `more` per batch taken"
        )
        print(
            f"{'rows':>10} {'seconds':>8} {'rows/s':>10} {'direct rows/s':>14} {'ratio':>6} "
            f"{'RSS before MiB':>15} {'peak (VmHWM) MiB':>17} {'peak (sampled) MiB':>19}"
        )
        for r in rows_results:
            print(
                f"{r.rows:>10} {r.seconds:8.2f} {r.rows / r.seconds:10.0f} {r.rows / r.direct_seconds:14.0f} "
                f"{r.direct_seconds / r.seconds:6.3f} {mib(r.rss_before_kib):>15} {mib(r.peak_hwm_kib):>17} "
                f"{mib(r.peak_sampled_kib):>19}"
            )
        if len(rows_results) >= 2:
            lo, hi = rows_results[0], rows_results[-1]
            lo_peak = lo.peak_hwm_kib or lo.peak_sampled_kib
            hi_peak = hi.peak_hwm_kib or hi.peak_sampled_kib
            print(
                "peak RSS above the pre-stream RSS: "
                f"{mib(lo_peak - lo.rss_before_kib)} MiB for {lo.rows} rows, "
                f"{mib(hi_peak - hi.rss_before_kib)} MiB for {hi.rows} rows "
                f"({hi.rows / lo.rows:.0f}x the rows)"
            )
    for n, lat, secs in audits:
        print(
            f"\n(b) audit channel: {n} subscriber(s) in {min(args.workers, n)} process(es), "
            f"{args.events} requests at {args.rate:g}/s (sent in {secs:.1f} s), {len(lat)} deliveries "
            f"(expected {n * args.events})"
        )
        print(
            f"latency from the record's ts (request end) to receipt: p50 {pct(lat, 50):.2f} ms, "
            f"p99 {pct(lat, 99):.2f} ms, max {max(lat):.2f} ms"
        )
    print(f"\nload average after {' '.join(load_after)}")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--batch-rows", type=int, default=5000)
    ap.add_argument("--window", type=int, default=4, help="batches of credit in flight")
    ap.add_argument(
        "--subscribers", type=int, nargs="+", default=[1, 100], help="one run per count (1: the baseline)"
    )
    ap.add_argument("--workers", type=int, default=2, help="processes holding the subscribers")
    ap.add_argument("--events", type=int, default=300)
    ap.add_argument("--rate", type=float, default=25.0, help="audited requests per second")
    ap.add_argument("--skip-rows", action="store_true")
    ap.add_argument("--skip-audit", action="store_true")
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
