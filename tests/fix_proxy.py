"""pytest plugin: a proxy runtime on the harness's real PostgreSQL, configured like the demo, with
an HTTP client that speaks to the real ASGI app (routing, body parsing, error rendering)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from sqlproxy.auth.keys import generate_api_key
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import DEMO_USERS, write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app


@dataclass
class ProxyHarness:
    runtime: Runtime
    client: httpx.AsyncClient
    keys: dict[str, str]
    config_path: Path

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    async def query(self, user: str, sql: str, **extra: Any) -> httpx.Response:
        return await self.client.post("/api/v1/query", json={"sql": sql, **extra}, headers=self.auth(user))

    async def dry_run(self, user: str, sql: str, **extra: Any) -> httpx.Response:
        return await self.client.post(
            "/api/v1/query/dry-run", json={"sql": sql, **extra}, headers=self.auth(user)
        )


@pytest.fixture(scope="session")
def demo_keys() -> dict[str, str]:
    return {u: generate_api_key() for u in DEMO_USERS}


@pytest.fixture(scope="session")
def demo_passwords() -> dict[str, str]:
    """Wire-door passwords of the demo users (the config holds their SCRAM verifiers)."""
    return {u: generate_api_key() for u in DEMO_USERS}


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def proxy(
    demo_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
    demo_keys: dict[str, str],
    demo_passwords: dict[str, str],
) -> AsyncIterator[ProxyHarness]:
    state = tmp_path_factory.mktemp("proxy-state")
    cfg_path = write_demo_config(state, demo_dsn, 8080, demo_keys, demo_passwords)
    holder = ConfigHolder(load_config(cfg_path), cfg_path)
    app = build_app(holder, env={})
    runtime: Runtime = app.state.runtime
    await runtime.start()
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://sqlproxy.test") as client:
        yield ProxyHarness(runtime, client, demo_keys, cfg_path)
    await runtime.close()


# What the leak tests leave behind if a connection is handed on: a session-level SET, a
# set_config(..., false) and a WITH HOLD cursor.
LEAKED_WORK_MEM, LEAKED_LOCK_TIMEOUT, LEAKED_CURSOR = "77MB", "7s", "leak"


async def assert_pool_holds_no_leaked_state(pool: asyncpg.Pool) -> None:
    """Every connection the pool can hand out, held at once (so none goes unchecked), is free of
    the state the leak tests tried to leave."""
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        for conn in conns:
            assert await conn.fetchval("SHOW work_mem") != LEAKED_WORK_MEM
            assert await conn.fetchval("SHOW lock_timeout") != LEAKED_LOCK_TIMEOUT
            n = await conn.fetchval("SELECT count(*) FROM pg_cursors WHERE name = $1", LEAKED_CURSOR)
            assert n == 0
    finally:
        for conn in conns:
            await pool.release(conn)
