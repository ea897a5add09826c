"""Audit completeness through the HTTP door, the hash chain across a restart, `sqlproxy audit
verify` on an untouched and on a tampered trail, and who may read which records."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from sqlproxy.auth.keys import generate_api_key
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import DEMO_USERS, write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app
from tests.fix_proxy import ProxyHarness


async def _records(proxy: ProxyHarness, **params: str) -> list[dict[str, Any]]:
    await proxy.runtime.audit.flush()
    r = await proxy.client.get("/api/v1/audit", params={"limit": 1000, **params}, headers=proxy.auth("admin"))
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()["records"]
    return records


async def test_every_outcome_leaves_exactly_one_record(proxy: ProxyHarness) -> None:
    ids = []
    outcomes = [
        (await proxy.query("analyst", "SELECT id, email FROM customers LIMIT 2"), "allow"),
        (await proxy.query("analyst", "SELECT salary FROM employees"), "deny"),
        (await proxy.query("admin", "SELECT 1/0"), "error"),
        (await proxy.query("analyst", "SELEC 1"), "bad_request"),
        (await proxy.client.post("/api/v1/query", json={"sql": "SELECT 1"}), "unauthenticated"),
    ]
    for resp, _ in outcomes:
        ids.append(resp.json()["id"])
    records = await _records(proxy)
    by_id = {r["id"]: r for r in records}
    for rid, (resp, decision) in zip(ids, outcomes, strict=True):
        assert [r["id"] for r in records].count(rid) == 1
        rec = by_id[rid]
        assert rec["decision"] == decision, (resp.text, rec)
        assert rec["door"] == "http" and str(rec["source"]).startswith("127.0.0.1")
        assert isinstance(rec["duration_ms"], float)
    allowed = by_id[ids[0]]
    assert allowed["user"] == "analyst" and allowed["roles"] == ["analyst"]
    assert allowed["statement_kinds"] == ["select"]
    assert allowed["relations"] == [
        {"table": "public.customers", "access": "read", "columns": ["email", "id"]}
    ]
    assert allowed["classifications"] == {"email": ["PII.Email"]}
    assert allowed["rows"] == 2 and allowed["fingerprint"]
    denied = by_id[ids[1]]
    assert denied["rule"] == "analyst-no-employees" and denied["sqlstate"] == "42501"
    assert by_id[ids[2]]["sqlstate"] == "22012"
    assert by_id[ids[4]]["user"] is None


async def test_secrets_never_reach_the_audit(proxy: ProxyHarness) -> None:
    await proxy.query("analyst", "SELECT 1")
    await proxy.client.post(
        "/api/v1/query", json={"sql": "SELECT 1"}, headers={"Authorization": "Bearer sqp_wrong-key-value"}
    )
    await proxy.runtime.audit.flush()
    state = Path(proxy.runtime.config.current.server.state_dir)
    blob = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file() and p.suffix in {".jsonl", ".db"})
    for key in proxy.keys.values():
        assert key.encode() not in blob
    assert b"sqp_wrong-key-value" not in blob


async def test_audit_filters_and_own_records_only(proxy: ProxyHarness) -> None:
    await proxy.query("developer", "SELECT total FROM orders LIMIT 1")
    await proxy.query("developer", "SELECT * FROM employees")
    denied = await _records(proxy, decision="deny", user="developer")
    assert denied and all(r["decision"] == "deny" and r["user"] == "developer" for r in denied)
    on_orders = await _records(proxy, table="orders")
    assert on_orders and all(
        any(rel["table"] == "public.orders" for rel in r["relations"]) for r in on_orders
    )
    # A non-admin sees only their own records, and may not ask for someone else's.
    r = await proxy.client.get("/api/v1/audit", headers=proxy.auth("developer"))
    assert r.status_code == 200
    assert {rec["user"] for rec in r.json()["records"]} == {"developer"}
    r = await proxy.client.get("/api/v1/audit", params={"user": "admin"}, headers=proxy.auth("developer"))
    assert r.status_code == 403
    # The auditor role may read everyone's.
    r = await proxy.client.get("/api/v1/audit", params={"user": "developer"}, headers=proxy.auth("auditor"))
    assert r.status_code == 200 and r.json()["records"]
    r = await proxy.client.get("/api/v1/audit", params={"since": "not-a-time"}, headers=proxy.auth("admin"))
    assert r.status_code == 400


def _verify(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlproxy", "audit", "verify", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _session(cfg_path: Path, keys: dict[str, str], sql: list[str]) -> None:
    holder = ConfigHolder(load_config(cfg_path), cfg_path)
    app = build_app(holder, env={})
    rt: Runtime = app.state.runtime
    await rt.start()
    try:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            for s in sql:
                await c.post(
                    "/api/v1/query", json={"sql": s}, headers={"Authorization": f"Bearer {keys['admin']}"}
                )
    finally:
        await rt.close()


@pytest.mark.parametrize("tamper", ["modify", "delete", "reorder"])
async def test_chain_survives_restart_and_detects_tampering(
    demo_dsn: str, tmp_path: Path, tamper: str
) -> None:
    keys = {u: generate_api_key() for u in DEMO_USERS}
    cfg = write_demo_config(tmp_path, demo_dsn, 8080, keys)
    await _session(cfg, keys, ["SELECT 1", "SELECT count(*) FROM orders", "SELECT * FROM nope"])
    await _session(cfg, keys, ["SELECT 2", "SELECT 3"])  # a restart: the chain continues
    ok = _verify(cfg)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "store: 5 record(s), seq 1..5: ok" in ok.stdout
    assert "jsonl: 5 record(s)" in ok.stdout

    db = tmp_path / "audit" / "audit.db"
    with sqlite3.connect(db) as conn:
        if tamper == "modify":
            conn.execute("UPDATE audit_records SET sql = 'SELECT harmless' WHERE seq = 2")
        elif tamper == "delete":
            conn.execute("DELETE FROM audit_records WHERE seq = 3")
        else:
            conn.execute("UPDATE audit_records SET seq = 100 WHERE seq = 2")
            conn.execute("UPDATE audit_records SET seq = 2 WHERE seq = 4")
            conn.execute("UPDATE audit_records SET seq = 4 WHERE seq = 100")
    bad = _verify(cfg)
    assert bad.returncode == 1, bad.stdout
    assert "TAMPERING DETECTED" in bad.stdout


async def test_reload_is_atomic(proxy: ProxyHarness) -> None:
    path = proxy.config_path
    original = path.read_text()
    gen = proxy.runtime.config.generation
    try:
        # A broken file is refused, names the key, and the running config keeps serving.
        path.write_text(original.replace('action = "block"', 'action = "blok"', 1))
        r = await proxy.client.post("/api/v1/admin/reload", headers=proxy.auth("admin"))
        assert r.status_code == 400
        problems = r.json()["error"]["problems"]
        assert any(p["path"].startswith("policies.") and p["path"].endswith(".action") for p in problems)
        assert proxy.runtime.config.generation == gen
        r = await proxy.query("analyst", "SELECT salary FROM employees")
        assert r.status_code == 403
        # A valid change takes effect on the next request.
        path.write_text(
            original.replace('table = "employees"\naction = "block"', 'table = "employees"\naction = "allow"')
        )
        r = await proxy.client.post("/api/v1/admin/reload", headers=proxy.auth("admin"))
        assert r.status_code == 200, r.text
        r = await proxy.query("analyst", "SELECT name FROM employees LIMIT 1")
        assert r.status_code == 200, r.text
        r = await proxy.client.post("/api/v1/admin/reload", headers=proxy.auth("analyst"))
        assert r.status_code == 403
    finally:
        path.write_text(original)
        r = await proxy.client.post("/api/v1/admin/reload", headers=proxy.auth("admin"))
        assert r.status_code == 200
    r = await proxy.query("analyst", "SELECT salary FROM employees")
    assert r.status_code == 403
