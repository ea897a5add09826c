"""COPY FROM STDIN and COPY TO STDOUT through the wire door, PgBouncer and direct PostgreSQL.

One run starts everything it measures (with bench/pgbench_bench.py's functions, so the servers
are set up exactly as for the pgbench figures): a throwaway PostgreSQL (fsync off) with a login
role `bench`; one PgBouncer (its transaction-mode pool `bench_tx`); one `sqlproxy serve` in
transaction pool mode with the full pipeline (SCRAM login, rate limiting that never bites,
pglast analysis, policy: `bench` may read and write copy_* tables and nothing else, audit to JSONL
+ SQLite).

The CSV (--rows rows of id bigint, name text, email text, amount numeric(12,2), created
timestamptz; about 70 bytes a row) is generated once into a temporary file. Then, for --rounds
rounds, the target order rotating each round, for each target: TRUNCATE the unlogged table
(directly), COPY ... FROM STDIN (FORMAT csv) streaming the file in 64 KiB writes, check the
table's row count (directly) and the COPY tag, then COPY ... TO STDOUT (FORMAT csv), discarding
the data as it arrives but counting its bytes and rows (CopyData messages: PostgreSQL sends one a
row), which must equal the file's. The client is psycopg 3 (``cursor.copy()``) in this process;
every server is a separate process. A 10k-row warm-up through every target comes first, then a
--small-rows run through sqlproxy (before the big runs, so its peak RSS is not measured on top of
memory they left), then the rounds.

Prints MB/s (10^6 bytes of CSV a second) per target and direction, the ratios sqlproxy / direct
and sqlproxy / PgBouncer, the CPU the PgBouncer and sqlproxy processes used per MB, sqlproxy's
peak RSS (VmHWM, reset through /proc/PID/clear_refs before each run) for the --rows and the
--small-rows runs (peak RSS should not grow with the data), and checks that sqlproxy's audit
JSONL holds one record per COPY with its direction and row count (extra.copy).

The machine is shared: besides the mean, the table shows each target's best round, and the
proxies' CPU per MB, which moves much less with other people's load than MB/s does.

    .venv/bin/python bench/copy_bench.py --rows 1000000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psycopg
from pgbench_bench import (
    BENCH_DB,
    BENCH_USER,
    Proxy,
    Target,
    audit_counts,
    create_bench_database,
    loadavg,
    process_cpu_s,
    start_pgbouncer,
    start_sqlproxy,
    stop,
)
from psycopg.rows import TupleRow

from sqlproxy.embedded.postgres import EmbeddedPostgres

TABLE = "copy_bench"
COLUMNS = "id, name, email, amount, created"
COPY_IN = f"COPY {TABLE} ({COLUMNS}) FROM STDIN (FORMAT csv)"
COPY_OUT = f"COPY {TABLE} ({COLUMNS}) TO STDOUT (FORMAT csv)"
CHUNK = 64 * 1024
WARMUP_ROWS = 10_000
RUN_TIMEOUT_S = 240  # a bound on any one COPY: past it the bench has hung
POOL_SIZE = 2


@dataclass
class Run:
    target: str
    direction: str  # "in" (COPY FROM STDIN) or "out" (COPY TO STDOUT)
    round: int  # 0 for the warm-up and the small run
    rows: int  # rows the run was meant to move
    nbytes: int
    seconds: float
    load1: float
    client_cpu_s: float
    proxy_cpu_s: float | None = None  # the PgBouncer or sqlproxy process
    rss_before_kib: int | None = None  # sqlproxy: VmRSS right after resetting VmHWM
    peak_kib: int | None = None  # sqlproxy: VmHWM at the end of the run
    error: str = ""

    @property
    def mb_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------
# data and process status


def write_csv(path: Path, rows: int) -> int:
    """``rows`` CSV lines in exactly the text PostgreSQL prints back (TimeZone UTC); the size."""
    batch = 20_000
    with path.open("wb") as f:
        for start in range(1, rows + 1, batch):
            lines = []
            for i in range(start, min(start + batch, rows + 1)):
                s = i * 7919 % 31_536_000  # seconds into 2026, spread over the year
                day, rest = divmod(s, 86_400)
                month, mday = divmod(day, 28)  # 28-day months, wrapped into 12: valid dates
                lines.append(
                    f"{i},user{i},user{i}@example.com,{i * 37 % 1_000_000 / 100:.2f},"
                    f"2026-{month % 12 + 1:02d}-{mday + 1:02d} "
                    f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}+00\n"
                )
            f.write("".join(lines).encode())
    return path.stat().st_size


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux clear_refs 5); False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"a COPY took longer than {RUN_TIMEOUT_S} s")


# ------------------------------------------------------------------------------------------
# the COPYs


def connect(target: Target, password: str) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(
        host="127.0.0.1",
        port=target.port,
        dbname=target.database,
        user=BENCH_USER,
        password=password,
        sslmode="disable",
        connect_timeout=10,
        autocommit=True,
    )


def table_rows(admin_dsn: str) -> int:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        return int(row[0]) if row else -1


def run_copy(
    target: Target,
    password: str,
    admin_dsn: str,
    direction: str,
    csv: Path,
    rows: int,
    rnd: int,
    *,
    watch_rss: bool,
) -> Run:
    """One COPY through ``target``, timed from the COPY statement to its completion."""
    size = csv.stat().st_size
    if direction == "in":
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"TRUNCATE {TABLE}")
    run = Run(target.key, direction, rnd, rows, 0, 0.0, os.getloadavg()[0], 0.0)
    pid = target.pid
    errors: list[str] = []
    with connect(target, password) as conn:
        cur = conn.cursor()
        if watch_rss and pid is not None and reset_peak(pid):
            run.rss_before_kib = proc_status(pid).get("VmRSS")
        cpu0 = process_cpu_s(pid) if pid else 0.0
        client0 = time.process_time()
        t0 = time.perf_counter()
        signal.alarm(RUN_TIMEOUT_S)
        try:
            if direction == "in":
                with csv.open("rb") as f, cur.copy(COPY_IN) as copy:
                    for _ in range(size // CHUNK + 2):  # bounded: the file's chunks, then EOF
                        chunk = f.read(CHUNK)
                        if not chunk:
                            break
                        copy.write(chunk)
                        run.nbytes += len(chunk)
                got_rows = rows
            else:
                got_rows = 0
                with cur.copy(COPY_OUT) as copy:
                    # PostgreSQL sends one CopyData message per row (in text and CSV), and the
                    # proxies pass messages on as they are: count them, with their bytes.
                    for data in copy:
                        run.nbytes += len(data)
                        got_rows += 1
        finally:
            signal.alarm(0)
        run.seconds = time.perf_counter() - t0
        run.client_cpu_s = time.process_time() - client0
        if pid:
            run.proxy_cpu_s = process_cpu_s(pid) - cpu0
        if watch_rss and pid is not None:
            run.peak_kib = proc_status(pid).get("VmHWM")
        tag_rows = cur.rowcount
    if tag_rows != rows:
        errors.append(f"COPY tag says {tag_rows} rows, expected {rows}")
    if run.nbytes != size:
        errors.append(f"{run.nbytes} bytes {'sent' if direction == 'in' else 'received'}, file has {size}")
    if direction == "in":
        n = table_rows(admin_dsn)
        if n != rows:
            errors.append(f"table holds {n} rows after the load, expected {rows}")
    elif got_rows != rows:
        errors.append(f"{got_rows} rows received, expected {rows}")
    run.error = "; ".join(errors)
    return run


def print_run(run: Run, label: str) -> None:
    tag = f"[{run.direction:3} {run.rows:>9,} rows, round {run.round}] {label}"
    extra = ""
    if run.proxy_cpu_s is not None:
        extra += f"  proxy CPU {run.proxy_cpu_s:5.2f} s ({run.proxy_cpu_s / run.seconds:4.0%})"
    if run.peak_kib is not None:
        extra += f"  RSS {mib(run.rss_before_kib)} -> peak {mib(run.peak_kib)} MiB"
    print(
        f"{tag:58} {run.mb_s:7.1f} MB/s {run.seconds:6.2f} s  client CPU {run.client_cpu_s:5.2f} s"
        f"{extra}  load {run.load1:.2f}" + (f"  ERROR {run.error}" if run.error else ""),
        flush=True,
    )


def mib(kib: int | None) -> str:
    return f"{kib / 1024:6.1f}" if kib is not None else f"{'-':>6}"


# ------------------------------------------------------------------------------------------
# audit


def audit_copies(state: Path) -> tuple[Counter[tuple[str, int | None]], list[str]]:
    """(direction, rows) of every COPY the proxy's audit JSONL recorded, and the decisions of
    the records that were not allowed."""
    copies: Counter[tuple[str, int | None]] = Counter()
    bad: list[str] = []
    for f in sorted((state / "audit").glob("audit.jsonl*")):
        with f.open("rb") as fh:
            for line in fh:
                rec = json.loads(line)
                if rec.get("decision") != "allow":
                    bad.append(f"{rec.get('decision')}: {rec.get('sql', '')[:80]}")
                c = rec.get("extra", {}).get("copy")
                for one in c if isinstance(c, list) else [c] if c else []:
                    copies[(str(one.get("direction")), one.get("rows"))] += 1
    return copies, bad


# ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows per COPY (default 1,000,000)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument(
        "--small-rows",
        type=int,
        default=100_000,
        help="rows of the last sqlproxy run, for the peak-RSS comparison (default 100,000)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if args.rows < 1 or args.rounds < 1 or args.small_rows < 1:
        ap.error("--rows, --rounds and --small-rows must be positive")

    started = time.monotonic()
    print(f"load average at start: {loadavg()} ({os.cpu_count()} CPUs)", flush=True)
    signal.signal(signal.SIGALRM, _alarm)
    tmp = Path(tempfile.mkdtemp(prefix="sqlproxy-copy-"))
    tmp.chmod(0o755)  # the postgres user must reach the PostgreSQL and PgBouncer directories
    password = os.urandom(12).hex()
    pg = EmbeddedPostgres(tmp / "pg", durable=False, max_connections=50)
    runs: list[Run] = []
    t = time.monotonic()
    csvs = {n: tmp / f"rows-{n}.csv" for n in {args.rows, args.small_rows, WARMUP_ROWS}}
    sizes = {n: write_csv(path, n) for n, path in csvs.items()}
    print(
        f"CSV: {args.rows:,} rows, {sizes[args.rows] / 1e6:.1f} MB "
        f"({sizes[args.rows] / args.rows:.1f} bytes a row), written in {time.monotonic() - t:.1f} s",
        flush=True,
    )
    proxy: Proxy | None = None
    bouncer: subprocess.Popen[bytes] | None = None
    try:
        pg.start()
        create_bench_database(pg, password)
        admin_dsn = pg.dsn(BENCH_DB)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {BENCH_DB} SET timezone = 'UTC'")
            conn.execute(
                f"CREATE UNLOGGED TABLE {TABLE} (id bigint, name text, email text, "
                "amount numeric(12,2), created timestamptz) WITH (autovacuum_enabled = off)"
            )
            conn.execute(f"ALTER TABLE {TABLE} OWNER TO {BENCH_USER}")
        bouncer, bouncer_port = start_pgbouncer(tmp, pg.port, password, POOL_SIZE)
        upstream = f"postgresql://{BENCH_USER}:{password}@127.0.0.1:{pg.port}/{BENCH_DB}"
        proxy = start_sqlproxy(
            tmp, "sqlproxy-tx", upstream, password, "transaction", POOL_SIZE, tables="copy_*"
        )

        direct = Target("direct", "direct PostgreSQL", pg.port, BENCH_DB)
        pgb = Target("pgbouncer-tx", "PgBouncer (transaction)", bouncer_port, "bench_tx", bouncer.pid)
        sp = Target("sqlproxy-tx", "sqlproxy (transaction)", proxy.port, BENCH_DB, proxy.proc.pid)
        targets = (direct, pgb, sp)
        labels = {tg.key: tg.label for tg in targets}

        def one(target: Target, direction: str, rows: int, rnd: int) -> None:
            run = run_copy(
                target,
                password,
                admin_dsn,
                direction,
                csvs[rows],
                rows,
                rnd,
                watch_rss=target is sp,
            )
            runs.append(run)
            print_run(run, target.label)

        print(f"\nwarm-up: {WARMUP_ROWS:,} rows in and out through each target", flush=True)
        for target in targets:
            for direction in ("in", "out"):
                one(target, direction, WARMUP_ROWS, 0)
        # Before the big runs, so that its peak RSS is not measured on top of what they left.
        print(f"\nsqlproxy with {args.small_rows:,} rows (peak RSS against data size)", flush=True)
        for direction in ("in", "out"):
            one(sp, direction, args.small_rows, 0)
        print(f"\nCOPY {args.rows:,} rows, {args.rounds} round(s), pool size {POOL_SIZE}", flush=True)
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(targets)
            for target in targets[k:] + targets[:k]:
                for direction in ("in", "out"):
                    one(target, direction, args.rows, rnd)
        load_end = loadavg()
    finally:
        if proxy is not None:
            stop(proxy.proc, proxy.name)
        if bouncer is not None:
            stop(bouncer, "pgbouncer")
        pg.stop()

    assert proxy is not None  # started, or the exception has left main() already
    copies, not_allowed = audit_copies(proxy.state_dir)
    jsonl, sqlite_total, by_decision = audit_counts(proxy.state_dir)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    ok = report(args, runs, labels, sizes[args.rows], copies, not_allowed, (jsonl, sqlite_total, by_decision))
    print(f"load average at end: {load_end}; total time {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


def report(
    args: argparse.Namespace,
    runs: list[Run],
    labels: dict[str, str],
    size: int,
    copies: Counter[tuple[str, int | None]],
    not_allowed: list[str],
    audit: tuple[int, int, dict[str, int]],
) -> bool:
    main_runs = [r for r in runs if r.round > 0]
    by: dict[tuple[str, str], list[Run]] = {}
    for r in main_runs:
        by.setdefault((r.direction, r.target), []).append(r)

    def mean(direction: str, target: str) -> float:
        rs = by.get((direction, target), [])
        return statistics.mean(r.mb_s for r in rs) if rs else float("nan")

    print(
        f"\n== COPY {args.rows:,} rows ({size / 1e6:.1f} MB of CSV), {args.rounds} round(s): "
        "MB/s (10^6 bytes a second) =="
    )
    head = f"{'dir':4} {'target':24}" + "".join(f" {'round ' + str(i):>8}" for i in range(1, args.rounds + 1))
    print(
        head
        + f" {'mean':>8} {'best':>8} {'rows/s':>10} {'client CPU s':>13} {'proxy CPU s':>12} {'ms/MB':>6}"
    )
    for (direction, target), rs in sorted(
        by.items(), key=lambda kv: (kv[0][0], list(labels).index(kv[0][1]))
    ):
        cells = "".join(f" {r.mb_s:8.1f}" for r in rs)
        rows_s = statistics.mean(r.rows / r.seconds for r in rs)
        client = statistics.mean(r.client_cpu_s for r in rs)
        cpus = [r.proxy_cpu_s for r in rs if r.proxy_cpu_s is not None]
        cpu = (
            f"{statistics.mean(cpus):12.2f} {statistics.mean(cpus) * 1000 / (size / 1e6):6.1f}"
            if cpus
            else ""
        )
        print(
            f"{direction:4} {labels[target]:24}{cells} {mean(direction, target):8.1f} "
            f"{max(r.mb_s for r in rs):8.1f} {rows_s:10.0f} "
            f"{client:13.2f} {cpu}"
        )

    def best(direction: str, target: str) -> float:
        rs = by.get((direction, target), [])
        return max(r.mb_s for r in rs) if rs else float("nan")

    def cpu_per_mb(direction: str, target: str) -> float:
        rs = [r for r in by.get((direction, target), []) if r.proxy_cpu_s is not None]
        return statistics.mean((r.proxy_cpu_s or 0.0) / (r.nbytes / 1e6) for r in rs) if rs else float("nan")

    print("\n== ratios: sqlproxy / direct and sqlproxy / PgBouncer (MB/s, mean and best round) ==")
    print(
        f"{'dir':4} {'mean /direct':>13} {'mean /PgBouncer':>16} {'best /direct':>13} {'best /PgBouncer':>16}"
        f" {'proxy CPU per MB, sqlproxy / PgBouncer':>39}"
    )
    for direction in ("in", "out"):
        m, b = mean(direction, "sqlproxy-tx"), best(direction, "sqlproxy-tx")
        print(
            f"{direction:4} {m / mean(direction, 'direct'):13.3f} {m / mean(direction, 'pgbouncer-tx'):16.3f}"
            f" {b / best(direction, 'direct'):13.3f} {b / best(direction, 'pgbouncer-tx'):16.3f}"
            f" {cpu_per_mb(direction, 'sqlproxy-tx') / cpu_per_mb(direction, 'pgbouncer-tx'):39.2f}"
        )

    print("\n== sqlproxy peak RSS (VmHWM of `sqlproxy serve`, reset before each run) ==")
    print(f"{'rows':>10} {'dir':4} {'runs':>4} {'RSS before MiB':>15} {'peak MiB':>9} {'growth MiB':>11}")
    for n in (args.rows, args.small_rows):
        for direction in ("in", "out"):
            rs = [
                r
                for r in runs
                if r.target == "sqlproxy-tx" and r.rows == n and r.direction == direction and r.peak_kib
            ]
            if not rs:
                continue
            before = max(r.rss_before_kib or 0 for r in rs)
            peak = max(r.peak_kib or 0 for r in rs)
            growth = max((r.peak_kib or 0) - (r.rss_before_kib or 0) for r in rs)
            print(f"{n:>10,} {direction:4} {len(rs):4d} {mib(before):>15} {mib(peak):>9} {mib(growth):>11}")

    expected: Counter[tuple[str, int | None]] = Counter(
        (r.direction, r.rows) for r in runs if r.target == "sqlproxy-tx"
    )
    jsonl, sqlite_total, by_decision = audit
    print("\n== sqlproxy audit (full pipeline check) ==")
    print(
        f"JSONL records {jsonl}, SQLite records {sqlite_total}, wire by decision {json.dumps(by_decision)}; "
        f"COPY records (direction, rows): {dict(sorted(copies.items(), key=str))}"
    )
    audit_ok = copies == expected and not not_allowed
    if audit_ok:
        print(f"every COPY through sqlproxy ({sum(expected.values())}) is audited with its row count")
    else:
        print(
            f"  MISMATCH: expected {dict(sorted(expected.items(), key=str))}; not allowed: {not_allowed[:5]}"
        )

    errors = [r for r in runs if r.error]
    print(f"\nruns with errors (row or byte counts): {len(errors)}")
    for r in errors:
        print(f"  {r.direction} {r.target} {r.rows:,} rows round {r.round}: {r.error}")
    return audit_ok and not errors


if __name__ == "__main__":
    sys.exit(main())
