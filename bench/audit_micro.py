"""CPU cost of the audit path per record, in-process, with the SQLite store and the JSONL sink as
`sqlproxy serve` configures them. Prints process CPU (all threads) per record, and the share
spent on the request path alone (CPU of the event loop's thread while it makes and queues
records: the store's worker thread runs meanwhile); best of --repeat runs.

--path wire (the default) is what a pgbench -S statement through the wire door costs: a Runtime
built from a minimal config makes the record of a finished request (user, roles, a new literal
in the SQL each time, one relation, allow, rows=1) with ``Runtime.audit_record`` and queues it
with ``try_enqueue``, as the pipeline's audit stage does; the writer's drain task seals and
writes. The requests themselves are made by the door, not the audit: their ids and SQL texts
are made before timing.

--path submit builds the same record with ``AuditRecord.new`` and seals it on the request path
with ``AuditWriter.submit`` (the generic path).

    .venv/bin/python bench/audit_micro.py --records 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from pathlib import Path

from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import JsonlSink, SqliteStore
from sqlproxy.audit.writer import AuditWriter

KEY = bytes.fromhex("33" * 32)
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"


def make_record(i: int) -> AuditRecord:
    return AuditRecord.new(
        user="bench",
        roles=["bench"],
        source="127.0.0.1:50000",
        door="wire",
        database="bench",
        sql=SQL.format(i),
        fingerprint="a1b2c3d4e5f60718",
        statement_kinds=["select"],
        relations=[{"table": "public.pgbench_accounts", "access": "read", "columns": ["abalance", "aid"]}],
        columns=["abalance"],
        decision="allow",
        rule="bench-rw",
        reason="allowed by rule 'bench-rw'",
        rows=1,
        duration_ms=0.412,
        classifications={},
        extra={},
    )


async def submit_run(n: int, batch: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        w = AuditWriter(
            sinks=[JsonlSink(Path(d) / "audit.jsonl")],
            store=SqliteStore(Path(d) / "audit.db"),
            key=KEY,
            queue_size=10_000,
            batch_size=500,
        )
        await w.start()
        submit_cpu = 0.0
        c0 = time.process_time()
        for start in range(0, n, batch):
            t = time.thread_time()
            for i in range(start, min(n, start + batch)):
                await w.submit(make_record(i))
            submit_cpu += time.thread_time() - t
            await asyncio.sleep(0)  # let the drain task take a batch, as between requests
        await w.flush()
        total = time.process_time() - c0
        await w.close()
    return total / n * 1e6, submit_cpu / n * 1e6


async def wire_run(n: int, batch: int) -> tuple[float, float]:
    # Imported here: the submit path must also run against code without these.
    from sqlproxy.auth.users import Identity
    from sqlproxy.config.loader import ConfigHolder, parse_config
    from sqlproxy.execute.upstream import StatementResult
    from sqlproxy.pipeline.request import Request
    from sqlproxy.policy.engine import Decision
    from sqlproxy.runtime import Runtime
    from sqlproxy.sql.catalog import Catalog

    with tempfile.TemporaryDirectory() as d:
        cfg = parse_config(
            {
                "server": {"state_dir": d},
                "databases": {"bench": {"dsn": "postgresql://bench@127.0.0.1:1/bench"}},
                "audit": {"hmac_key_env": "BENCH_AUDIT_KEY"},
            }
        )
        rt = Runtime(ConfigHolder(cfg), env={"BENCH_AUDIT_KEY": KEY.hex()})
        catalog = Catalog.from_dict(
            {"public.pgbench_accounts": {"columns": ["aid", "bid", "abalance", "filler"]}}
        )
        ident = Identity("bench", frozenset({"bench"}))
        decision = Decision(True, "bench-rw", "allowed by rule 'bench-rw'", ("bench-rw",))
        # A door's requests: one per statement, each with its own id and SQL text, the analysis
        # shared by the statement shape. A few request objects are reused (a door's request is
        # in the cache when it is audited, not one of 20,000 built in advance).
        sqls = [SQL.format(i) for i in range(n)]
        ids = [Request(door="wire", sql=None, source_ip="").id for _ in range(n)]
        pool = []
        for sql in sqls[:batch]:
            req = Request(door="wire", sql=sql, source_ip="127.0.0.1", source_port=50000, identity=ident)
            req.database = "bench"
            req.analysis = rt.analysis_cache.get_or_analyze(sql, catalog, ("public",))
            req.decision = decision
            req.statements = [sql]
            req.results = [StatementResult("SELECT 1", row_count=1)]
            pool.append(req)
        await rt.audit.start()
        gc.collect()
        audit = rt.audit
        request_cpu = 0.0
        c0 = time.process_time()
        for start in range(0, n, batch):
            t = time.thread_time()
            for i in range(start, min(n, start + batch)):
                req = pool[i - start]
                req.id = ids[i]
                req.sql = sqls[i]
                record = rt.audit_record(req)
                if not audit.try_enqueue(record):
                    await audit.enqueue(record)
            request_cpu += time.thread_time() - t
            await asyncio.sleep(0)  # let the drain task take a batch, as between requests
        await audit.flush()
        total = time.process_time() - c0
        await audit.close()
    return total / n * 1e6, request_cpu / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=32, help="records made between yields")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--path", choices=("wire", "submit"), default="wire")
    args = ap.parse_args()
    run = wire_run if args.path == "wire" else submit_run
    runs = [await run(args.records, args.batch) for _ in range(args.repeat)]
    total = min(r[0] for r in runs)
    path = min(r[1] for r in runs)
    print(
        f"audit ({args.path}): {total:.1f} us CPU per record in all (best of {args.repeat}), "
        f"request path {path:.1f} us"
    )


if __name__ == "__main__":
    asyncio.run(main())
