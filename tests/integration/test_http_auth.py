"""Authentication through the HTTP door on its own runtime (so lockouts do not spill into other
tests): lockout after repeated failures, source-address allowlists, disabled users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio

from sqlproxy.auth.keys import generate_api_key, hash_api_key
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app

KEYS = {"alice": generate_api_key(), "fenced": generate_api_key(), "gone": generate_api_key()}


def _config(dsn: str, state: Path) -> str:
    return f"""
[server]
state_dir = "{state}"
[databases.app]
dsn = "{dsn}"
[auth]
lockout_threshold = 3
lockout_window_s = 600
lockout_duration_s = 600
[roles.reader]
[users.alice]
roles = ["reader"]
api_key_sha256 = "{hash_api_key(KEYS["alice"])}"
[users.fenced]
roles = ["reader"]
api_key_sha256 = "{hash_api_key(KEYS["fenced"])}"
allowed_cidrs = ["10.0.0.0/8", "fd00::/8"]
[users.gone]
roles = ["reader"]
disabled = true
api_key_sha256 = "{hash_api_key(KEYS["gone"])}"
[[policies]]
name = "select-anything-without-tables"
roles = ["reader"]
statements = ["select"]
action = "allow"
"""


@pytest_asyncio.fixture(loop_scope="session")
async def app_and_runtime(demo_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[object, Runtime]]:
    cfg = tmp_path / "auth.toml"
    cfg.write_text(_config(demo_dsn, tmp_path / "state"))
    app = build_app(ConfigHolder(load_config(cfg), cfg), env={})
    rt: Runtime = app.state.runtime
    await rt.start()
    yield app, rt
    await rt.close()


def _client(app: object, host: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 5000)), base_url="http://x")  # type: ignore[arg-type]


async def _q(c: httpx.AsyncClient, key: str) -> httpx.Response:
    return await c.post("/api/v1/query", json={"sql": "SELECT 1"}, headers={"Authorization": f"Bearer {key}"})


async def test_lockout_after_repeated_failures_blocks_even_a_valid_key(
    app_and_runtime: tuple[object, Runtime],
) -> None:
    app, rt = app_and_runtime
    async with _client(app, "192.0.2.10") as attacker, _client(app, "192.0.2.99") as other:
        assert (await _q(attacker, KEYS["alice"])).status_code == 200
        for _ in range(3):
            assert (await _q(attacker, "sqp_guess")).status_code == 401
        locked = await _q(attacker, KEYS["alice"])
        assert locked.status_code == 401
        # Locked looks like any other failure: the client learns nothing.
        assert locked.json()["error"]["message"] == "invalid credentials"
        # Another source is not affected.
        assert (await _q(other, KEYS["alice"])).status_code == 200
    await rt.audit.flush()
    records = await rt.audit.store.query(decision="unauthenticated", limit=100)
    assert len(records) >= 4
    assert all(r.source.startswith("192.0.2.10") for r in records)


async def test_source_allowlist_and_disabled_user(app_and_runtime: tuple[object, Runtime]) -> None:
    app, _ = app_and_runtime
    async with _client(app, "127.0.0.1") as outside, _client(app, "10.1.2.3") as inside:
        r = await _q(outside, KEYS["fenced"])
        assert r.status_code == 403 and r.json()["error"]["code"] == "source_not_allowed"
        assert (await _q(inside, KEYS["fenced"])).status_code == 200
    async with _client(app, "fd00::5") as inside6:
        assert (await _q(inside6, KEYS["fenced"])).status_code == 200
    async with _client(app, "198.51.100.7") as c:
        r = await _q(c, KEYS["gone"])
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid credentials"


async def test_default_deny_for_a_user_with_no_table_rules(app_and_runtime: tuple[object, Runtime]) -> None:
    app, _ = app_and_runtime
    async with _client(app, "198.51.100.8") as c:
        r = await c.post(
            "/api/v1/query",
            json={"sql": "SELECT * FROM customers"},
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
        )
        assert r.status_code == 403
        assert r.json()["error"]["rule"] == "default-deny"
