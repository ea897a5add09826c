"""The query channel: the full pipeline (policy, masking, row filters, classification, audit),
client flow control observed on the server itself, cancellation, disconnects."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest_asyncio

from tests.fix_proxy import assert_pool_holds_no_leaked_state
from tests.fix_stream import LiveProxy, StreamClient


@pytest_asyncio.fixture(loop_scope="session")
async def pg(demo_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(demo_dsn)
    yield conn
    await conn.close()


async def _query(c: StreamClient, sub_id: str, sql: str, **kw: object) -> dict[str, Any]:
    await c.send({"type": "subscribe", "channel": "query", "id": sub_id, "sql": sql, **kw})
    return await c.recv_type("subscribed", sub_id)


async def _audit_of(live: LiveProxy, request_id: str):
    await live.runtime.audit.flush()
    recs = [r for r in await live.runtime.audit.store.query(limit=200) if r.id == request_id]
    assert len(recs) == 1
    return recs[0]


async def test_rows_stream_in_batches_and_complete(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    sub = await _query(
        c, "q", "SELECT g, g * 2 AS twice FROM generate_series(1, 2500) g", batch_rows=1000, credit=10
    )
    cols = await c.recv_type("columns", "q")
    assert [x["name"] for x in cols["columns"]] == ["g", "twice"]
    rows: list[list[int]] = []
    while True:
        f = await c.recv()
        if f["type"] == "data":
            rows.extend(f["rows"])
            assert len(f["rows"]) <= 1000
        elif f["type"] == "complete":
            break
    assert rows == [[i, 2 * i] for i in range(1, 2501)]
    assert f["row_count"] == 2500 and f["request_id"] == sub["request_id"]
    rec = await _audit_of(live, sub["request_id"])
    assert rec.door == "ws" and rec.decision == "allow" and rec.rows == 2500
    await c.close()


async def test_server_never_reads_ahead_of_credit(live: LiveProxy, pg: asyncpg.Connection) -> None:
    # nextval() runs once per row PostgreSQL produces for the portal, and sequences ignore
    # transactions: its value, read from another session, is how many rows the proxy has pulled.
    seq = f"probe_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE SEQUENCE {seq}")
    try:
        c = await live.ws("admin")
        await c.ready()
        await _query(
            c, "q", f"SELECT nextval('{seq}') AS n FROM generate_series(1, 100000)", batch_rows=1000, credit=1
        )
        await c.recv_type("columns", "q")
        b1 = await c.recv_type("data", "q")
        assert [r[0] for r in b1["rows"]] == list(range(1, 1001))
        # Nothing asked for beyond one batch, so nothing more was read.
        await c.send({"type": "ping"})
        await c.recv_type("pong")
        assert await pg.fetchval(f"SELECT last_value FROM {seq}") == 1000
        await c.send({"type": "more", "id": "q", "batches": 2})
        await c.recv_type("data", "q")
        b3 = await c.recv_type("data", "q")
        assert b3["rows"][-1][0] == 3000 and b3["batch"] == 3
        await c.send({"type": "ping"})
        await c.recv_type("pong")
        assert await pg.fetchval(f"SELECT last_value FROM {seq}") == 3000
        await c.send({"type": "cancel", "id": "q"})
        err = await c.recv_type("error", "q")
        assert err["code"] == "cancelled" and err["sqlstate"] == "57014" and err["rows_sent"] == 3000
        rec = await _audit_of(live, err["request_id"])
        assert rec.decision == "error" and rec.sqlstate == "57014" and rec.rows == 3000
        # The cursor was closed with its transaction: still nothing read past the credit.
        assert await pg.fetchval(f"SELECT last_value FROM {seq}") == 3000
        await c.close()
    finally:
        await pg.execute(f"DROP SEQUENCE {seq}")


async def test_cancel_interrupts_a_running_statement(live: LiveProxy, pg: asyncpg.Connection) -> None:
    lock_id = 7_340_001
    await pg.execute("SELECT pg_advisory_lock($1)", lock_id)
    try:
        c = await live.ws("admin")
        await c.ready()
        sub = await _query(c, "blocked", f"SELECT pg_advisory_lock({lock_id})", credit=1)
        await c.send({"type": "cancel", "id": "blocked"})
        err = await c.recv_type("error", "blocked")
        assert err["code"] == "cancelled" and err["request_id"] == sub["request_id"]
        # The connection still works for the next query.
        await _query(c, "after", "SELECT 1 AS one", credit=1)
        assert (await c.recv_type("data", "after"))["rows"] == [[1]]
        await c.recv_type("complete", "after")
        await c.close()
    finally:
        await pg.execute("SELECT pg_advisory_unlock($1)", lock_id)
    # Nobody holds or waits for the lock now: the cancelled statement did not live on.
    assert (
        await pg.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1", lock_id)
        == 0
    )


async def test_masking_row_filter_and_classification_apply(live: LiveProxy) -> None:
    c = await live.ws("analyst")
    await c.ready()
    sub = await _query(
        c, "m", "SELECT id, email, region FROM customers ORDER BY id", batch_rows=5, credit=1000
    )
    cols = await c.recv_type("columns", "m")
    labels = {x["name"]: x["classifications"] for x in cols["columns"]}
    assert labels["email"] == ["PII.Email"]
    rows: list[list[object]] = []
    while True:
        f = await c.recv()
        if f["type"] == "data":
            rows.extend(f["rows"])
        elif f["type"] == "complete":
            break
    assert rows and all(r[2] == "eu" for r in rows)  # row filter: the analyst's region only
    direct = await live.query("analyst", "SELECT id, email, region FROM customers ORDER BY id")
    assert rows == direct.json()["results"][0]["rows"]  # the same masking as the HTTP door
    assert all("@" not in str(r[1]) or "*" in str(r[1]) for r in rows)
    assert f["rewritten"] is True and f["classifications"]["email"] == ["PII.Email"]
    rec = await _audit_of(live, sub["request_id"])
    assert rec.classifications["email"] == ["PII.Email"] and rec.user == "analyst"
    await c.close()


async def test_denied_query_gets_an_error_frame(live: LiveProxy) -> None:
    c = await live.ws("analyst")
    await c.ready()
    sub = await _query(c, "d", "SELECT name, salary FROM employees")
    err = await c.recv_type("error", "d")
    assert err["code"] == "denied" and err["rule"] == "analyst-no-employees" and err["sqlstate"] == "42501"
    rec = await _audit_of(live, sub["request_id"])
    assert rec.decision == "deny" and rec.door == "ws"
    await c.close()


async def test_max_rows_caps_the_stream(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    await _query(
        c, "cap", "SELECT g FROM generate_series(1, 1000) g", batch_rows=300, credit=100, max_rows=700
    )
    total = 0
    while True:
        f = await c.recv()
        if f["type"] == "data":
            total += len(f["rows"])
        elif f["type"] == "complete":
            break
    assert total == 700 and f["statements"] == [{"command": "SELECT 700", "row_count": 700, "capped": True}]
    await c.close()


async def test_multi_statement_reports_each_statement(live: LiveProxy, pg: asyncpg.Connection) -> None:
    t = f"stream_t_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE TABLE {t} (x int)")
    try:
        c = await live.ws("admin")
        await c.ready()
        await _query(c, "ms", f"INSERT INTO {t} VALUES (1), (2); SELECT x FROM {t} ORDER BY x", credit=5)
        st = await c.recv_type("statement", "ms")
        assert st["command"] == "INSERT 0 2" and st["statement"] == 0
        d = await c.recv_type("data", "ms")
        assert d["rows"] == [[1], [2]] and d["statement"] == 1
        done = await c.recv_type("complete", "ms")
        assert [s["command"] for s in done["statements"]] == ["INSERT 0 2", "SELECT 2"]
        await c.close()
    finally:
        await pg.execute(f"DROP TABLE {t}")


async def test_a_write_past_the_row_cap_still_runs(live: LiveProxy, pg: asyncpg.Connection) -> None:
    t = f"stream_t_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE TABLE {t} (x int)")
    try:
        c = await live.ws("admin")
        await c.ready()
        # The last statement would fail if it ran: a read past the cap does not run.
        sql = (
            f"SELECT 1 AS one; INSERT INTO {t} VALUES (7) RETURNING x; "
            "SELECT 1 / (g - g) AS never FROM generate_series(1, 1) g"
        )
        await _query(c, "w", sql, credit=5, max_rows=1)
        done = await c.recv_type("complete", "w")
        assert done["statements"][1]["capped"] is True
        assert done["statements"][2] == {"command": "SELECT 0", "row_count": 0, "capped": True}
        assert await pg.fetchval(f"SELECT count(*) FROM {t} WHERE x = 7") == 1
        await c.close()
    finally:
        await pg.execute(f"DROP TABLE {t}")


async def test_disconnect_mid_stream_is_audited_as_cancelled(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    sub = await _query(c, "gone", "SELECT g FROM generate_series(1, 50000) g", batch_rows=100, credit=1)
    await c.recv_type("data", "gone")
    await c.close()
    # The record is written when the query has stopped; wait for it through the stream itself.
    w = await live.ws("admin")
    await w.ready()
    await w.send(
        {"type": "subscribe", "channel": "audit", "id": "a", "tail": 50, "filters": {"user": "admin"}}
    )
    recs = await w.audit_until("a", lambda r: r["id"] == sub["request_id"])
    rec = recs[-1]
    assert rec["sqlstate"] == "57014" and rec["rows"] == 100 and "disconnected" in rec["error"]
    await w.close()


async def test_session_state_never_reaches_the_next_user(live: LiveProxy) -> None:
    """A statement that leaves state on the server session (a session-level SET, set_config, a
    WITH HOLD cursor) runs on a pooled connection: that connection is closed afterwards, never
    handed to the next request, whose user would inherit the state."""
    c = await live.ws("admin")
    await c.ready()
    for i, sql in enumerate(
        (
            "SET work_mem = '77MB'",
            "SELECT set_config('lock_timeout', '7s', false)",
            "DECLARE leak CURSOR WITH HOLD FOR SELECT 42",
        )
    ):
        await _query(c, f"s{i}", sql)
        await c.recv_type("complete", f"s{i}")
    await c.close()
    pool = live.runtime.upstreams["demo"].pool
    assert pool is not None
    await assert_pool_holds_no_leaked_state(pool)
