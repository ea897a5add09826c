"""CPU cost of the audit path per record, in-process: build a pgbench-like record, submit it
to an AuditWriter with the SQLite store and the JSONL sink (as `sqlproxy serve` configures
them), and drain. Prints process CPU (all threads) per record, and the share spent on the
request path (build + submit) alone; best of --repeat runs.

    .venv/bin/python bench/audit_micro.py --records 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import JsonlSink, SqliteStore
from sqlproxy.audit.writer import AuditWriter

KEY = bytes.fromhex("33" * 32)


def make_record(i: int) -> AuditRecord:
    return AuditRecord.new(
        user="bench",
        roles=["bench"],
        source="127.0.0.1:50000",
        door="wire",
        database="bench",
        sql=f"SELECT abalance FROM pgbench_accounts WHERE aid = {i};",
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


async def one_run(n: int, batch: int) -> tuple[float, float]:
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
            t = time.process_time()
            for i in range(start, min(n, start + batch)):
                await w.submit(make_record(i))
            submit_cpu += time.process_time() - t
            await asyncio.sleep(0)  # let the drain task take a batch, as between requests
        await w.flush()
        total = time.process_time() - c0
        await w.close()
    return total / n * 1e6, submit_cpu / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=32, help="records submitted between yields")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = [await one_run(args.records, args.batch) for _ in range(args.repeat)]
    total = min(r[0] for r in runs)
    path = min(r[1] for r in runs)
    print(f"audit: {total:.1f} us CPU per record in all (best of {args.repeat}), request path {path:.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
