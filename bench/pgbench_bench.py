"""pgbench through the wire door against PgBouncer and direct PostgreSQL.

One run starts everything it measures, each a separate process on a free loopback port:

- a throwaway PostgreSQL (EmbeddedPostgres, fsync off) with pgbench's tables (pgbench -i),
  owned by a login role `bench`;
- one PgBouncer with two databases, `bench_tx` (pool_mode transaction) and `bench_session`
  (pool_mode session), pool_size = --pool-size; run as the unprivileged `postgres` user when
  we are root (Debian's pgbouncer refuses root);
- a bare Python forwarder (bench/bare_forwarder.py: uvloop Protocols, one upstream connection
  per client, no parsing, no policy, no audit): the ceiling of any proxy written in Python on
  this machine, measured in the same run;
- two `sqlproxy serve` processes with the full pipeline (SCRAM login, rate limiting with
  limits high enough not to bite, pglast analysis, policy: `bench` may read and write
  pgbench_* and nothing else, audit to JSONL + SQLite), one in transaction pool mode and one in
  session pool mode, server_pool_size = --pool-size;
- a third in transaction mode with `[wire] workers = --workers` (default: one per CPU), the
  pool size split between the workers so that it holds as many server connections as the others.

Then `pgbench -S -c CLIENTS -j 2 -T SECONDS` in the simple, extended and prepared protocols
against each target, interleaved, for --rounds rounds, and one TPC-B run (pgbench's default
script, -c 8) per target. PgBouncer 1.18 cannot keep prepared statements in transaction mode,
so the prepared runs go to its session-mode pool; sqlproxy runs prepared in both modes.

Prints TPS per target and mode, the ratios sqlproxy / PgBouncer and sqlproxy / direct (and the
bare forwarder's, for scale), the
failed-transaction counts pgbench reported, the machine load, and the number of audit records
sqlproxy wrote (so the figures are for the full pipeline, audit included). For PgBouncer and
sqlproxy it also prints the CPU time their process used per transaction (from /proc; for
sqlproxy with every process below it: its audit writer and its wire workers): on a busy
machine TPS moves with everyone else's load, CPU per transaction much less.

    .venv/bin/python bench/pgbench_bench.py --seconds 10 --rounds 2 --clients 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from sqlproxy.embedded._process import free_port
from sqlproxy.embedded.postgres import EmbeddedPostgres
from sqlproxy.protocol.scram import make_verifier

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
BENCH_USER = "bench"
BENCH_DB = "bench"
MODES = ("simple", "extended", "prepared")


@dataclass(frozen=True)
class Target:
    key: str  # a short name for the table
    label: str
    port: int
    database: str
    pid: int | None = None  # the proxy process: its CPU time per transaction, and --py-spy


@dataclass
class Result:
    target: str
    mode: str
    round: int
    tps: float
    transactions: int
    failed: int
    latency_ms: float
    load1: float
    cpu_s: float | None = None  # CPU seconds the proxy process used during the run
    error: str = ""

    @property
    def cpu_us_per_txn(self) -> float | None:
        if self.cpu_s is None or not self.transactions:
            return None
        return self.cpu_s * 1e6 / self.transactions


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) and of every process below it:
    sqlproxy's audit writer process and its wire worker processes count as sqlproxy."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents.setdefault(int(st[1]), []).append(int(entry.name))
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        st = _stat(p)
        if st is not None:
            total += int(st[11]) + int(st[12])
        todo.extend(parents.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (the event loop) alone."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def pgbench_binary() -> str:
    env = os.environ.get("SQLPROXY_PGBENCH")
    if env:
        return env
    # Debian's /usr/bin/pgbench is a wrapper that wants a cluster; the real one is here.
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    which = shutil.which("pgbench")
    if which is None:
        sys.exit("pgbench not found: bash scripts/sysdeps.sh")
    return which


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{what} did not stop within {timeout:.0f} s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------
# PostgreSQL


def create_bench_database(pg: EmbeddedPostgres, password: str) -> None:
    """The login role `bench` (with ``password``) and the database `bench` it owns."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_USER}")


def prepare_postgres(pg: EmbeddedPostgres, password: str, pgbench: str, scale: int) -> None:
    create_bench_database(pg, password)
    t = time.monotonic()
    subprocess.run(
        [pgbench, "-i", "-q", "-s", str(scale)],
        env=pgenv(pg.port, BENCH_DB, password),
        check=True,
        capture_output=True,
        timeout=600,
    )
    print(f"pgbench -i -s {scale}: {time.monotonic() - t:.1f} s", flush=True)


def pgenv(port: int, database: str, password: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST="127.0.0.1",
        PGPORT=str(port),
        PGUSER=BENCH_USER,
        PGPASSWORD=password,
        PGDATABASE=database,
        PGSSLMODE="disable",
        PGCONNECT_TIMEOUT="10",
    )
    return env


# ------------------------------------------------------------------------------------------
# PgBouncer


def start_pgbouncer(
    tmp: Path, pg_port: int, password: str, pool_size: int
) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(exe, os.X_OK):
        sys.exit("pgbouncer not found: bash scripts/sysdeps.sh pgbouncer")
    d = tmp / "pgbouncer"
    d.mkdir()
    port = free_port()
    server = f"host=127.0.0.1 port={pg_port} dbname={BENCH_DB}"
    (d / "userlist.txt").write_text(f'"{BENCH_USER}" "{password}"\n')
    (d / "pgbouncer.ini").write_text(
        f"""[databases]
bench_tx = {server} pool_mode=transaction pool_size={pool_size}
bench_session = {server} pool_mode=session pool_size={pool_size}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d / "userlist.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
max_db_connections = 0
logfile = {d / "pgbouncer.log"}
pidfile = {d / "pgbouncer.pid"}
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
"""
    )
    uid = gid = None
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        entry = pwd.getpwnam("postgres")
        uid, gid = entry.pw_uid, entry.pw_gid
        for p in (d, *d.iterdir()):
            os.chown(p, uid, gid)
        (d / "userlist.txt").chmod(0o600)
    proc = subprocess.Popen(
        [exe, str(d / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        user=uid,
        group=gid,
        extra_groups=[] if uid is not None else None,
        cwd=d,
    )
    wait_port(port, proc, "pgbouncer")
    return proc, port


# ------------------------------------------------------------------------------------------
# the bare Python forwarder: what any Python proxy can reach here


def start_forwarder(tmp: Path, pg_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = (tmp / "forwarder.log").open("wb")
    script = str(Path(__file__).with_name("bare_forwarder.py"))
    proc = subprocess.Popen(
        [sys.executable, script, "--port", str(port), "--upstream-port", str(pg_port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc, "bare Python forwarder")
    return proc, port


# ------------------------------------------------------------------------------------------
# sqlproxy

CONFIG = """
default_database = "{db}"
embedded = "off"

[server]
http_host = "127.0.0.1"
http_port = {http_port}
state_dir = "{state_dir}"

[wire]
host = "127.0.0.1"
port = {wire_port}
pool_mode = "{pool_mode}"
server_pool_size = {pool_size}
workers = {workers}

[databases.{db}]
dsn = "{dsn}"
pool_min = 0
pool_max = 4

[roles.bench]
description = "pgbench: reads and writes the pgbench_* tables, nothing else"

[users.{user}]
roles = ["bench"]
password = "{verifier}"

[[policies]]
name = "session-utility"
description = "transactions, SET/SHOW and table-less SELECTs"
users = ["*"]
statements = ["set", "show", "transaction", "select"]
action = "allow"

[[policies]]
name = "catalog-read"
description = "pgbench and drivers look at the catalogs (pgbench: is pgbench_accounts partitioned?)"
users = ["*"]
schema = "pg_catalog"
access = ["read"]
action = "allow"

[[policies]]
name = "bench-pgbench-tables"
roles = ["bench"]
database = "{db}"
schema = "public"
table = "{tables}"
access = ["read", "insert", "update", "delete"]
action = "allow"

# Default deny for everything else. The limits are far above what one machine can do, so the
# rate limiter runs its checks on every statement without refusing any.
[rate_limits]
global = {{ rate = 10000000, burst = 10000000 }}
user_default = {{ rate = 10000000, burst = 10000000 }}

[audit]
jsonl_path = "audit/audit.jsonl"
rotate_bytes = 4294967296
store = "sqlite:///audit/audit.db"
"""


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (sched_setaffinity moves one thread); processes and threads it
    starts later (the audit writer) inherit the mask."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path


def start_sqlproxy(
    tmp: Path,
    name: str,
    dsn: str,
    password: str,
    pool_mode: str,
    pool_size: int,
    *,
    tables: str = "pgbench_*",
    workers: int = 1,
) -> Proxy:
    """A `sqlproxy serve` process with the full pipeline; `bench` may read and write the tables
    matching ``tables`` (a policy pattern) in the public schema and nothing else."""
    state = tmp / name
    state.mkdir()
    port = free_port()
    cfg = state / "proxy.toml"
    cfg.write_text(
        CONFIG.format(
            db=BENCH_DB,
            http_port=free_port(),
            state_dir=state,
            wire_port=port,
            pool_mode=pool_mode,
            pool_size=pool_size,
            workers=workers,
            dsn=dsn,
            user=BENCH_USER,
            verifier=make_verifier(password),
            tables=tables,
        )
    )
    log = (state / "sqlproxy.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg), "--log-level", "warning"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc, f"sqlproxy ({name})")
    return Proxy(name, proc, port, state)


def audit_counts(state: Path) -> tuple[int, int, dict[str, int]]:
    """(JSONL records, SQLite records, SQLite records by decision) for the wire door."""
    jsonl = 0
    for f in (state / "audit").glob("audit.jsonl*"):
        with f.open("rb") as fh:
            jsonl += sum(1 for _ in fh)
    with contextlib.closing(sqlite3.connect(state / "audit" / "audit.db")) as db:
        rows = db.execute(
            "SELECT decision, count(*) FROM audit_records WHERE door = 'wire' GROUP BY decision"
        ).fetchall()
        total = db.execute("SELECT count(*) FROM audit_records").fetchone()[0]
    return jsonl, int(total), {str(d): int(n) for d, n in rows}


# ------------------------------------------------------------------------------------------
# pgbench

_TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
_TXNS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LAT = re.compile(r"^latency average = ([\d.]+) ms", re.M)


def run_pgbench(
    pgbench: str,
    target: Target,
    password: str,
    *,
    mode: str,
    select_only: bool,
    clients: int,
    seconds: int,
    rnd: int,
    profile_dir: Path | None = None,
) -> Result:
    argv = [pgbench, "-n", "-M", mode, "-c", str(clients), "-j", "2", "-T", str(seconds)]
    if select_only:
        argv.insert(1, "-S")
    load1 = os.getloadavg()[0]
    spy: subprocess.Popen[bytes] | None = None
    if profile_dir is not None and target.key.startswith("sqlproxy") and target.pid and rnd == 1:
        out_file = profile_dir / f"{mode if select_only else 'tpcb'}-{target.key}.txt"
        spy = subprocess.Popen(
            [
                PY_SPY,
                "record",
                "--pid",
                str(target.pid),
                "--duration",
                str(max(1, seconds - 2)),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(out_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    cpu0 = process_cpu_s(target.pid) if target.pid else 0.0
    main0 = main_thread_cpu_s(target.pid) if target.pid else 0.0
    proc = subprocess.run(
        argv,
        env=pgenv(target.port, target.database, password),
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    cpu_s = process_cpu_s(target.pid) - cpu0 if target.pid else None
    main_s = main_thread_cpu_s(target.pid) - main0 if target.pid else 0.0
    if spy is not None:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    out = proc.stdout
    tps, txns, failed, lat = (r.search(out) for r in (_TPS, _TXNS, _FAILED, _LAT))
    error = ""
    if proc.returncode != 0 or tps is None:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        error = f"exit {proc.returncode}: " + " | ".join(lines[-3:])
    result = Result(
        target=target.key,
        mode=mode if select_only else "tpcb-" + mode,
        round=rnd,
        tps=float(tps.group(1)) if tps else 0.0,
        transactions=int(txns.group(1)) if txns else 0,
        # pgbench 15 prints the count; older ones abort the client instead (exit code != 0).
        failed=int(failed.group(1)) if failed else (0 if proc.returncode == 0 else -1),
        latency_ms=float(lat.group(1)) if lat else 0.0,
        load1=load1,
        cpu_s=cpu_s,
        error=error,
    )
    tag = f"[{result.mode} round {rnd}] {target.label}"
    cpu = result.cpu_us_per_txn
    print(
        f"{tag:52} {result.tps:8.0f} tps  lat {result.latency_ms:6.2f} ms  failed {result.failed}  "
        + (
            f"proxy CPU {cpu_s / seconds:4.0%} {cpu:5.0f} us/txn "
            f"(event loop {main_s * 1e6 / max(1, result.transactions):4.0f})  "
            if cpu is not None and cpu_s
            else ""
        )
        + f"load {load1:.2f}"
        + (f"  ERROR {error}" if error else ""),
        flush=True,
    )
    return result


# ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="per pgbench run (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the -S runs (default 2)")
    ap.add_argument("--clients", type=int, default=16, help="pgbench -c for -S (default 16)")
    ap.add_argument("--tpcb-clients", type=int, default=8, help="pgbench -c for TPC-B (default 8)")
    ap.add_argument("--pool-size", type=int, default=16, help="server connections per pool (16)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    ap.add_argument("--no-tpcb", action="store_true", help="skip the TPC-B runs")
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="also measure sqlproxy with [wire] workers = N in transaction mode, the pool size "
        "split between them (default: the number of CPUs; below 2: not measured)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="diagnostic: run each sqlproxy process (and its audit writer) alone on the last CPU "
        "and everything else on the others, so its CPU per transaction is measured without "
        "scheduling noise; the TPS ratios are then not a fair comparison",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile sqlproxy with py-spy during its round-1 runs; collapsed stacks and a "
        "summary of the hottest functions go to DIR",
    )
    args = ap.parse_args()

    pgbench = pgbench_binary()
    proxy_cpus: set[int] | None = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs at least two CPUs")
        proxy_cpus = {cpus[-1]}
        # Everything this script starts from now on inherits the other CPUs.
        os.sched_setaffinity(0, set(cpus[:-1]))
        print(f"pinned: sqlproxy on CPU {cpus[-1]}, everything else on {cpus[:-1]}", flush=True)
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"load average at start: {loadavg()} ({os.cpu_count()} CPUs)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="sqlproxy-pgbench-"))
    tmp.chmod(0o755)  # the postgres user must reach the PostgreSQL and PgBouncer directories
    password = os.urandom(12).hex()
    pg = EmbeddedPostgres(tmp / "pg", durable=False, max_connections=200)
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    proxies: list[Proxy] = []
    results: list[Result] = []
    try:
        pg.start()
        prepare_postgres(pg, password, pgbench, args.scale)
        bouncer, bouncer_port = start_pgbouncer(tmp, pg.port, password, args.pool_size)
        procs.append((bouncer, "pgbouncer"))
        forwarder, forwarder_port = start_forwarder(tmp, pg.port)
        procs.append((forwarder, "bare Python forwarder"))
        upstream = f"postgresql://{BENCH_USER}:{password}@127.0.0.1:{pg.port}/{BENCH_DB}"
        for name, mode in (("sqlproxy-tx", "transaction"), ("sqlproxy-session", "session")):
            p = start_sqlproxy(tmp, name, upstream, password, mode, args.pool_size)
            if proxy_cpus is not None:
                pin_process(p.proc.pid, proxy_cpus)
            proxies.append(p)
            procs.append((p.proc, name))
        multi: Target | None = None
        if args.workers > 1 and proxy_cpus is None:
            name = f"sqlproxy-w{args.workers}"
            per_worker = max(1, args.pool_size // args.workers)
            p = start_sqlproxy(tmp, name, upstream, password, "transaction", per_worker, workers=args.workers)
            proxies.append(p)
            procs.append((p.proc, name))
            multi = Target(
                name, f"sqlproxy ({args.workers} workers, transaction)", p.port, BENCH_DB, p.proc.pid
            )

        direct = Target("direct", "direct PostgreSQL", pg.port, BENCH_DB)
        pgb_tx = Target("pgbouncer-tx", "PgBouncer (transaction)", bouncer_port, "bench_tx", bouncer.pid)
        pgb_ses = Target(
            "pgbouncer-session", "PgBouncer (session)", bouncer_port, "bench_session", bouncer.pid
        )
        sp_tx = Target(
            "sqlproxy-tx", "sqlproxy (transaction)", proxies[0].port, BENCH_DB, proxies[0].proc.pid
        )
        sp_ses = Target(
            "sqlproxy-session", "sqlproxy (session)", proxies[1].port, BENCH_DB, proxies[1].proc.pid
        )
        fwd = Target("python-fwd", "bare Python forwarder (1:1)", forwarder_port, BENCH_DB, forwarder.pid)
        extra = (multi,) if multi is not None else ()
        plan: dict[str, tuple[Target, ...]] = {
            "simple": (direct, pgb_tx, fwd, sp_tx, *extra),
            "extended": (direct, pgb_tx, fwd, sp_tx, *extra),
            "prepared": (direct, pgb_ses, fwd, sp_tx, sp_ses, *extra),
        }
        print(
            f"\npgbench -S -c {args.clients} -j 2 -T {args.seconds}, {args.rounds} round(s), "
            f"scale {args.scale}, pool size {args.pool_size}",
            flush=True,
        )
        for rnd in range(1, args.rounds + 1):
            for mode in MODES:
                for target in plan[mode]:
                    results.append(
                        run_pgbench(
                            pgbench,
                            target,
                            password,
                            mode=mode,
                            select_only=True,
                            clients=args.clients,
                            seconds=args.seconds,
                            rnd=rnd,
                            profile_dir=args.py_spy,
                        )
                    )
        if not args.no_tpcb:
            print(f"\nTPC-B (pgbench default script) -c {args.tpcb_clients} -j 2 -T {args.seconds}")
            for target in (direct, pgb_tx, sp_tx, *extra):
                results.append(
                    run_pgbench(
                        pgbench,
                        target,
                        password,
                        mode="simple",
                        select_only=False,
                        clients=args.tpcb_clients,
                        seconds=args.seconds,
                        rnd=1,
                        profile_dir=args.py_spy,
                    )
                )
        load_end = loadavg()
    finally:
        for proc, what in reversed(procs):
            stop(proc, what)
        pg.stop()

    audit = {p.name: audit_counts(p.state_dir) for p in proxies}
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    report(args, results, audit, load_end, time.monotonic() - started)
    if args.py_spy is not None:
        for f in sorted(args.py_spy.glob("*.txt")):
            if not f.name.endswith(".top.txt"):
                summarize_profile(f)
    bad = [r for r in results if r.error or r.failed != 0]
    return 1 if bad else 0


def report(
    args: argparse.Namespace,
    results: list[Result],
    audit: dict[str, tuple[int, int, dict[str, int]]],
    load_end: str,
    elapsed: float,
) -> None:
    by: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by.setdefault((r.mode, r.target), []).append(r)

    def mean(mode: str, target: str) -> float:
        rs = by.get((mode, target), [])
        return statistics.mean(r.tps for r in rs) if rs else float("nan")

    rounds = max((r.round for r in results), default=0)
    print(
        f"\n== pgbench -S -c {args.clients} -j 2 -T {args.seconds} (scale {args.scale}, "
        f"pool size {args.pool_size}): TPS =="
    )
    head = f"{'mode':11} {'target':17}" + "".join(f" {'round ' + str(i):>9}" for i in range(1, rounds + 1))
    print(head + f" {'mean':>9} {'failed':>7} {'lat ms':>7} {'proxy CPU us/txn':>17}")
    for (mode, target), rs in by.items():
        cells = "".join(f" {r.tps:9.0f}" for r in rs)
        cells += " " * 10 * (rounds - len(rs))
        failed = sum(r.failed for r in rs)
        lat = statistics.mean(r.latency_ms for r in rs)
        cpus = [c for c in (r.cpu_us_per_txn for r in rs) if c is not None]
        cpu = f"{statistics.mean(cpus):17.0f}" if cpus else f"{'-':>17}"
        print(f"{mode:11} {target:17}{cells} {mean(mode, target):9.0f} {failed:7d} {lat:7.2f} {cpu}")

    print("\n== ratios (mean TPS) ==")
    if args.pin:
        print("(--pin: sqlproxy had a CPU of its own and everything else shared the rest: these")
        print(" ratios are not a comparison; read the CPU per transaction)")
    print(f"{'mode':11} {'target':17} {'vs PgBouncer':>18} {'/PgBouncer':>11} {'/direct':>8}")
    pairs = (
        ("simple", "python-fwd", "pgbouncer-tx"),
        ("extended", "python-fwd", "pgbouncer-tx"),
        ("prepared", "python-fwd", "pgbouncer-session"),
        ("simple", "sqlproxy-tx", "pgbouncer-tx"),
        ("extended", "sqlproxy-tx", "pgbouncer-tx"),
        ("prepared", "sqlproxy-tx", "pgbouncer-session"),
        ("prepared", "sqlproxy-session", "pgbouncer-session"),
        ("tpcb-simple", "sqlproxy-tx", "pgbouncer-tx"),
    )
    w = f"sqlproxy-w{args.workers}"
    pairs += (
        ("simple", w, "pgbouncer-tx"),
        ("extended", w, "pgbouncer-tx"),
        ("prepared", w, "pgbouncer-session"),
        ("tpcb-simple", w, "pgbouncer-tx"),
    )
    for mode, sp, pgb in pairs:
        if (mode, sp) not in by:
            continue
        s = mean(mode, sp)
        print(f"{mode:11} {sp:17} {pgb:>18} {s / mean(mode, pgb):11.3f} {s / mean(mode, 'direct'):8.3f}")

    if any(target == w for _, target in by):
        print(f"\n== {w} against one process (sqlproxy-tx): TPS ratio, CPU per transaction ==")
        for mode in (*MODES, "tpcb-simple"):
            if (mode, w) not in by or (mode, "sqlproxy-tx") not in by:
                continue
            cpu = {
                t: statistics.mean(c for r in by[(mode, t)] if (c := r.cpu_us_per_txn) is not None)
                for t in (w, "sqlproxy-tx")
            }
            print(
                f"{mode:11} {mean(mode, w) / mean(mode, 'sqlproxy-tx'):6.3f}   "
                f"{cpu['sqlproxy-tx']:5.0f} -> {cpu[w]:5.0f} us"
            )

    print("\n== audit (full pipeline check) ==")
    for name, (jsonl, total, by_decision) in audit.items():
        expected = sum(
            r.transactions * (1 if not r.mode.startswith("tpcb") else 7) for r in results if r.target == name
        )
        print(
            f"{name:18} JSONL records {jsonl:9d}  SQLite records {total:9d}  wire by decision "
            f"{json.dumps(by_decision)}  statements in pgbench's completed transactions {expected}"
        )
        if total < expected:
            print(f"  WARNING: fewer audit records than statements pgbench completed through {name}")
    failed = sum(max(r.failed, 0) for r in results)
    errors = [r for r in results if r.error]
    print(f"\nfailed transactions reported by pgbench: {failed}; runs with errors: {len(errors)}")
    for r in errors:
        print(f"  {r.mode} {r.target} round {r.round}: {r.error}")
    print(f"load average at end: {load_end}; total time {elapsed:.0f} s")


def summarize_profile(path: Path, top: int = 25) -> None:
    """The hottest functions of a py-spy raw (collapsed stacks) profile: self and inclusive share
    of the samples, printed and written next to it as NAME.top.txt."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
        frames = [fr for fr in frames if fr]
        if frames:
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + n
    if total == 0:
        return
    lines = [f"{path.name}: {total} samples", f"{'self %':>7}  function (file)"]
    for fr, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / total:7.1f}  {fr}")
    lines.append(f"{'incl %':>7}  function (file)")
    for fr, n in sorted(incl.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"{100 * n / total:7.1f}  {fr}")
    text = "\n".join(lines)
    path.with_suffix(".top.txt").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
