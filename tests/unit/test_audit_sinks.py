"""The SQLite store and the JSONL file set: storage, queries, rotation, and that tampering with
what is on disk is caught by verification."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from sqlproxy.audit.chain import Chain, ChainState
from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import JsonlSink, SqliteStore, all_jsonl_files
from sqlproxy.audit.verify import ProblemKind, verify_jsonl, verify_store

KEY = bytes.fromhex("22" * 32)


def rec(n: int = 0, **kw: object) -> AuditRecord:
    base: dict[str, object] = {
        "user": "alice",
        "roles": ["analyst"],
        "source": "10.0.0.1:4000",
        "door": "wire",
        "database": "demo",
        "sql": f"SELECT {n}",
        "statement_kinds": ["select"],
        "relations": [{"table": "public.orders", "access": "read", "columns": ["id"]}],
        "columns": ["id"],
        "decision": "allow",
        "rows": 1,
        "duration_ms": 0.5,
    }
    base.update(kw)
    return AuditRecord.new(**base)  # type: ignore[arg-type]


def sealed(n: int, chain: Chain | None = None) -> list[AuditRecord]:
    c = chain or Chain(KEY)
    return [c.append(rec(i)) for i in range(n)]


async def stored(tmp_path: Path, n: int) -> tuple[SqliteStore, list[AuditRecord]]:
    store = SqliteStore(tmp_path / "audit.db")
    records = sealed(n)
    await store.write_batch(records[: n // 2])
    await store.write_batch(records[n // 2 :])
    return store, records


def db_exec(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


# -- SQLite store -------------------------------------------------------------------------------


async def test_store_roundtrip_head_last_get_after(tmp_path: Path) -> None:
    store, records = await stored(tmp_path, 6)
    try:
        assert await store.head() == ChainState(6, records[-1].hash)
        assert await store.last() == records[-1]
        assert await store.get_after(2, limit=3) == records[2:5]
        assert await store.get_after(6) == []
        assert (await verify_store(store, KEY)).ok
    finally:
        await store.close()


async def test_store_uses_wal_and_has_indexes(tmp_path: Path) -> None:
    store, _ = await stored(tmp_path, 2)
    await store.close()
    conn = sqlite3.connect(tmp_path / "audit.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexed = {
        r[0]
        for r in conn.execute(
            "SELECT il.name FROM sqlite_master m, pragma_index_list(m.name) l, pragma_index_info(l.name) il "
            "WHERE m.name = 'audit_records'"
        )
    }
    assert {"ts", "user", "decision", "seq"} <= indexed | {"seq"}  # seq is the rowid key
    assert conn.execute("SELECT seq FROM chain_head").fetchone() == (2,)
    conn.close()


async def test_store_head_survives_reopen_and_retried_batch_is_not_duplicated(tmp_path: Path) -> None:
    store, records = await stored(tmp_path, 4)
    await store.write_batch(records[2:])  # a retry of a batch that had in fact committed
    await store.close()
    reopened = SqliteStore(tmp_path / "audit.db")
    try:
        assert await reopened.head() == ChainState(4, records[-1].hash)
        assert len(await reopened.get_after(0)) == 4
        assert (await verify_store(reopened, KEY)).ok
    finally:
        await reopened.close()


async def test_store_query_filters(tmp_path: Path) -> None:
    c = Chain(KEY)
    rows = [
        c.append(rec(1, user="alice", ts="2024-01-01T10:00:00.000000Z")),
        c.append(
            rec(
                2,
                user="bob",
                decision="deny",
                statement_kinds=["delete"],
                relations=[{"table": "hr.salaries", "access": "write", "columns": []}],
                ts="2024-01-02T10:00:00.000000Z",
            )
        ),
        c.append(
            rec(
                3,
                user=None,
                decision="unauthenticated",
                relations=[],
                statement_kinds=[],
                ts="2024-01-03T10:00:00.000000Z",
            )
        ),
        c.append(
            rec(
                4,
                user="alice",
                statement_kinds=["SELECT", "insert"],
                relations=[
                    {"table": "public.orders", "access": "read", "columns": ["id"]},
                    {"table": "audit.orders_copy", "access": "write", "columns": []},
                ],
                ts="2024-01-04T10:00:00.000000Z",
            )
        ),
    ]
    store = SqliteStore(tmp_path / "q.db")
    await store.write_batch(rows)
    try:

        def seqs(found: list[AuditRecord]) -> list[int]:
            return [r.seq for r in found]

        assert seqs(await store.query()) == [1, 2, 3, 4]
        assert seqs(await store.query(user="alice")) == [1, 4]
        assert seqs(await store.query(decision="deny")) == [2]
        assert seqs(await store.query(decision="unauthenticated")) == [3]
        assert seqs(await store.query(table="hr.salaries")) == [2]
        assert seqs(await store.query(table="orders")) == [1, 4]  # any schema
        assert seqs(await store.query(table="orders_copy")) == [4]
        assert seqs(await store.query(table="other.orders")) == []
        assert seqs(await store.query(kind="insert")) == [4]
        assert seqs(await store.query(kind="select")) == [1, 4]  # case-insensitive
        assert seqs(await store.query(since="2024-01-02T10:00:00Z")) == [2, 3, 4]  # inclusive
        assert seqs(await store.query(until="2024-01-03T10:00:00Z")) == [1, 2]  # exclusive
        assert seqs(await store.query(since="2024-01-02", until="2024-01-04")) == [2, 3]
        assert seqs(await store.query(user="alice", kind="select", table="public.orders")) == [1, 4]
        # Without after_seq: the newest matches, oldest first; with it: page forward.
        assert seqs(await store.query(limit=2)) == [3, 4]
        assert seqs(await store.query(after_seq=1, limit=2)) == [2, 3]
        assert seqs(await store.query(after_seq=4)) == []
        with pytest.raises(ValueError):
            await store.query(since="not a time")
    finally:
        await store.close()


async def test_store_rows_hold_the_hashed_json_text(tmp_path: Path) -> None:
    store, records = await stored(tmp_path, 3)
    await store.close()
    conn = sqlite3.connect(tmp_path / "audit.db")
    try:
        for r in records:
            row = conn.execute(
                "SELECT roles, statement_kinds, relations, columns, classifications, extra, sql, hash "
                "FROM audit_records WHERE seq = ?",
                (r.seq,),
            ).fetchone()
            d = r.to_dict()
            names = ("roles", "statement_kinds", "relations", "columns", "classifications", "extra")
            assert row[:6] == tuple(
                json.dumps(d[n], sort_keys=True, separators=(",", ":"), ensure_ascii=False) for n in names
            )
            assert row[6:] == (r.sql, r.hash)
        # None is stored as NULL (bound as NaN, which SQLite stores as NULL).
        assert conn.execute(
            "SELECT count(*) FROM audit_records WHERE sqlstate IS NULL AND error IS NULL "
            "AND typeof(fingerprint) = 'null' AND typeof(rule) = 'null'"
        ).fetchone() == (3,)
    finally:
        conn.close()


async def test_store_large_batch_reads_back_exactly(tmp_path: Path) -> None:
    """A batch longer than the rows one INSERT statement takes, with None and odd values."""
    c = Chain(KEY)
    records = [
        c.append(
            rec(
                i,
                user=None if i % 3 else f"u{i}",
                rows=None if i % 4 else i,
                sql=None if i % 5 == 0 else f"SELECT '\\ \" é {i}'",
                sqlstate=None if i % 2 else "42501",
                extra={} if i % 2 else {"n": i, "f": 0.1},
                duration_ms=i / 7,
            )
        )
        for i in range(75)
    ]
    store = SqliteStore(tmp_path / "big.db")
    try:
        await store.write_batch(records)
        assert await store.get_after(0, limit=100) == records
        assert (await verify_store(store, KEY)).ok
    finally:
        await store.close()


async def test_store_made_with_the_id_index_opens_and_loses_it(tmp_path: Path) -> None:
    """Files made by earlier versions have an index on "id" that nothing reads; it is dropped on
    opening and the records stay as they were."""
    store, records = await stored(tmp_path, 4)
    await store.close()
    db_exec(tmp_path / "audit.db", ('CREATE INDEX audit_records_id ON audit_records ("id")', ()))
    reopened = SqliteStore(tmp_path / "audit.db")
    try:
        await reopened.write_batch(sealed(2, Chain(KEY, ChainState(4, records[-1].hash))))
        assert [r.seq for r in await reopened.get_after(0)] == [1, 2, 3, 4, 5, 6]
        assert [r.seq for r in await reopened.query(user="alice", after_seq=2)] == [3, 4, 5, 6]
        assert (await verify_store(reopened, KEY)).ok
    finally:
        await reopened.close()
    conn = sqlite3.connect(tmp_path / "audit.db")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert "audit_records_id" not in names
    assert {"audit_records_ts", "audit_records_user", "audit_records_decision"} <= names


# -- tampering with the SQLite store ------------------------------------------------------------


def _modify(db: Path) -> None:
    db_exec(db, ("UPDATE audit_records SET sql = 'SELECT 1 -- nothing to see' WHERE seq = 3", ()))


def _delete(db: Path) -> None:
    db_exec(db, ("DELETE FROM audit_records WHERE seq = 3", ()))


def _insert(db: Path) -> None:
    # Make room at seq 3 and copy seq 2 there: the copy's hash covers seq 2, not 3.
    db_exec(
        db,
        ("UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 3", ()),
        ("UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1003", ()),
        (
            "INSERT INTO audit_records SELECT 3, id, ts, user, roles, source, door, database, sql, "
            "fingerprint, statement_kinds, relations, columns, decision, rule, reason, rows, duration_ms, "
            "classifications, sqlstate, error, extra, prev_hash, hash FROM audit_records WHERE seq = 2",
            (),
        ),
        ("UPDATE chain_head SET seq = seq + 1", ()),
    )


def _reorder(db: Path) -> None:
    db_exec(
        db,
        ("UPDATE audit_records SET seq = -1 WHERE seq = 2", ()),
        ("UPDATE audit_records SET seq = 2 WHERE seq = 3", ()),
        ("UPDATE audit_records SET seq = 3 WHERE seq = -1", ()),
    )


def _truncate(db: Path) -> None:
    db_exec(db, ("DELETE FROM audit_records WHERE seq > 4", ()))


def _head_moved(db: Path) -> None:
    db_exec(db, ("UPDATE chain_head SET hash = ?", ("e" * 64,)))


def _corrupt_json(db: Path) -> None:
    db_exec(db, ("UPDATE audit_records SET relations = '[{broken' WHERE seq = 2", ()))


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_modify, {(3, ProblemKind.MODIFIED)}),
        (_delete, {(3, ProblemKind.DELETED)}),
        # seq is hashed, so every renumbered record fails too; the copy does not link to seq 2.
        (
            _insert,
            {
                (3, ProblemKind.MODIFIED),
                (3, ProblemKind.BROKEN_LINK),
                (4, ProblemKind.MODIFIED),
                (7, ProblemKind.MODIFIED),
            },
        ),
        (_reorder, {(2, ProblemKind.MODIFIED), (3, ProblemKind.MODIFIED)}),
        (_truncate, {(5, ProblemKind.TRUNCATED)}),
        (_head_moved, {(6, ProblemKind.HEAD_MISMATCH)}),
        (_corrupt_json, {(2, ProblemKind.MALFORMED)}),
    ],
    ids=["modified", "deleted", "inserted", "reordered", "truncated", "head", "malformed"],
)
async def test_sqlite_tampering_detected(
    tmp_path: Path, tamper: Callable[[Path], None], expected: set[tuple[int, ProblemKind]]
) -> None:
    store, _ = await stored(tmp_path, 6)
    assert (await verify_store(store, KEY)).ok
    await store.close()
    tamper(tmp_path / "audit.db")
    reopened = SqliteStore(tmp_path / "audit.db")
    try:
        report = await verify_store(reopened, KEY)
    finally:
        await reopened.close()
    assert expected <= {(p.seq, p.kind) for p in report.problems}, report.problems
    assert not report.ok


# -- JSONL ----------------------------------------------------------------------------------------


async def test_jsonl_writes_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    sink = JsonlSink(path, rotate_bytes=1 << 20, keep_files=3)
    records = sealed(5)
    await sink.write_batch(records[:2])
    await sink.write_batch(records[2:])
    await sink.write_batch(records[3:])  # a retry after a partial failure: not written twice
    await sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [AuditRecord.from_json(line) for line in lines] == records
    report = verify_jsonl(path, KEY, ChainState(5, records[-1].hash), require_genesis=True)
    assert report.ok and report.records == 5


async def test_jsonl_rotation_keeps_records_whole_and_verifies_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = sealed(40)
    line_len = max(len(r.to_json()) + 1 for r in records)
    rotate = line_len * 3 + 10  # three records per file
    sink = JsonlSink(path, rotate_bytes=rotate, keep_files=50)
    for i in range(0, 40, 7):
        await sink.write_batch(records[i : i + 7])
    await sink.close()

    files = all_jsonl_files(path)
    assert len(files) > 10
    assert files[-1] == path and files[0].name == f"audit.jsonl.{len(files) - 1}"
    seen: list[AuditRecord] = []
    for f in files:
        data = f.read_bytes()
        assert data.endswith(b"\n")
        assert len(data) <= rotate
        seen.extend(AuditRecord.from_json(line) for line in data.splitlines())
    assert seen == records  # whole, in order, across files
    report = verify_jsonl(path, KEY, ChainState(40, records[-1].hash), require_genesis=True)
    assert report.ok and report.records == 40


async def test_tampering_inside_a_rotated_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = sealed(12)
    sink = JsonlSink(path, rotate_bytes=max(len(r.to_json()) + 1 for r in records) * 3 + 5, keep_files=10)
    await sink.write_batch(records)
    await sink.close()
    rotated = path.with_name("audit.jsonl.2")
    lines = rotated.read_text().splitlines(keepends=True)
    victim = json.loads(lines[1])
    victim["decision"] = "deny"
    lines[1] = json.dumps(victim) + "\n"
    rotated.write_text("".join(lines))
    report = verify_jsonl(path, KEY, ChainState(12, records[-1].hash), require_genesis=True)
    assert [(p.seq, p.kind) for p in report.problems] == [(victim["seq"], ProblemKind.MODIFIED)]


async def test_jsonl_rotation_drops_oldest_beyond_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = sealed(30)
    rotate = max(len(r.to_json()) + 1 for r in records) * 2 + 5
    sink = JsonlSink(path, rotate_bytes=rotate, keep_files=3)
    await sink.write_batch(records)
    await sink.close()
    assert [f.name for f in all_jsonl_files(path)] == [
        "audit.jsonl.3",
        "audit.jsonl.2",
        "audit.jsonl.1",
        "audit.jsonl",
    ]
    report = verify_jsonl(path, KEY, ChainState(30, records[-1].hash))
    assert report.ok and report.last_seq == 30 and report.first_seq is not None and report.first_seq > 1
    strict = verify_jsonl(path, KEY, require_genesis=True)
    assert strict.kinds() == {ProblemKind.DELETED}


async def test_record_larger_than_rotate_bytes_gets_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    c = Chain(KEY)
    small, big, after = c.append(rec(1)), c.append(rec(2, sql="x" * 10_000)), c.append(rec(3))
    sink = JsonlSink(path, rotate_bytes=4096, keep_files=5)
    await sink.write_batch([small, big, after])
    await sink.close()
    contents = [f.read_text().splitlines() for f in all_jsonl_files(path)]
    assert [[AuditRecord.from_json(x).seq for x in lines] for lines in contents] == [[1], [2], [3]]


def _append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def test_torn_last_line_stays_isolated_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = sealed(5)
    sink = JsonlSink(path, rotate_bytes=1 << 20, keep_files=2)
    await sink.write_batch(records[:3])
    await sink.close()
    _append_bytes(path, records[3].to_json().encode()[:40])  # a crash in the middle of seq 4
    sink = JsonlSink(path, rotate_bytes=1 << 20, keep_files=2)
    assert await sink.last_seq() == 3
    await sink.write_batch(records[3:])
    await sink.close()
    report = verify_jsonl(path, KEY, ChainState(5, records[-1].hash), require_genesis=True)
    assert [p.kind for p in report.problems] == [ProblemKind.MALFORMED]
    assert report.records == 5


# -- tampering with JSONL -----------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _j_modify(lines: list[str]) -> list[str]:
    d = json.loads(lines[2])
    d["user"] = "mallory"
    lines[2] = json.dumps(d) + "\n"
    return lines


def _j_delete(lines: list[str]) -> list[str]:
    del lines[2]
    return lines


def _j_duplicate(lines: list[str]) -> list[str]:
    lines.insert(3, lines[2])
    return lines


def _j_forge(lines: list[str]) -> list[str]:
    # A forged record at seq 3 that links correctly but cannot carry a valid HMAC.
    d = json.loads(lines[2])
    d["sql"] = "SELECT 'forged'"
    d["hash"] = "a" * 64
    lines.insert(2, json.dumps(d) + "\n")
    return lines


def _j_reorder(lines: list[str]) -> list[str]:
    lines[1], lines[2] = lines[2], lines[1]
    return lines


def _j_truncate(lines: list[str]) -> list[str]:
    return lines[:4]


def _j_garble(lines: list[str]) -> list[str]:
    lines[2] = lines[2][:30] + "\n"
    return lines


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_j_modify, {(3, ProblemKind.MODIFIED)}),
        (_j_delete, {(3, ProblemKind.DELETED)}),
        (_j_duplicate, {(3, ProblemKind.DUPLICATE)}),
        (_j_forge, {(3, ProblemKind.MODIFIED), (3, ProblemKind.DUPLICATE)}),
        (_j_reorder, {(2, ProblemKind.REORDERED)}),
        (_j_truncate, {(5, ProblemKind.TRUNCATED)}),
        (_j_garble, {(None, ProblemKind.MALFORMED), (3, ProblemKind.DELETED)}),
    ],
    ids=["modified", "deleted", "duplicate", "inserted", "reordered", "truncated", "malformed"],
)
async def test_jsonl_tampering_detected(
    tmp_path: Path, tamper: Callable[[list[str]], list[str]], expected: set[tuple[int, ProblemKind]]
) -> None:
    path = tmp_path / "audit.jsonl"
    records = sealed(6)
    sink = JsonlSink(path, rotate_bytes=1 << 20, keep_files=10)
    await sink.write_batch(records)
    await sink.close()
    head = ChainState(6, records[-1].hash)
    assert verify_jsonl(path, KEY, head, require_genesis=True).ok
    path.write_text("".join(tamper(_lines(path))), encoding="utf-8")

    report = verify_jsonl(path, KEY, head, require_genesis=True)
    assert expected <= {(p.seq, p.kind) for p in report.problems}, report.problems
