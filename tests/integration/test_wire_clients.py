"""Real clients through the wire door: psql, psycopg 3 (sync, async, prepared, binary,
pipeline), asyncpg (prepared, binary codecs, transactions, cursors), SQLAlchemy, pgbench."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.fix_wire import WireHarness, run_pgbench_script, run_psql


async def test_psql_script_masks_filters_and_denies(wire: WireHarness) -> None:
    script = (
        "SELECT id, email FROM customers ORDER BY id LIMIT 2;\n"
        "SELECT name, salary FROM employees;\n"
        "BEGIN;\nSELECT count(*) AS n FROM orders;\nCOMMIT;\n"
    )
    code, out, err = await run_psql(wire, script)
    assert code == 0
    assert "c***@mail.example.com" in out  # masked, and only EU rows (row filter)
    assert "analyst-no-employees" in err and "permission denied" in err
    assert " n " in out


def _tx_status(conn: psycopg.AsyncConnection[Any]) -> psycopg.pq.TransactionStatus:
    return conn.info.transaction_status


async def test_psycopg_async_denial_sqlstate_and_status(wire: WireHarness) -> None:
    async with await psycopg.AsyncConnection.connect(wire.dsn("analyst")) as conn:
        cur = await conn.execute("SELECT id, region FROM customers ORDER BY id")
        rows = await cur.fetchall()
        assert rows and {r[1] for r in rows} == {"eu"}
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            await conn.execute("SELECT name, salary FROM employees")
        assert "analyst-no-employees" in str(ei.value)
        assert _tx_status(conn) == psycopg.pq.TransactionStatus.INERROR
        await conn.rollback()
        assert _tx_status(conn) == psycopg.pq.TransactionStatus.IDLE


async def test_psycopg_autocommit_denial_leaves_idle(wire: WireHarness) -> None:
    async with await psycopg.AsyncConnection.connect(wire.dsn("analyst"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("SELECT 1; SELECT name FROM employees")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        cur = await conn.execute("SELECT current_setting('sqlproxy.user')")
        assert (await cur.fetchone()) == ("analyst",)


async def test_psycopg_prepared_binary_and_pipeline(wire: WireHarness) -> None:
    async with await psycopg.AsyncConnection.connect(
        wire.dsn("developer"), autocommit=True, prepare_threshold=0
    ) as conn:
        for i in (1, 2, 3):
            cur = await conn.execute("SELECT id, total FROM orders WHERE id = %s", (i,), binary=True)
            row = await cur.fetchone()
            assert row is not None and row[0] == i
        cur = await conn.execute("SELECT email FROM customers WHERE id = %s", (1,))
        (email,) = (await cur.fetchone()) or ("",)
        assert "@" not in email  # hashed for the developer
        async with conn.pipeline():
            c1 = await conn.execute("SELECT %s::int + 1", (41,))
            c2 = await conn.execute("SELECT %s::text", ("x",), binary=True)
            c3 = await conn.execute("SELECT count(*) FROM orders")
        assert (await c1.fetchone()) == (42,)
        assert (await c2.fetchone()) == ("x",)
        assert (await c3.fetchone()) is not None
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("SELECT salary FROM employees WHERE id = %s", (1,))
        cur = await conn.execute("SELECT %s::int", (7,))
        assert (await cur.fetchone()) == (7,)


def _sync_psycopg(dsn: str) -> list[tuple[int]]:
    with psycopg.connect(dsn, prepare_threshold=0) as conn:
        out = []
        for i in range(5):
            out.append(conn.execute("SELECT %s::int", (i,)).fetchone())
        conn.rollback()
        return out  # type: ignore[return-value]


async def test_psycopg_sync_in_thread(wire: WireHarness) -> None:
    rows = await asyncio.to_thread(_sync_psycopg, wire.dsn("admin"))
    assert rows == [(i,) for i in range(5)]


async def test_asyncpg_prepared_transactions_cursors(wire: WireHarness) -> None:
    conn = await asyncpg.connect(wire.url("admin"))
    try:
        stmt = await conn.prepare("SELECT id, total FROM orders WHERE id = $1")
        r = await stmt.fetchrow(1)
        assert r is not None and r["id"] == 1
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE t_wire (a int, b numeric, c timestamptz)")
            await conn.executemany(
                "INSERT INTO t_wire VALUES ($1, $2, now())", [(i, i * 1.5) for i in range(50)]
            )
            n = 0
            async for rec in conn.cursor("SELECT a, b FROM t_wire ORDER BY a", prefetch=7):
                n += 1
                assert float(rec["b"]) == rec["a"] * 1.5
            assert n == 50
        with pytest.raises(asyncpg.exceptions.UniqueViolationError):
            await conn.execute(
                "INSERT INTO orders (id, customer_id, total) "
                "SELECT id, customer_id, total FROM orders LIMIT 1"
            )
        # Binary codecs both ways.
        vals = await conn.fetch(
            "SELECT $1::int8 AS a, $2::numeric AS n, $3::bytea AS b, $4::timestamptz AS t",
            2**40,
            1.25,
            b"\x00\x01",
            datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        )
        assert vals[0]["a"] == 2**40 and vals[0]["b"] == b"\x00\x01" and float(vals[0]["n"]) == 1.25
        assert vals[0]["t"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    finally:
        await conn.close()


async def test_asyncpg_types_it_must_introspect(wire: WireHarness) -> None:
    """asyncpg looks up types it has no codec for (int[], numeric[], enums, domains) with its own
    queries, turning jit off around them with set_config('jit', ...): decided as SET, which the
    demo lets everyone run, so an analyst's array parameter works; set_config of the role does not."""
    conn = await asyncpg.connect(wire.url("analyst"))
    try:
        assert await conn.fetchval("SELECT $1::int[]", [1, 2, 3]) == [1, 2, 3]
        nums = await conn.fetchval("SELECT $1::numeric[]", [1, 2.5])
        assert [float(n) for n in nums] == [1.0, 2.5]
        rows = await conn.fetch("SELECT id FROM customers WHERE id = ANY($1::int[]) ORDER BY id", [1, 2, 3])
        assert all(r["id"] in (1, 2, 3) for r in rows)
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.fetchval("SELECT set_config('role', 'postgres', false)")
        assert await conn.fetchval("SELECT current_setting('sqlproxy.user')") == "analyst"
    finally:
        await conn.close()


async def test_asyncpg_denied_prepare(wire: WireHarness) -> None:
    conn = await asyncpg.connect(wire.url("analyst"))
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as ei:
            await conn.fetch("SELECT salary FROM employees WHERE id = $1", 1)
        assert "analyst-no-employees" in str(ei.value)
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
    finally:
        await conn.close()


async def test_session_mode_listen_notify(wire_session: WireHarness) -> None:
    conn = await asyncpg.connect(wire_session.url("admin"))
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    try:

        def on_notify(*a: Any) -> None:
            if not got.done():
                got.set_result(a[3])

        await conn.add_listener("wire_chan", on_notify)
        other = await asyncpg.connect(wire_session.url("admin"))
        try:
            await other.execute("NOTIFY wire_chan, 'hello'")
        finally:
            await other.close()
        assert await asyncio.wait_for(got, 10) == "hello"
    finally:
        await conn.close()


async def test_transaction_mode_prepared_across_server_connections(wire: WireHarness) -> None:
    # More clients than server connections: each client's named statements must follow it to
    # whichever server connection it gets.
    conns = [await asyncpg.connect(wire.url("admin"), statement_cache_size=10) for _ in range(8)]
    try:
        stmts = [await c.prepare("SELECT $1::int * 2") for c in conns]

        async def work(i: int) -> int:
            total = 0
            for k in range(20):
                total += await stmts[i].fetchval(k)
            return total

        results = await asyncio.gather(*(work(i) for i in range(8)))
        assert results == [sum(k * 2 for k in range(20))] * 8
    finally:
        for c in conns:
            await c.close()
    assert wire.backends_in_use() == 0


async def test_search_path_tracked_for_analysis(wire: WireHarness) -> None:
    async with await psycopg.AsyncConnection.connect(wire.dsn("admin"), autocommit=True) as conn:
        await conn.execute("SET search_path = pg_catalog")
        cur = await conn.execute("SHOW search_path")
        assert (await cur.fetchone()) == ("pg_catalog",)
        # Other clients take turns on the same server connections in between.
        others = [await psycopg.AsyncConnection.connect(wire.dsn("admin"), autocommit=True) for _ in range(5)]
        for o in others:
            cur = await o.execute("SHOW search_path")
            assert (await cur.fetchone()) != ("pg_catalog",)
            await o.close()
        cur = await conn.execute("SHOW search_path")
        assert (await cur.fetchone()) == ("pg_catalog",)


def _sqlalchemy(url: str) -> list[int]:
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        ids = [
            r[0] for r in conn.execute(sa.text("SELECT id FROM orders WHERE id <= :n ORDER BY id"), {"n": 3})
        ]
    engine.dispose()
    return ids


async def test_sqlalchemy(wire: WireHarness) -> None:
    assert await asyncio.to_thread(_sqlalchemy, wire.url("developer")) == [1, 2, 3]


async def test_pgbench_select_only_modes(wire: WireHarness, proxy) -> None:
    script = "\\set aid random(1, 10)\nSELECT id, total FROM orders WHERE id = :aid;\n"
    await run_pgbench_script(wire.env("admin"), script, clients=4, transactions=25)
    assert wire.backends_in_use() == 0


async def test_identity_setting_cannot_be_changed_by_the_client(wire: WireHarness) -> None:
    async with await psycopg.AsyncConnection.connect(wire.dsn("admin"), autocommit=True) as conn:
        for sql in ("""SET "sqlproxy.user" = 'auditor'""", 'RESET "sqlproxy.user"', "RESET ALL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(sql)
        cur = await conn.execute("SELECT current_setting('sqlproxy.user')")
        assert (await cur.fetchone()) == ("admin",)


async def test_login_needs_no_server_connection_once_the_parameters_are_known(
    wire_factory: Callable[..., Awaitable[WireHarness]],
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    first = await psycopg.AsyncConnection.connect(h.dsn("developer", application_name="first"))
    # The only server connection stays with this open transaction.
    await first.execute("SELECT 1")
    assert h.backends_in_use() == 1
    second = await asyncio.wait_for(
        psycopg.AsyncConnection.connect(h.dsn("developer", application_name="second"), autocommit=True), 30
    )
    try:
        for name in ("server_version", "DateStyle", "TimeZone", "integer_datetimes", "IntervalStyle"):
            assert second.info.parameter_status(name) == first.info.parameter_status(name)
        assert second.info.parameter_status("application_name") == "second"
        waiting = asyncio.ensure_future(second.execute("SELECT current_setting('application_name')"))
        await first.commit()
        cur = await asyncio.wait_for(waiting, 30)
        assert await cur.fetchone() == ("second",)
    finally:
        await second.close()
        await first.close()
    assert h.backends_in_use() == 0
