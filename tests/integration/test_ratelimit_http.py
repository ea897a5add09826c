"""Rate limiting through the real HTTP API on the demo configuration: 429 + Retry-After, the
audit record, the rate-limits endpoint, metrics and a reload that keeps the bucket state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest
import pytest_asyncio

from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app
from sqlproxy.wire.listener import WireServer

# The analyst may send 2 requests at once and then one every 1000 s: nothing refills during a test.
ANALYST_LIMIT = "\n[rate_limits.users.analyst]\nrate = 0.001\nburst = 2\n"


@dataclass
class Limited:
    runtime: Runtime
    client: httpx.AsyncClient
    keys: dict[str, str]
    config_path: Path
    passwords: dict[str, str]

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


@pytest_asyncio.fixture(loop_scope="session")
async def limited(
    demo_dsn: str, tmp_path: Path, demo_keys: dict[str, str], demo_passwords: dict[str, str]
) -> AsyncIterator[Limited]:
    path = write_demo_config(tmp_path, demo_dsn, 8080, demo_keys, demo_passwords)
    path.write_text(path.read_text() + ANALYST_LIMIT)
    holder = ConfigHolder(load_config(path), path)
    app = build_app(holder, env={})
    runtime: Runtime = app.state.runtime
    await runtime.start()
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    async with httpx.AsyncClient(transport=transport, base_url="http://sqlproxy.test") as client:
        yield Limited(runtime, client, demo_keys, path, demo_passwords)
    await runtime.close()


async def _query(p: Limited, user: str) -> httpx.Response:
    return await p.client.post("/api/v1/query", json={"sql": "SELECT 1 AS one"}, headers=p.auth(user))


async def test_over_the_limit_is_429_with_retry_after_and_is_audited(limited: Limited) -> None:
    p = limited
    for _ in range(2):
        r = await _query(p, "analyst")
        assert r.status_code == 200, r.text
    r = await _query(p, "analyst")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "rate_limited"
    assert err["sqlstate"] == "53400"
    assert err["rule"] == "rate-limit:user"
    assert "per-user limit for 'analyst'" in err["message"]
    assert err["retry_after"] > 0
    rejected_id = r.json()["id"]
    # Other users are not affected by the analyst's budget.
    assert (await _query(p, "developer")).status_code == 200

    # The rejection left an audit record saying so (the writer is asynchronous: poll briefly).
    deadline = time.monotonic() + 10
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        a = await p.client.get("/api/v1/audit", params={"decision": "rate_limited"}, headers=p.auth("admin"))
        assert a.status_code == 200
        records = [rec for rec in a.json()["records"] if rec["id"] == rejected_id]
        if records:
            break
    assert records, "no audit record for the rate-limited request"
    rec = records[0]
    assert rec["user"] == "analyst"
    assert rec["decision"] == "rate_limited"
    assert rec["sqlstate"] == "53400"
    assert rec["rule"] == "rate-limit:user"

    m = (await p.client.get("/metrics")).text
    assert 'sqlproxy_ratelimit_decisions_total{level="user",result="rejected"} 1.0' in m


async def test_rate_limits_endpoint_is_admin_only_and_shows_buckets(limited: Limited) -> None:
    p = limited
    await _query(p, "analyst")
    r = await p.client.get("/api/v1/rate-limits", headers=p.auth("analyst"))
    assert r.status_code == 403
    r = await p.client.get("/api/v1/rate-limits", headers=p.auth("admin"))
    assert r.status_code == 200
    body = r.json()
    assert body["enabled"] is True
    assert body["limits"]["users"]["analyst"] == {"rate": 0.001, "burst": 2.0}
    by_key = {b["key"]: b for b in body["buckets"]}
    assert by_key["user:analyst"]["local"]["tokens"] == pytest.approx(1, abs=0.01)
    assert "global" in by_key
    assert body["distributed"] == {"enabled": False}


async def test_reload_applies_new_limits_and_keeps_the_bucket(limited: Limited) -> None:
    p = limited
    for _ in range(2):
        assert (await _query(p, "analyst")).status_code == 200
    assert (await _query(p, "analyst")).status_code == 429
    # A larger burst does not refill the bucket: a reload is not a way around a limit.
    text = p.config_path.read_text().replace(ANALYST_LIMIT, ANALYST_LIMIT.replace("burst = 2", "burst = 5"))
    p.config_path.write_text(text)
    r = await p.client.post("/api/v1/admin/reload", headers=p.auth("admin"))
    assert r.status_code == 200, r.text
    assert (await _query(p, "analyst")).status_code == 429
    limits = (await p.client.get("/api/v1/rate-limits", headers=p.auth("admin"))).json()["limits"]
    assert limits["users"]["analyst"]["burst"] == 5
    # Removing the limit lifts it at once.
    p.config_path.write_text(text.replace(ANALYST_LIMIT.replace("burst = 2", "burst = 5"), ""))
    assert (await p.client.post("/api/v1/admin/reload", headers=p.auth("admin"))).status_code == 200
    assert (await _query(p, "analyst")).status_code == 200


async def test_wire_door_refuses_with_53400_naming_the_level_and_the_session_goes_on(
    limited: Limited,
) -> None:
    p = limited
    server = WireServer(p.runtime, host="127.0.0.1", port=0, config=p.runtime.config.current.wire)
    await server.start()
    try:
        dsn = (
            f"host=127.0.0.1 port={server.bound_port} dbname=demo user=analyst "
            f"password={p.passwords['analyst']} sslmode=disable"
        )
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for _ in range(2):
                assert await (await conn.execute("SELECT 1 AS one")).fetchone() == (1,)
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as ei:
                await conn.execute("SELECT 1 AS one")
            assert ei.value.sqlstate == "53400"
            assert "per-user limit for 'analyst'" in str(ei.value)
            # The refusal ends that statement only: the connection is idle and usable.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        await p.runtime.audit.flush()
        recs = await p.runtime.audit.store.query(user="analyst", decision="rate_limited", limit=10)
        assert any(r.door == "wire" and r.rule == "rate-limit:user" for r in recs)
    finally:
        await server.stop(grace_s=1)


async def test_wire_extended_protocol_executes_are_limited_too(limited: Limited) -> None:
    """A prepared statement is decided once at Parse; each Execute still spends a token, so the
    extended protocol is no way around a limit (asyncpg uses it for everything)."""
    p = limited
    server = WireServer(p.runtime, host="127.0.0.1", port=0, config=p.runtime.config.current.wire)
    await server.start()
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=server.bound_port,
            user="analyst",
            password=p.passwords["analyst"],
            database="demo",
            ssl=False,
        )
        try:
            stmt = await conn.prepare("SELECT $1::int AS one")
            for i in range(2):
                assert await stmt.fetchval(i) == i
            with pytest.raises(asyncpg.PostgresError) as ei:
                await stmt.fetchval(3)
            assert ei.value.sqlstate == "53400"
            assert "per-user limit for 'analyst'" in str(ei.value)
            # The refusal ends that Execute's batch only: the session is usable (and still
            # limited, so it is refused again rather than hanging or desynchronising).
            with pytest.raises(asyncpg.PostgresError) as ei2:
                await conn.fetchval("SELECT 2")
            assert ei2.value.sqlstate == "53400"
            assert conn.is_closed() is False
        finally:
            await conn.close()
        await p.runtime.audit.flush()
        recs = await p.runtime.audit.store.query(user="analyst", decision="rate_limited", limit=10)
        wire = [r for r in recs if r.door == "wire" and r.rule == "rate-limit:user"]
        assert len(wire) >= 2
    finally:
        await server.stop(grace_s=1)
