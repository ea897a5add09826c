"""A policy reload reaches statements a client prepared before it: a named statement kept by the
client (asyncpg's and JDBC's statement caches, psycopg's prepared statements) is decided again at
its next Bind, so a revoked table is refused and a new mask applies, without the client preparing
anything again."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import psycopg
import pytest

from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireFactory

BLOCK_ORDERS = """
[[policies]]
name = "analyst-orders-revoked"
roles = ["analyst"]
schema = "public"
table = "orders"
action = "block"
"""


def mask_orders_column(column: str) -> str:
    """A rule masking orders.<column> for the analyst role (redacted: text, whatever the type)."""
    return f"""
[[policies]]
name = "analyst-mask-{column}"
roles = ["analyst"]
schema = "public"
table = "orders"
columns = ["{column}"]
action = "mask"
mask = "redact"
"""


async def test_a_reload_reaches_statements_prepared_before_it(
    wire_factory: WireFactory, proxy: ProxyHarness
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=2)
    text = proxy.config_path.read_text()
    query = "SELECT id, status FROM orders WHERE id = %s"
    try:
        async with await psycopg.AsyncConnection.connect(
            h.dsn("analyst"), autocommit=True, prepare_threshold=0
        ) as conn:
            cur = await conn.execute(query, (1,))
            (_, status) = await cur.fetchone() or (None, None)
            assert status is not None and "*" not in status
            # A new mask: the same prepared statement now returns the masked value.
            proxy.config_path.write_text(text + mask_orders_column("status"))
            proxy.runtime.reload()
            cur = await conn.execute(query, (1,))
            row = await cur.fetchone()
            assert row is not None and row[0] == 1 and row[1] != status, row
            # Revoked: refused with the new rule, statement after statement.
            proxy.config_path.write_text(text + BLOCK_ORDERS)
            proxy.runtime.reload()
            for _ in range(2):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
                    await conn.execute(query, (1,))
                assert "analyst-orders-revoked" in str(ei.value)
            # Restored: the statement works again, unmasked.
            proxy.config_path.write_text(text)
            proxy.runtime.reload()
            cur = await conn.execute(query, (1,))
            assert await cur.fetchone() == (1, status)
    finally:
        proxy.config_path.write_text(text)
        proxy.runtime.reload()


async def test_a_mask_that_changes_the_result_type_makes_the_client_prepare_again(
    wire_factory: WireFactory, proxy: ProxyHarness
) -> None:
    """A mask is text: on a numeric column it changes the statement's result type, which a
    client holding the statement's row description (asyncpg) must learn. The proxy answers as
    PostgreSQL does after such a change (0A000, "cached plan must not change result type"), and
    asyncpg prepares the statement again by itself."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=2)
    text = proxy.config_path.read_text()
    conn = await asyncpg.connect(h.url("analyst"))
    try:
        query = "SELECT id, total FROM orders WHERE id = $1"
        row = await conn.fetchrow(query, 1)
        assert row is not None and isinstance(row["total"], Decimal)
        proxy.config_path.write_text(text + mask_orders_column("total"))
        proxy.runtime.reload()
        row = await conn.fetchrow(query, 1)  # asyncpg retries after 0A000, with the new type
        assert row is not None and row["total"] == "***"
        # A statement object the application holds sees the error itself, once.
        stmt = await conn.prepare("SELECT total FROM orders WHERE id = $1")
        assert await stmt.fetchval(2) == "***"
        proxy.config_path.write_text(text)
        proxy.runtime.reload()
        with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError):
            await stmt.fetchval(2)
        assert isinstance(await conn.fetchval("SELECT total FROM orders WHERE id = $1", 2), Decimal)
    finally:
        await conn.close()
        proxy.config_path.write_text(text)
        proxy.runtime.reload()


async def test_a_reload_reaches_the_identity_of_sessions_already_open(
    wire_factory: WireFactory, proxy: ProxyHarness
) -> None:
    """Roles and attributes are read at login; a reload that changes them applies to sessions
    already open from their next statement, and one that disables the user, or no longer allows
    them from this address, ends them."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=2)
    text = proxy.config_path.read_text()
    analyst = '[users.analyst]\nroles = ["analyst"]'
    assert analyst in text
    try:
        async with await psycopg.AsyncConnection.connect(h.dsn("analyst"), autocommit=True) as conn:
            cur = await conn.execute("SELECT DISTINCT region FROM customers")
            assert {r[0] for r in await cur.fetchall()} == {"eu"}  # the analyst role's row filter
            # Now a developer: no region filter (and the developer's hashed e-mail).
            proxy.config_path.write_text(text.replace(analyst, '[users.analyst]\nroles = ["developer"]'))
            proxy.runtime.reload()
            cur = await conn.execute("SELECT DISTINCT region FROM customers")
            assert len({r[0] for r in await cur.fetchall()}) > 1
            # Disabled: the session ends at its next statement.
            proxy.config_path.write_text(text.replace(analyst, analyst + "\ndisabled = true"))
            proxy.runtime.reload()
            with pytest.raises(psycopg.OperationalError, match="may no longer connect"):
                await conn.execute("SELECT 1")
            assert conn.closed or conn.broken
        # No longer allowed from this address: the same.
        proxy.config_path.write_text(text)
        proxy.runtime.reload()
        async with await psycopg.AsyncConnection.connect(h.dsn("analyst"), autocommit=True) as conn:
            await conn.execute("SELECT 1")
            proxy.config_path.write_text(text.replace(analyst, analyst + '\nallowed_cidrs = ["10.9.9.0/24"]'))
            proxy.runtime.reload()
            with pytest.raises(psycopg.OperationalError, match="may no longer connect"):
                await conn.execute("SELECT 1")
        # Each ending is audited, with the user and the reason.
        await proxy.runtime.audit.flush()
        store = proxy.runtime.audit.store
        assert store is not None
        ended = [r for r in await store.query(user="analyst", limit=20) if r.sqlstate == "57P01"]
        assert len(ended) == 2
        assert all(
            r.decision == "unauthenticated" and "may no longer connect" in (r.error or "") for r in ended
        )
    finally:
        proxy.config_path.write_text(text)
        proxy.runtime.reload()
