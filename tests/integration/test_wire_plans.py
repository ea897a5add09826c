"""Statement plans (sqlproxy.pipeline.shortcut) on the wire door: statements of a shape already
decided skip analysis and policy, and still leave the same audit record, spend their rate-limit
token, and follow a reload, a new catalog snapshot, another user or another search_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from sqlproxy.audit.record import AuditRecord
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app
from sqlproxy.wire.listener import WireServer

# Fields that differ between two executions of one shape by nature.
_PER_STATEMENT = {"id", "ts", "seq", "prev_hash", "hash", "duration_ms", "sql", "source"}


@dataclass
class Planned:
    runtime: Runtime
    server: WireServer
    config_path: Path
    passwords: dict[str, str]

    def dsn(self, user: str) -> str:
        return (
            f"host=127.0.0.1 port={self.server.bound_port} dbname=demo user={user} "
            f"password={self.passwords[user]} sslmode=disable"
        )

    async def records(self, user: str, n: int) -> list[AuditRecord]:
        await self.runtime.audit.flush()
        recs = await self.runtime.audit.store.query(user=user, limit=n)
        return sorted(recs, key=lambda r: r.seq)


@pytest_asyncio.fixture(loop_scope="session")
async def planned(
    demo_dsn: str, tmp_path: Path, demo_keys: dict[str, str], demo_passwords: dict[str, str]
) -> AsyncIterator[Planned]:
    path = write_demo_config(tmp_path, demo_dsn, 8080, demo_keys, demo_passwords)
    holder = ConfigHolder(load_config(path), path)
    app = build_app(holder, env={})
    runtime: Runtime = app.state.runtime
    await runtime.start()
    server = WireServer(runtime, host="127.0.0.1", port=0, config=runtime.config.current.wire)
    await server.start()
    try:
        yield Planned(runtime, server, path, demo_passwords)
    finally:
        await server.stop(grace_s=1)
        await runtime.close()


def _shape_fields(r: AuditRecord) -> dict[str, object]:
    return {k: v for k, v in r.to_dict().items() if k not in _PER_STATEMENT}


async def test_a_shape_is_decided_once_and_audited_alike(planned: Planned) -> None:
    p = planned
    plans = p.runtime.plans
    async with await psycopg.AsyncConnection.connect(p.dsn("developer"), autocommit=True) as conn:
        before = plans.hits
        for i in range(1, 4):
            # Simple protocol, a new literal each time: what pgbench -S sends.
            cur = await conn.execute(f"SELECT id, status FROM orders WHERE id = {i}", prepare=False)
            assert len(await cur.fetchall()) == 1
        assert plans.hits - before == 2  # the first one learnt the plan
    recs = await p.records("developer", 3)
    assert [r.sql for r in recs] == [f"SELECT id, status FROM orders WHERE id = {i}" for i in (1, 2, 3)]
    first, *planned_recs = recs
    assert first.decision == "allow" and first.rule and first.rows == 1
    for r in planned_recs:
        assert _shape_fields(r) == _shape_fields(first)
        assert r.sql != first.sql and r.rows == 1


async def test_lineage_classification_and_masked_statements(planned: Planned) -> None:
    """Classification comes with the plan; a masked statement's plan rewrites every execution
    with its own constants, so the mask holds on each."""
    p = planned
    plans = p.runtime.plans
    async with await psycopg.AsyncConnection.connect(p.dsn("developer"), autocommit=True) as conn:
        before = plans.hits
        emails = []
        for i in (1, 2, 3):
            cur = await conn.execute(f"SELECT id, email FROM customers WHERE id = {i}", prepare=False)
            row = await cur.fetchone()
            assert row is not None and row[0] == i  # each statement's own constant
            emails.append(row[1])
        assert plans.hits - before == 2  # developer's customers.email is hashed
        assert all(e and "@" not in e for e in emails) and len(set(emails)) == 3, emails
    recs = await p.records("developer", 3)
    assert all(r.extra.get("rewritten") for r in recs)
    assert all(r.classifications == {"email": ["PII.Email"]} for r in recs)
    assert [r.sql for r in recs] == [f"SELECT id, email FROM customers WHERE id = {i}" for i in (1, 2, 3)]


async def test_extended_protocol_records_carry_the_same_classification(planned: Planned) -> None:
    """A statement with parameters (the extended protocol: psycopg with arguments, asyncpg,
    JDBC) is classified by lineage once, at Parse, and each Execute's record carries it, as a
    simple-protocol record of the same query does."""
    p = planned
    sql = "SELECT id, email AS contact FROM customers WHERE id = $1"
    async with await psycopg.AsyncConnection.connect(p.dsn("developer"), autocommit=True) as conn:
        for i in (1, 2):
            cur = await conn.execute(sql.replace("$1", "%s"), (i,))
            assert (await cur.fetchone()) is not None
            # The client says nothing more for now: its Execute's record is written all the same.
            so_far = await p.records("developer", 10)
            assert [(r.sql, r.extra.get("protocol")) for r in so_far] == [(sql, "extended")] * i
        cur = await conn.execute("SELECT id, email AS contact FROM customers WHERE id = 3", prepare=False)
        assert (await cur.fetchone()) is not None
    # In the order they ran: an Execute's record is queued when it completes, not when the
    # client sends its next message.
    *extended, simple = await p.records("developer", 3)
    assert [r.extra.get("protocol") for r in extended] == ["extended", "extended"]
    assert simple.extra.get("protocol") != "extended"
    for r in (*extended, simple):
        assert r.classifications == {"contact": ["PII.Email"]}, r


async def test_row_filter_holds_on_planned_statements(planned: Planned) -> None:
    """The analyst sees customers of region "eu" only (demo row filter): planned statements of one shape
    keep the filter, each with its own constant."""
    p = planned
    async with await psycopg.AsyncConnection.connect(p.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT id, region FROM customers ORDER BY id")
        regions: dict[int, str] = dict(await cur.fetchall())
    plans = p.runtime.plans
    async with await psycopg.AsyncConnection.connect(p.dsn("analyst"), autocommit=True) as conn:
        before = plans.hits
        seen = {}
        for i in sorted(regions)[:6]:
            cur = await conn.execute(f"SELECT id FROM customers WHERE id = {i}", prepare=False)
            seen[i] = await cur.fetchall()
        assert plans.hits - before == 5
    for i, rows in seen.items():
        assert rows == ([(i,)] if regions[i] == "eu" else []), (i, regions[i], rows)
    assert any(regions[i] == "eu" for i in seen) and any(regions[i] != "eu" for i in seen)
    async with await psycopg.AsyncConnection.connect(p.dsn("admin"), autocommit=True) as conn:
        before = plans.hits
        for i in (1, 2, 3):
            await conn.execute(f"SELECT email FROM customers WHERE id = {i}", prepare=False)
        assert plans.hits - before == 2
    recs = await p.records("admin", 3)
    assert [r.classifications for r in recs] == [{"email": ["PII.Email"]}] * 3


async def test_a_plan_is_per_user(planned: Planned) -> None:
    """The admin's plan for a shape is not the analyst's: the analyst is denied employees."""
    p = planned
    async with await psycopg.AsyncConnection.connect(p.dsn("admin"), autocommit=True) as conn:
        for i in (1, 2):
            await conn.execute(f"SELECT id FROM employees WHERE id = {i}", prepare=False)
    async with await psycopg.AsyncConnection.connect(p.dsn("analyst"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("SELECT id FROM employees WHERE id = 3", prepare=False)
    recs = await p.records("analyst", 1)
    assert recs[-1].decision == "deny"


async def test_a_reload_retires_every_plan(planned: Planned) -> None:
    p = planned
    async with await psycopg.AsyncConnection.connect(p.dsn("auditor"), autocommit=True) as conn:
        for i in (1, 2):
            await conn.execute(f"SELECT id FROM orders WHERE id = {i}", prepare=False)
        hits = p.runtime.plans.hits
        # The auditor loses orders: the next statement of the same shape is decided again.
        text = p.config_path.read_text()
        start = text.index('name = "auditor-orders"')
        rest = text[start:].replace('action = "allow"', 'action = "block"', 1)
        p.config_path.write_text(text[:start] + rest)
        p.runtime.reload()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("SELECT id FROM orders WHERE id = 3", prepare=False)
        assert p.runtime.plans.hits == hits
        # Plans made under the old configuration are dropped when the next one is learnt.
        await conn.execute("SELECT 1 AS one", prepare=False)
        plans = list(p.runtime.plans._plans.values())
        assert plans and all(pl.holds[1] is p.runtime.config.current for pl in plans)
        p.config_path.write_text(text)
        p.runtime.reload()


async def test_ddl_and_search_path_change_the_plan(planned: Planned) -> None:
    """A table created in another schema and put first on the search_path: the same text now
    means another table, and is analysed (and decided) again."""
    p = planned
    async with await psycopg.AsyncConnection.connect(p.dsn("admin"), autocommit=True) as conn:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS plans_shadow")
        await conn.execute("CREATE TABLE IF NOT EXISTS plans_shadow.orders (id int, note text)")
        await conn.execute("INSERT INTO plans_shadow.orders VALUES (1, 'shadow')")
        for i in (1, 2):
            cur = await conn.execute(f"SELECT * FROM orders WHERE id = {i}", prepare=False)
            assert cur.description is not None and "note" not in [c.name for c in cur.description]
        await conn.execute("SET search_path = plans_shadow, public")
        cur = await conn.execute("SELECT * FROM orders WHERE id = 1", prepare=False)
        assert cur.description is not None and [c.name for c in cur.description] == ["id", "note"]
        assert await cur.fetchall() == [(1, "shadow")]
        await conn.execute("DROP SCHEMA plans_shadow CASCADE")
    recs = await p.records("admin", 20)
    selects = [r for r in recs if r.sql == "SELECT * FROM orders WHERE id = 1"]
    last = selects[-1]  # the one after SET search_path
    assert last.relations == [{"access": "read", "columns": ["id", "note"], "table": "plans_shadow.orders"}]


async def test_planned_statements_spend_rate_limit_tokens(planned: Planned) -> None:
    p = planned
    text = p.config_path.read_text()
    p.config_path.write_text(text + "\n[rate_limits.users.auditor]\nrate = 0.001\nburst = 3\n")
    p.runtime.reload()
    try:
        async with await psycopg.AsyncConnection.connect(p.dsn("auditor"), autocommit=True) as conn:
            before = p.runtime.plans.hits
            for i in (1, 2, 3):
                await conn.execute(f"SELECT id FROM orders WHERE id = {i}", prepare=False)
            assert p.runtime.plans.hits - before == 2
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
                await conn.execute("SELECT id FROM orders WHERE id = 4", prepare=False)
            assert p.runtime.plans.hits - before == 3  # refused on the planned path, audited
        recs = await p.records("auditor", 1)
        assert recs[-1].decision == "rate_limited" and recs[-1].sql == "SELECT id FROM orders WHERE id = 4"
    finally:
        p.config_path.write_text(text)
        p.runtime.reload()


async def test_transaction_control_gets_plans_only_without_literals(planned: Planned) -> None:
    """BEGIN/COMMIT/SAVEPOINT of one exact text are decided once (TPC-B sends BEGIN and END
    around every transaction); a plan stands for its exact text, so PREPARE TRANSACTION with
    another gid is decided again."""
    p = planned
    plans = p.runtime.plans
    async with await psycopg.AsyncConnection.connect(p.dsn("developer"), autocommit=True) as conn:
        before = plans.hits
        for i in (1, 2, 3):
            await conn.execute("BEGIN", prepare=False)
            assert conn.info.transaction_status.name == "INTRANS"
            await conn.execute("SAVEPOINT sp", prepare=False)
            await conn.execute(f"SELECT id FROM orders WHERE id = {i}", prepare=False)
            await conn.execute("ROLLBACK TO SAVEPOINT sp", prepare=False)
            await conn.execute("COMMIT", prepare=False)
            assert conn.info.transaction_status.name == "IDLE"
        # The first round learnt five plans; the next two used them for all five statements.
        assert plans.hits - before == 10
        begins = [r for r in await p.records("developer", 15) if r.sql == "BEGIN"]
        assert len(begins) == 3 and all(_shape_fields(r) == _shape_fields(begins[0]) for r in begins)
        assert begins[0].decision == "allow" and begins[0].statement_kinds == ["transaction"]
        before = plans.hits
        for gid in ("plans-a", "plans-b"):
            await conn.execute("BEGIN", prepare=False)
            await conn.execute(f"PREPARE TRANSACTION '{gid}'", prepare=False)
            await conn.execute(f"ROLLBACK PREPARED '{gid}'", prepare=False)
        # Only the two BEGINs used plans: each gid's statements went through the pipeline.
        assert plans.hits - before == 2
    recs = await p.records("developer", 6)
    assert [r.sql for r in recs][-2:] == ["PREPARE TRANSACTION 'plans-b'", "ROLLBACK PREPARED 'plans-b'"]
    assert all(r.decision == "allow" for r in recs)
