"""Bulk CSV over HTTP: streamed import into a table and streamed export of a query, through the
pipeline (policy, masks, row filters, audit), on the real proxy app and PostgreSQL."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

import pytest_asyncio

from tests.fix_proxy import ProxyHarness, assert_pool_holds_no_leaked_state

T = "order_copy_http"


@pytest_asyncio.fixture(loop_scope="session")
async def table(proxy: ProxyHarness) -> AsyncIterator[None]:
    r = await proxy.query(
        "admin",
        f"DROP TABLE IF EXISTS {T}; CREATE TABLE {T} (id int PRIMARY KEY, note text NOT NULL,"
        " amount numeric(10,2) CHECK (amount >= 0))",
    )
    assert r.status_code == 200, r.text
    yield
    await proxy.query("admin", f"DROP TABLE IF EXISTS {T}")


async def _record(proxy: ProxyHarness, request_id: str) -> dict[str, object]:
    rt = proxy.runtime
    await rt.audit.flush()
    assert rt.audit.store is not None
    recs = [r for r in await rt.audit.store.query(limit=100_000) if r.id == request_id]
    assert len(recs) == 1
    return recs[0].to_dict()


async def test_export_masked_and_filtered(proxy: ProxyHarness, demo_dsn: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(demo_dsn) as direct:
        cur = await direct.execute("SELECT id, email FROM customers WHERE region = 'eu' ORDER BY id")
        eu: dict[int, str] = {int(i): str(e) for i, e in await cur.fetchall()}
    r = await proxy.client.post(
        "/api/v1/export",
        json={"sql": "SELECT id, email FROM customers ORDER BY id"},
        headers=proxy.auth("analyst"),
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["id", "email"]
    assert {int(i) for i, _ in rows[1:]} == set(eu)
    assert all("***" in e and e != eu[int(i)] for i, e in rows[1:])
    rec = await _record(proxy, r.headers["x-request-id"])
    copy = rec["extra"]["copy"]  # type: ignore[index]
    assert copy["direction"] == "out" and copy["rows"] == len(eu) and copy["bytes"] == len(r.content)
    assert rec["decision"] == "allow" and "analyst-mask-contact" in str(rec["rule"])


async def test_export_denied_and_smuggling_refused(proxy: ProxyHarness) -> None:
    r = await proxy.client.post(
        "/api/v1/export", json={"sql": "SELECT name FROM employees"}, headers=proxy.auth("analyst")
    )
    assert r.status_code == 403 and "analyst-no-employees" in r.text
    before = (await proxy.query("developer", "SELECT count(*) AS n FROM orders")).json()
    # A second statement smuggled through the wrapping COPY ( ... ) is refused before anything runs.
    r = await proxy.client.post(
        "/api/v1/export",
        json={"sql": "SELECT 1) TO STDOUT; DELETE FROM orders; COPY (SELECT 1"},
        headers=proxy.auth("developer"),
    )
    assert r.status_code == 400, r.text
    after = (await proxy.query("developer", "SELECT count(*) AS n FROM orders")).json()
    assert before["results"][0]["rows"] == after["results"][0]["rows"]


async def _csv_stream(lo: int, hi: int, bad: int | None = None) -> AsyncIterator[bytes]:
    yield b"id,note,amount\n"
    for start in range(lo, hi, 5000):
        yield "".join(
            f"{i},n{i},{-1 if i == bad else 1}\n" for i in range(start, min(start + 5000, hi))
        ).encode()


async def test_import_streamed(proxy: ProxyHarness, table: None) -> None:
    r = await proxy.client.post(
        f"/api/v1/import/{T}?columns=id,note,amount",
        content=_csv_stream(1, 100_001),
        headers={**proxy.auth("developer"), "content-type": "text/csv"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == 100_000
    n = (await proxy.query("developer", f"SELECT count(*) AS n FROM {T}")).json()
    assert n["results"][0]["rows"] == [[100_000]]
    rec = await _record(proxy, r.json()["id"])
    copy = rec["extra"]["copy"]  # type: ignore[index]
    assert copy["direction"] == "in" and copy["rows"] == 100_000 and copy["bytes"] > 100_000
    assert rec["relations"] == [
        {"table": f"public.{T}", "access": "insert", "columns": ["amount", "id", "note"]}
    ]


async def test_import_denied_and_failing_midway(proxy: ProxyHarness, table: None) -> None:
    r = await proxy.client.post(
        "/api/v1/import/orders?columns=customer_id,total",
        content=b"customer_id,total\n1,5\n",
        headers=proxy.auth("analyst"),
    )
    assert r.status_code == 403 and r.json()["error"]["sqlstate"] == "42501"
    r = await proxy.client.post(
        f"/api/v1/import/{T}?columns=id,note,amount",
        content=_csv_stream(200_001, 230_001, bad=215_000),
        headers=proxy.auth("developer"),
    )
    assert r.status_code == 400 and r.json()["error"]["sqlstate"] == "23514", r.text
    n = (await proxy.query("developer", f"SELECT count(*) AS n FROM {T} WHERE id > 200000")).json()
    assert n["results"][0]["rows"] == [[0]]
    rec = await _record(proxy, r.json()["id"])
    assert rec["extra"]["copy"]["error"]["sqlstate"] == "23514"  # type: ignore[index]


async def test_no_session_state_reaches_the_next_request(proxy: ProxyHarness) -> None:
    """A request whose statements leave state on the server session (a session-level SET, a
    set_config, a WITH HOLD cursor), by /api/v1/query or inside an export's query, runs on a
    pooled connection that is closed afterwards: no later request, of any user, inherits it."""
    r = await proxy.query("admin", "SET work_mem = '77MB'")
    assert r.status_code == 200, r.text
    r = await proxy.query("admin", "DECLARE leak CURSOR WITH HOLD FOR SELECT 42")
    assert r.status_code == 200, r.text
    r = await proxy.client.post(
        "/api/v1/export",
        json={"sql": "SELECT set_config('lock_timeout', '7s', false)"},
        headers=proxy.auth("admin"),
    )
    assert r.status_code == 200, r.text
    assert "7s" in r.text
    pool = proxy.runtime.upstreams["demo"].pool
    assert pool is not None
    await assert_pool_holds_no_leaked_state(pool)
