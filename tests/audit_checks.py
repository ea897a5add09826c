"""Checking a written audit trail end to end: the SQLite store against its own chain head, and
the JSONL files against that head, each holding exactly the expected number of records."""

from __future__ import annotations

from pathlib import Path

from sqlproxy.audit.sinks import SqliteStore
from sqlproxy.audit.verify import verify_jsonl, verify_store


async def verify_trail(db: Path, jsonl: Path, key: bytes, expected: int) -> None:
    store = SqliteStore(db)
    try:
        report = await verify_store(store, key)
        head = await store.head()
    finally:
        await store.close()
    assert report.ok, report.problems
    assert report.records == expected and head is not None and head.seq == expected
    jreport = verify_jsonl(jsonl, key, head, require_genesis=True)
    assert jreport.ok, jreport.problems
    assert jreport.records == expected
