"""pytest plugin: the wire door (WireServer) on the `proxy` fixture's runtime, on a free port.

Fixtures:
  wire          WireHarness for the transaction-pool-mode listener (session-scoped).
  wire_session  WireHarness for a session-pool-mode listener on the same runtime.
  wire_factory  callable(**WireConfig overrides) -> a started WireHarness, stopped at teardown
                (function-scoped: for limits and timeouts that need their own listener).
  wire_following
                callable(**[wire] settings) -> a started WireHarness whose listener follows
                the runtime's configuration, as `sqlproxy serve`'s does: the settings go into
                the runtime's config, and later reloads (reload_wire) reach the listener. The
                config is put back and the listeners stopped at teardown.

Synchronous clients (psql, pgbench, psycopg's sync API) must run off the event loop, which
serves the proxy: use `await asyncio.to_thread(...)` or `WireHarness.run(...)`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest_asyncio

from sqlproxy.config.loader import parse_config
from sqlproxy.config.models import ProxyConfig
from sqlproxy.runtime import Runtime
from sqlproxy.wire.listener import WireServer
from tests.fix_proxy import ProxyHarness


@dataclass
class WireClients:
    """libpq settings (a DSN, a URL, PG* variables) for the demo users against a wire door;
    ``port`` is the door's."""

    passwords: dict[str, str]

    @property
    def port(self) -> int:
        raise NotImplementedError

    def dsn(self, user: str = "analyst", *, password: str | None = None, **extra: str) -> str:
        pw = self.passwords[user] if password is None else password
        parts = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "dbname": "demo",
            "user": user,
            "password": pw,
            "sslmode": "disable",
            **extra,
        }
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def url(self, user: str = "analyst", database: str = "demo") -> str:
        return f"postgresql://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/{database}"

    def env(self, user: str = "analyst") -> dict[str, str]:
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": user,
            "PGPASSWORD": self.passwords[user],
            "PGDATABASE": "demo",
            "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
        }


@dataclass
class WireHarness(WireClients):
    server: WireServer

    @property
    def port(self) -> int:
        return self.server.bound_port

    def backends_in_use(self) -> int:
        return sum(p.in_use for p in self.server.pools.values())


async def _start(proxy: ProxyHarness, passwords: dict[str, str], **overrides: Any) -> WireHarness:
    cfg = proxy.runtime.config.current.wire.model_copy(update=overrides)
    server = WireServer(proxy.runtime, host="127.0.0.1", port=0, config=cfg)
    await server.start()
    return WireHarness(passwords=passwords, server=server)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def wire(proxy: ProxyHarness, demo_passwords: dict[str, str]) -> AsyncIterator[WireHarness]:
    h = await _start(proxy, demo_passwords, pool_mode="transaction", server_pool_size=4)
    yield h
    await h.server.stop(grace_s=1)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def wire_session(proxy: ProxyHarness, demo_passwords: dict[str, str]) -> AsyncIterator[WireHarness]:
    h = await _start(proxy, demo_passwords, pool_mode="session", server_pool_size=8)
    yield h
    await h.server.stop(grace_s=1)


WireFactory = Callable[..., Awaitable[WireHarness]]


@pytest_asyncio.fixture(loop_scope="session")
async def wire_factory(proxy: ProxyHarness, demo_passwords: dict[str, str]) -> AsyncIterator[WireFactory]:
    made: list[WireHarness] = []

    async def make(**overrides: Any) -> WireHarness:
        h = await _start(proxy, demo_passwords, **overrides)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.server.stop(grace_s=1)


def reload_wire(runtime: Runtime, **settings: Any) -> ProxyConfig:
    """A reload of the runtime's configuration with ``settings`` put into its [wire] section,
    validated as a file would be: ConfigError when the file or a listener refuses it."""
    cur = runtime.config.current
    data = {**cur.model_dump(by_alias=True), "wire": {**cur.wire.model_dump(), **settings}}
    return runtime.config.replace(parse_config(data))


@pytest_asyncio.fixture(loop_scope="session")
async def wire_following(proxy: ProxyHarness, demo_passwords: dict[str, str]) -> AsyncIterator[WireFactory]:
    rt = proxy.runtime
    old = rt.config.current
    made: list[WireHarness] = []

    async def make(**settings: Any) -> WireHarness:
        reload_wire(rt, **settings)
        server = WireServer(rt, host="127.0.0.1", port=0)
        await server.start()
        made.append(WireHarness(passwords=demo_passwords, server=server))
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            await h.server.stop(grace_s=1)
        rt.config.replace(old)


async def run_psql(h: WireHarness, script: str, user: str = "analyst", *args: str) -> tuple[int, str, str]:
    """psql -f on a script file; returns (exit code, stdout, stderr)."""
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=0",
            "-f",
            path,
            *args,
            env={**os.environ, **h.env(user)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    finally:
        os.unlink(path)
    return proc.returncode or 0, out.decode(), err.decode()


async def run_pgbench_script(env: dict[str, str], script: str, *, clients: int, transactions: int) -> None:
    """pgbench with ``script`` (its -f file) in the simple, extended and prepared protocols
    against the libpq settings in ``env``; each run must complete every transaction."""
    pgbench = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    total = clients * transactions
    try:
        for mode in ("simple", "extended", "prepared"):
            proc = await asyncio.create_subprocess_exec(
                pgbench,
                *("-n", "-c", str(clients), "-j", "2", "-t", str(transactions), "-M", mode, "-f", f.name),
                env={**os.environ, **env},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert f"number of transactions actually processed: {total}/{total}" in out.decode()
    finally:
        os.unlink(f.name)
