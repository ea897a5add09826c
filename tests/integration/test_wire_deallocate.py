"""Prepared statements going away in transaction pool mode: SQL ``DEALLOCATE ALL`` (and the
``DEALLOCATE ALL`` inside ``DISCARD ALL``) drop the statements the proxy prepared on that server
connection under its shared names, and ``DEALLOCATE name`` of a statement the client prepared with
a Parse message (what PHP's PDO sends) must work although the server knows the statement under
another name."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg import pq

from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireFactory

QUERY = "SELECT id FROM orders WHERE id = %s"


async def test_deallocate_all_leaves_no_stale_statement(wire_factory: WireFactory) -> None:
    # One server connection: every client's statements share it.
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    async with (
        await psycopg.AsyncConnection.connect(h.dsn("analyst"), autocommit=True, prepare_threshold=0) as a,
        await psycopg.AsyncConnection.connect(h.dsn("analyst"), autocommit=True, prepare_threshold=0) as b,
    ):
        for conn in (a, b):
            cur = await conn.execute(QUERY, (1,))
            assert await cur.fetchone() == (1,)
        # a drops every prepared statement of the server session, b's included (they share it).
        await a.execute("DEALLOCATE ALL", prepare=False)
        for conn in (b, a, b):
            cur = await conn.execute(QUERY, (2,))
            assert await cur.fetchone() == (2,)
        # In the extended protocol too.
        await b.execute("DEALLOCATE ALL", prepare=True)
        for conn in (a, b):
            cur = await conn.execute(QUERY, (3,))
            assert await cur.fetchone() == (3,)


def _pdo_like_session(dsn: str) -> None:
    """libpq calls, blocking: run in a thread (the proxy answers on the test's event loop)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pg = conn.pgconn
        assert pg.prepare(b"pdo_stmt_00000001", b"SELECT $1::int + 1").status == pq.ExecStatus.COMMAND_OK
        assert pg.exec_prepared(b"pdo_stmt_00000001", [b"41"]).get_value(0, 0) == b"42"
        done = pg.exec_(b"DEALLOCATE pdo_stmt_00000001")
        assert (done.status, done.command_status) == (pq.ExecStatus.COMMAND_OK, b"DEALLOCATE")
        gone = pg.exec_prepared(b"pdo_stmt_00000001", [b"41"])
        assert gone.status == pq.ExecStatus.FATAL_ERROR
        assert gone.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"
        # The name is free again, and a name the session never prepared is the server's error.
        assert pg.prepare(b"pdo_stmt_00000001", b"SELECT 7").status == pq.ExecStatus.COMMAND_OK
        unknown = pg.exec_(b"DEALLOCATE pdo_stmt_99")
        assert unknown.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"
        # Inside a transaction it is answered too; in a failed one the server refuses it.
        assert pg.exec_(b"BEGIN").status == pq.ExecStatus.COMMAND_OK
        assert pg.exec_(b"DEALLOCATE pdo_stmt_00000001").status == pq.ExecStatus.COMMAND_OK
        assert pg.exec_(b"SELECT 1/0").status == pq.ExecStatus.FATAL_ERROR
        refused = pg.exec_(b"DEALLOCATE pdo_stmt_00000001")
        assert refused.error_field(pq.DiagnosticField.SQLSTATE) == b"25P02"
        assert pg.exec_(b"ROLLBACK").status == pq.ExecStatus.COMMAND_OK
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.prepare(b"s1", b"SELECT 1")
        assert pg.exec_(b"DEALLOCATE s1").status == pq.ExecStatus.COMMAND_OK


async def test_deallocate_by_name_of_a_protocol_level_statement(
    wire_factory: WireFactory, proxy: ProxyHarness
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=2)
    await asyncio.to_thread(_pdo_like_session, h.dsn("developer"))
    # Audited as any statement.
    await proxy.runtime.audit.flush()
    store = proxy.runtime.audit.store
    assert store is not None
    recs = await store.query(user="developer", limit=10)
    dealloc = [r for r in recs if r.sql == "DEALLOCATE s1"]
    assert len(dealloc) == 1 and dealloc[0].decision == "allow"
    assert dealloc[0].statement_kinds == ["deallocate"]
