"""SQL cursors through the wire door, as psycopg's server-side (named) cursors use them (and Django's
``QuerySet.iterator()`` and SQLAlchemy's ``stream_results`` on top of it): ``DECLARE ... CURSOR
FOR <query>`` is decided, masked and filtered as its query would be, FETCH/MOVE/CLOSE step through
it, and a WITH HOLD cursor keeps its client on its server connection in transaction pool mode."""

from __future__ import annotations

import psycopg
import pytest

from sqlproxy.audit.record import AuditRecord
from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireFactory, WireHarness, run_psql


async def _records(proxy: ProxyHarness, user: str, n: int) -> list[AuditRecord]:
    await proxy.runtime.audit.flush()
    recs = await proxy.runtime.audit.store.query(user=user, limit=n)
    return sorted(recs, key=lambda r: r.seq)


async def test_named_cursor_is_masked_filtered_and_denied_like_its_query(
    wire_factory: WireFactory, proxy: ProxyHarness, demo_dsn: str
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=2)
    with psycopg.connect(demo_dsn) as direct:
        real = direct.execute("SELECT id, email FROM customers WHERE region = 'eu' ORDER BY id").fetchall()
        others = direct.execute("SELECT count(*) FROM customers WHERE region <> 'eu'").fetchone()
    assert len(real) > 3 and others is not None and others[0] > 0

    async with await psycopg.AsyncConnection.connect(h.dsn("analyst")) as conn:
        async with conn.cursor(name="cust") as cur:
            cur.itersize = 2
            await cur.execute("SELECT id, email, region FROM customers ORDER BY id")
            first = await cur.fetchmany(2)
            await cur.scroll(1)  # MOVE
            rest = await cur.fetchall()
        await conn.commit()
        rows = first + rest
        # Row filter: EU rows only (one skipped by the MOVE); mask: no real address comes back.
        assert [r[0] for r in rows] == [r[0] for r in real][:2] + [r[0] for r in real][3:]
        assert {r[2] for r in rows} == {"eu"}
        assert all("***" in r[1] for r in rows)
        assert not {r[1] for r in rows} & {r[1] for r in real}

        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            async with conn.cursor(name="emp") as cur:
                await cur.execute("SELECT name, salary FROM employees")
        assert "analyst-no-employees" in str(ei.value)
        await conn.rollback()

    recs = await _records(proxy, "analyst", 12)
    declares = [r for r in recs if (r.sql or "").startswith('DECLARE "cust"')]
    assert len(declares) == 1
    d = declares[0]
    assert d.decision == "allow" and d.statement_kinds == ["cursor"]
    # Classified by the lineage of the rows its FETCHes return.
    assert d.classifications.get("email") == ["PII.Email"]
    denied = [r for r in recs if (r.sql or "").startswith('DECLARE "emp"')]
    assert len(denied) == 1 and denied[0].decision == "deny" and denied[0].rule == "analyst-no-employees"
    fetches = [r for r in recs if (r.sql or "").startswith("FETCH")]
    assert fetches and all(f.decision == "allow" and f.statement_kinds == ["cursor"] for f in fetches)
    # The rows a FETCH returns are the cursor's: classified by its query's lineage.
    assert all(f.classifications.get("email") == ["PII.Email"] for f in fetches)


async def test_fetch_records_are_classified_in_the_simple_protocol_and_over_http(
    wire: WireHarness, proxy: ProxyHarness
) -> None:
    code, out, err = await run_psql(
        wire,
        "BEGIN;\nDECLARE psql_c CURSOR FOR SELECT id, email AS contact FROM customers;\n"
        "FETCH 2 FROM psql_c;\nMOVE 1 IN psql_c;\nCLOSE psql_c;\nCOMMIT;\n",
    )
    assert code == 0 and "***" in out, err
    recs = await _records(proxy, "analyst", 6)
    by_sql = {r.sql: r for r in recs}
    assert by_sql["FETCH 2 FROM psql_c;"].classifications == {"contact": ["PII.Email"]}
    assert by_sql["MOVE 1 IN psql_c;"].classifications == {}
    # Over HTTP a request is one transaction: DECLARE and FETCH in one string.
    r = await proxy.query(
        "analyst", "DECLARE h CURSOR FOR SELECT email AS contact FROM customers; FETCH 2 FROM h"
    )
    assert r.status_code == 200, r.text
    assert r.json()["classifications"]["contact"] == ["PII.Email"]


async def test_with_hold_cursor_pins_its_client_in_transaction_mode(
    wire_factory: WireFactory, demo_dsn: str
) -> None:
    """Django iterates querysets with WITH HOLD cursors in autocommit: each FETCH is a transaction
    of its own, so a pooler must keep the client on the connection holding the cursor while other
    clients take the other server connections."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=2)
    async with (
        await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as a,
        await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as b,
    ):
        cur = a.cursor(name="held", withhold=True)
        await cur.execute("SELECT id FROM orders ORDER BY id")
        got = await cur.fetchmany(2)
        # Another client takes a server connection for a transaction: never the cursor's.
        async with b.transaction():
            await b.execute("SELECT count(*) FROM orders")
            got += await cur.fetchmany(2)
        got += await cur.fetchall()
        await cur.close()
        with psycopg.connect(demo_dsn) as direct:
            expected = direct.execute("SELECT id FROM orders ORDER BY id").fetchall()
        assert got == expected
        assert h.backends_in_use() == 1  # a: pinned by its WITH HOLD cursor; b: back in the pool

    # A cursor without HOLD ends with its transaction, and pins nothing.
    async with await psycopg.AsyncConnection.connect(h.dsn("admin")) as c:
        async with c.cursor(name="plain") as cur:
            await cur.execute("SELECT id FROM orders ORDER BY id LIMIT 3")
            assert len(await cur.fetchall()) == 3
        await c.commit()
        assert h.backends_in_use() == 0


async def test_cursor_gate_can_block_cursors(wire_factory: WireFactory, proxy: ProxyHarness) -> None:
    """Cursors are their own statement kind: a gate naming "cursor" blocks them while plain
    SELECTs of the same table still run."""
    text = proxy.config_path.read_text()
    blocked = text + (
        '\n[[policies]]\nname = "no-cursors-for-developers"\nroles = ["developer"]\n'
        'statements = ["cursor"]\naction = "block"\n'
    )
    proxy.config_path.write_text(blocked)
    try:
        proxy.runtime.reload()
        h = await wire_factory(pool_mode="transaction", server_pool_size=2)
        async with await psycopg.AsyncConnection.connect(h.dsn("developer")) as conn:
            cur = await conn.execute("SELECT id FROM orders ORDER BY id LIMIT 1")
            assert await cur.fetchone() is not None
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
                async with conn.cursor(name="dev") as named:
                    await named.execute("SELECT id FROM orders")
            assert "no-cursors-for-developers" in str(ei.value)
    finally:
        proxy.config_path.write_text(text)
        proxy.runtime.reload()
