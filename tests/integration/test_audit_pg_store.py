"""The PostgreSQL audit store on a real server: the same behaviour as the SQLite store (storage,
queries, resuming from the head, harmless retries), one chain per node in a shared store, exact
round trips of values PostgreSQL cannot hold as given, tampering caught by verification, and the
configured trail (runtime and `verify_configured`) on a postgresql:// store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from sqlproxy.audit.chain import Chain, ChainState
from sqlproxy.audit.configured import verify_configured_async
from sqlproxy.audit.pg_store import ChainConflict, PgStore, parse_store_url, redact_url
from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import AuditStore, SqliteStore
from sqlproxy.audit.verify import ProblemKind, verify_store
from sqlproxy.audit.writer import AuditWriter
from sqlproxy.auth.keys import generate_api_key
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import DEMO_USERS, write_demo_config
from sqlproxy.embedded.postgres import PostgresServer, with_database
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app
from tests.fix_servers import PgFactory

KEY = bytes.fromhex("33" * 32)
NODE = "node-a"


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


def _with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


@pytest.fixture(scope="module")
def audit_db(pg_server: PostgresServer) -> Iterator[str]:
    name = f"sqlproxy_audit_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    try:
        yield with_database(pg_server.dsn(), name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def schema() -> str:
    return f"audit_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store_url(audit_db: str, schema: str) -> str:
    return _with_query(audit_db, schema=schema)


async def sql(dsn: str, *statements: str | tuple[str, tuple[object, ...]]) -> None:
    """Run statements in one transaction, as someone with direct access to the database would."""
    conn = await asyncpg.connect(parse_store_url(dsn)[0])
    try:
        async with conn.transaction():
            for st in statements:
                if isinstance(st, tuple):
                    await conn.execute(st[0], *st[1])
                else:
                    await conn.execute(st)
    finally:
        await conn.close()


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(parse_store_url(dsn)[0])
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def stored(url: str, n: int, node: str = NODE) -> tuple[PgStore, list[AuditRecord]]:
    store = PgStore(url, node)
    records = sealed(n)
    await store.write_batch(records[: n // 2])
    await store.write_batch(records[n // 2 :])
    return store, records


# -- URL ------------------------------------------------------------------------------------------


def test_url_schema_is_taken_out_and_other_parameters_stay() -> None:
    dsn, schema = parse_store_url("postgresql://u:p@h:5432/db?schema=audit&sslmode=disable")
    assert (dsn, schema) == ("postgresql://u:p@h:5432/db?sslmode=disable", "audit")
    assert parse_store_url("postgres://h/db") == ("postgres://h/db", "public")
    with pytest.raises(ValueError):
        parse_store_url("sqlite:///x.db")
    with pytest.raises(ValueError):
        parse_store_url("postgresql://h/db?schema=")
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert "secret" not in repr(PgStore("postgresql://u:secret@h/db?schema=s", "n"))


# -- storage ----------------------------------------------------------------------------------------


async def test_roundtrip_head_last_get_after(store_url: str) -> None:
    store = PgStore(store_url, NODE)
    try:
        assert await store.head() is None and await store.last() is None
        assert await store.get_after(0) == []
        assert (await verify_store(store, KEY)).ok  # an empty chain is a valid one
    finally:
        await store.close()
    store, records = await stored(store_url, 6)
    try:
        assert await store.head() == ChainState(6, records[-1].hash)
        assert await store.last() == records[-1]
        assert await store.get_after(2, limit=3) == records[2:5]
        assert await store.get_after(6) == []
        assert await store.scan(0) == records
        report = await verify_store(store, KEY)
        assert report.ok and report.records == 6
    finally:
        await store.close()


async def test_tables_types_and_indexes(store_url: str, schema: str) -> None:
    store, _ = await stored(store_url, 2)
    await store.close()
    types = {
        r["column_name"]: r["data_type"]
        for r in await fetch(
            store_url,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'sqlproxy_audit_records'",
            schema,
        )
    }
    assert {c for c, t in types.items() if t == "jsonb"} == {
        "roles",
        "statement_kinds",
        "relations",
        "columns",
        "classifications",
        "extra",
    }
    assert types["seq"] == "bigint" and types["node"] == "text"
    indexed = {
        r["attname"]
        for r in await fetch(
            store_url,
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass($1)",
            f"{schema}.sqlproxy_audit_records",
        )
    }
    assert {"ts", "user", "decision", "seq", "node"} <= indexed
    head = await fetch(store_url, f'SELECT node, seq FROM "{schema}".sqlproxy_audit_chain_head')
    assert [(r["node"], r["seq"]) for r in head] == [(NODE, 2)]
    # Nothing leaked into the default schema.
    assert not await fetch(
        store_url, "SELECT 1 FROM pg_tables WHERE tablename LIKE 'sqlproxy_audit%' AND schemaname = 'public'"
    )


async def test_head_survives_reopen_and_retried_batch_is_not_duplicated(store_url: str) -> None:
    store, records = await stored(store_url, 4)
    await store.write_batch(records[2:])  # a retry of a batch that had in fact committed
    await store.write_batch(records[1:4])  # and one straddling two committed batches
    await store.close()
    reopened = PgStore(store_url, NODE)
    try:
        assert await reopened.head() == ChainState(4, records[-1].hash)
        assert len(await reopened.get_after(0)) == 4
        assert (await verify_store(reopened, KEY)).ok
        # A retry that carries new records past the head writes only those.
        more = sealed(2, Chain(KEY, ChainState(4, records[-1].hash)))
        await reopened.write_batch([records[3], *more])
        assert [r.seq for r in await reopened.get_after(0)] == [1, 2, 3, 4, 5, 6]
        assert (await verify_store(reopened, KEY)).ok
    finally:
        await reopened.close()


async def test_writer_resumes_the_chain_from_the_head_after_a_restart(store_url: str) -> None:
    for round_ in range(2):
        writer = AuditWriter([], PgStore(store_url, NODE), KEY, batch_size=3)
        await writer.start()
        for i in range(5):
            await writer.submit(rec(i, sql=f"SELECT {round_}, {i}"))
        await writer.flush()
        await writer.close()
    store = PgStore(store_url, NODE)
    try:
        report = await verify_store(store, KEY)
        assert report.ok and report.records == 10, report.problems
        assert [r.sql for r in await store.get_after(4, limit=2)] == ["SELECT 0, 4", "SELECT 1, 0"]
    finally:
        await store.close()


async def test_a_batch_failed_while_the_server_was_down_succeeds_on_retry(pg_factory: PgFactory) -> None:
    server = await asyncio.to_thread(pg_factory)
    url = _with_query(server.dsn(), schema="audit")
    records = sealed(6)
    store = PgStore(url, NODE)
    try:
        await store.write_batch(records[:3])
        await asyncio.to_thread(server.stop)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await store.write_batch(records[3:])
        await asyncio.to_thread(server.restart)  # same port, same data
        await store.write_batch(records[3:])  # the pool reconnects; nothing of the failed try remains
        await store.write_batch(records)  # and a wider retry adds nothing
        assert await store.get_after(0) == records
        assert (await verify_store(store, KEY)).ok
    finally:
        await store.close()


# -- the same queries on both stores ---------------------------------------------------------------

QueryStore = Callable[[], Awaitable[AuditStore]]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> QueryStore:
    async def make() -> AuditStore:
        if request.param == "sqlite":
            return SqliteStore(tmp_path / "q.db")
        url: str = request.getfixturevalue("store_url")
        return PgStore(url, NODE)

    return make


async def test_query_filters_match_the_sqlite_store(make_store: QueryStore) -> None:
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
        c.append(
            rec(
                5,
                user="Ünï",
                statement_kinds=["ÄLTER"],
                relations=[{"table": "x.orders"}],
                ts="2024-01-05T10:00:00.000000Z",
            )
        ),
    ]
    store = await make_store()
    await store.write_batch(rows)
    try:

        def seqs(found: list[AuditRecord]) -> list[int]:
            return [r.seq for r in found]

        assert seqs(await store.query()) == [1, 2, 3, 4, 5]
        assert seqs(await store.query(user="alice")) == [1, 4]
        assert seqs(await store.query(user="Ünï")) == [5]
        assert seqs(await store.query(user="ünï")) == []
        assert seqs(await store.query(decision="deny")) == [2]
        assert seqs(await store.query(decision="unauthenticated")) == [3]
        assert seqs(await store.query(table="hr.salaries")) == [2]
        assert seqs(await store.query(table="orders")) == [1, 4, 5]  # any schema
        assert seqs(await store.query(table="orders_copy")) == [4]
        assert seqs(await store.query(table="copy")) == []  # a suffix is not a table name
        assert seqs(await store.query(table="other.orders")) == []
        assert seqs(await store.query(kind="insert")) == [4]
        assert seqs(await store.query(kind="select")) == [1, 4]  # case-insensitive
        assert seqs(await store.query(kind="Älter")) == [5]
        assert seqs(await store.query(kind="älter")) == []  # ASCII folding only, as SQLite's lower()
        assert seqs(await store.query(since="2024-01-02T10:00:00Z")) == [2, 3, 4, 5]  # inclusive
        assert seqs(await store.query(until="2024-01-03T10:00:00Z")) == [1, 2]  # exclusive
        assert seqs(await store.query(since="2024-01-02", until="2024-01-04")) == [2, 3]
        assert seqs(await store.query(since="2024-01-02T11:00:00+01:00")) == [2, 3, 4, 5]
        assert seqs(await store.query(user="alice", kind="select", table="public.orders")) == [1, 4]
        # Without after_seq: the newest matches, oldest first; with it: page forward.
        assert seqs(await store.query(limit=2)) == [4, 5]
        assert seqs(await store.query(limit=0)) == [5]
        assert seqs(await store.query(after_seq=1, limit=2)) == [2, 3]
        assert seqs(await store.query(after_seq=5)) == []
        assert await store.query(user="alice") == [rows[0], rows[3]]
        with pytest.raises(ValueError):
            await store.query(since="not a time")
    finally:
        await store.close()


# -- several nodes in one store ----------------------------------------------------------------------


async def test_each_node_has_its_own_chain(store_url: str) -> None:
    a, recs_a = await stored(store_url, 4, node="a")
    b, recs_b = await stored(store_url, 3, node="b")
    try:
        assert await a.head() == ChainState(4, recs_a[-1].hash)
        assert await b.head() == ChainState(3, recs_b[-1].hash)
        assert await a.get_after(0) == recs_a and await b.get_after(0) == recs_b
        assert len(await b.query(user="alice")) == 3
        assert (await verify_store(a, KEY)).ok and (await verify_store(b, KEY)).ok
        assert await a.nodes() == ["a", "b"]
    finally:
        await a.close()
        await b.close()


async def test_a_second_writer_under_the_same_node_id_is_refused(store_url: str) -> None:
    store, records = await stored(store_url, 4)
    try:
        other = sealed(6, Chain(KEY))  # a different chain: the same seqs, other ids and hashes
        with pytest.raises(ChainConflict):
            await store.write_batch(other[2:])  # overlaps the committed seqs
        with pytest.raises(ChainConflict):
            await store.write_batch(other[4:])  # continues the seqs but not the links
        assert await store.get_after(0) == records  # nothing of it was written
        assert (await verify_store(store, KEY)).ok
    finally:
        await store.close()


# -- values PostgreSQL cannot hold as given -------------------------------------------------------

ODD_EXTRA: dict[str, Any] = {
    "big": 1e20,
    "huge": 1.5e300,
    "neg_zero": -0.0,
    "tiny": 1e-7,
    "two": 2.0,
    "flag": True,
    "one": 1,
    "bigint": 2**70,
    "nested": [{"nul\x00key": "a\x00b"}, [0.1, -0.0]],
    "text": "日本語 \U0001f600",
}


async def test_values_postgres_cannot_hold_round_trip_exactly(store_url: str) -> None:
    c = Chain(KEY)
    records = [
        c.append(rec(1)),
        c.append(rec(2, sql="SELECT 1\x00; DROP TABLE x", user="ev\x00il", extra=ODD_EXTRA)),
        c.append(rec(3, rows=2**64, extra={"ok": 1.25})),
        c.append(rec(4, duration_ms=-0.0)),
    ]
    store = PgStore(store_url, NODE)
    await store.write_batch(records)
    await store.close()
    store = PgStore(store_url, NODE)
    try:
        assert await store.get_after(0) == records
        assert [r.to_json() for r in await store.get_after(0)] == [r.to_json() for r in records]
        assert (await verify_store(store, KEY)).ok
        # The columns still answer queries; a NUL in the filter matches the stored record.
        assert [r.seq for r in await store.query(user="ev\x00il")] == [2]
        verbatim = await fetch(
            store_url,
            f'SELECT seq FROM "{store.schema}".sqlproxy_audit_records '
            "WHERE verbatim IS NOT NULL ORDER BY seq",
        )
        assert [r["seq"] for r in verbatim] == [2, 3]  # only where the columns could not be exact
    finally:
        await store.close()


async def test_tampering_with_a_verbatim_row_is_detected(store_url: str, schema: str) -> None:
    c = Chain(KEY)
    records = [c.append(rec(1)), c.append(rec(2, sql="x\x00y")), c.append(rec(3))]
    store = PgStore(store_url, NODE)
    await store.write_batch(records)
    t = f'"{schema}".sqlproxy_audit_records'
    # The queryable column edited, the exact text left alone: the row disagrees with itself.
    await sql(store_url, f"UPDATE {t} SET \"user\" = 'mallory' WHERE seq = 2")
    report = await verify_store(store, KEY)
    # (An unreadable row is also a gap in the chain, reported as such.)
    assert (2, ProblemKind.MALFORMED) in {(p.seq, p.kind) for p in report.problems}
    assert ProblemKind.MODIFIED not in report.kinds()
    # Both edited consistently: the exact text no longer carries a valid HMAC.
    mallory = records[1].to_json().replace('"user":"alice"', '"user":"mallory"')
    await sql(store_url, (f"UPDATE {t} SET verbatim = $1 WHERE seq = 2", (mallory,)))
    report = await verify_store(store, KEY)
    assert {(p.seq, p.kind) for p in report.problems} == {(2, ProblemKind.MODIFIED)}
    # An exact text slipped into an ordinary row is checked against that row's columns.
    await sql(store_url, (f"UPDATE {t} SET verbatim = $1 WHERE seq = 3", (records[0].to_json(),)))
    report = await verify_store(store, KEY)
    assert (3, ProblemKind.MALFORMED) in {(p.seq, p.kind) for p in report.problems}
    await store.close()


# -- tampering ------------------------------------------------------------------------------------------

Tamper = Callable[[str, str], Awaitable[None]]


async def _modify(url: str, t: str) -> None:
    await sql(url, f"UPDATE {t} SET sql = 'SELECT 1 -- nothing to see' WHERE seq = 3")


async def _modify_jsonb(url: str, t: str) -> None:
    await sql(url, f"""UPDATE {t} SET relations = '[{{"table": "public.other"}}]' WHERE seq = 4""")


async def _delete(url: str, t: str) -> None:
    await sql(url, f"DELETE FROM {t} WHERE seq = 3")


async def _insert(url: str, t: str) -> None:
    # Make room at seq 3 and copy seq 2 there: the copy's hash covers seq 2, not 3.
    h = t.replace("sqlproxy_audit_records", "sqlproxy_audit_chain_head")
    await sql(
        url,
        f"UPDATE {t} SET seq = seq + 1000 WHERE seq >= 3",
        f"UPDATE {t} SET seq = seq - 999 WHERE seq >= 1003",
        f'INSERT INTO {t} SELECT node, 3, id, ts, "user", roles, source, door, database, sql, fingerprint, '
        "statement_kinds, relations, columns, decision, rule, reason, rows, duration_ms, classifications, "
        f"sqlstate, error, extra, prev_hash, hash, verbatim FROM {t} WHERE seq = 2",
        f"UPDATE {h} SET seq = seq + 1",
    )


async def _reorder(url: str, t: str) -> None:
    await sql(
        url,
        f"UPDATE {t} SET seq = -1 WHERE seq = 2",
        f"UPDATE {t} SET seq = 2 WHERE seq = 3",
        f"UPDATE {t} SET seq = 3 WHERE seq = -1",
    )


async def _truncate(url: str, t: str) -> None:
    await sql(url, f"DELETE FROM {t} WHERE seq > 4")


async def _head_moved(url: str, t: str) -> None:
    h = t.replace("sqlproxy_audit_records", "sqlproxy_audit_chain_head")
    await sql(url, (f"UPDATE {h} SET hash = $1", ("e" * 64,)))


async def _wrong_type(url: str, t: str) -> None:
    await sql(url, f"""UPDATE {t} SET relations = '"not a list"' WHERE seq = 2""")


async def _other_node(url: str, t: str) -> None:
    # A record moved to another node's chain is missing from this one.
    await sql(url, f"UPDATE {t} SET node = 'elsewhere' WHERE seq = 5")


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_modify, {(3, ProblemKind.MODIFIED)}),
        (_modify_jsonb, {(4, ProblemKind.MODIFIED)}),
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
        (_wrong_type, {(2, ProblemKind.MALFORMED)}),
        (_other_node, {(5, ProblemKind.DELETED)}),
    ],
    ids=[
        "modified",
        "modified-jsonb",
        "deleted",
        "inserted",
        "reordered",
        "truncated",
        "head",
        "malformed",
        "moved-node",
    ],
)
async def test_tampering_detected(
    store_url: str, schema: str, tamper: Tamper, expected: set[tuple[int, ProblemKind]]
) -> None:
    store, _ = await stored(store_url, 6)
    assert (await verify_store(store, KEY)).ok
    await store.close()
    await tamper(store_url, f'"{schema}".sqlproxy_audit_records')
    reopened = PgStore(store_url, NODE)
    try:
        report = await verify_store(reopened, KEY)
    finally:
        await reopened.close()
    assert expected <= {(p.seq, p.kind) for p in report.problems}, report.problems
    assert not report.ok


# -- the configured trail -----------------------------------------------------------------------------


async def _session(cfg_path: Path, keys: dict[str, str], statements: list[str]) -> None:
    holder = ConfigHolder(load_config(cfg_path), cfg_path)
    app = build_app(holder, env={})
    rt: Runtime = app.state.runtime
    assert isinstance(rt.audit.store, PgStore)
    await rt.start()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            for s in statements:
                await c.post(
                    "/api/v1/query", json={"sql": s}, headers={"Authorization": f"Bearer {keys['admin']}"}
                )
    finally:
        await rt.close()


async def test_configured_trail_on_postgresql(
    demo_dsn: str, store_url: str, schema: str, tmp_path: Path
) -> None:
    keys = {u: generate_api_key() for u in DEMO_USERS}
    cfg_path = write_demo_config(tmp_path, demo_dsn, 8080, keys)
    with cfg_path.open("a", encoding="utf-8") as f:
        f.write(f'\n[audit]\nstore = "{store_url}"\n')
    await _session(cfg_path, keys, ["SELECT 1", "SELECT count(*) FROM orders", "SELECT * FROM nope"])
    await _session(cfg_path, keys, ["SELECT 2", "SELECT 3\x00"])  # a restart: the chain continues

    cfg = load_config(cfg_path)
    report = await verify_configured_async(cfg, {})
    assert report.ok, report.summary_lines()
    assert report.store.records == 5 and report.jsonl is not None and report.jsonl.records == 5
    # The chain is filed under the node id kept in the state directory.
    node = (tmp_path / "stream.node_id").read_text().strip()
    heads = await fetch(store_url, f'SELECT node, seq FROM "{schema}".sqlproxy_audit_chain_head')
    assert [(r["node"], r["seq"]) for r in heads] == [(node, 5)]

    await sql(store_url, f"UPDATE \"{schema}\".sqlproxy_audit_records SET decision = 'allow' WHERE seq = 3")
    bad = await verify_configured_async(cfg, {})
    assert not bad.ok
    assert any("TAMPERING DETECTED" in line for line in bad.summary_lines())
    assert (3, ProblemKind.MODIFIED) in {(p.seq, p.kind) for p in bad.store.problems}
