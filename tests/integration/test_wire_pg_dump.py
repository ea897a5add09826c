"""pg_dump through the wire door, as a client as demanding as they come: a REPEATABLE READ
snapshot, set_config('search_path', ''), hundreds of catalog queries and a COPY ... TO STDOUT of
every table. The dump made through the proxy must be the dump made directly."""

from __future__ import annotations

import asyncio
import os
import re

from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireFactory

# pg_dump 15.14+ wraps the script in \restrict KEY ... \unrestrict KEY with a random key.
_RESTRICT = re.compile(rb"^\\(un)?restrict \S+$", re.MULTILINE)

# pg_dump sets search_path with set_config, a dangerous function: the admin may call it.
DUMP_RULE = """
[[policies]]
name = "admin-may-dump"
roles = ["admin"]
functions = ["set_config"]
action = "allow"
"""


async def _pg_dump(env: dict[str, str], *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "pg_dump",
        "--no-password",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return _RESTRICT.sub(b"", out)


async def test_pg_dump_through_the_proxy_equals_the_direct_dump(
    wire_factory: WireFactory, proxy: ProxyHarness, demo_dsn: str
) -> None:
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text + DUMP_RULE)
    try:
        proxy.runtime.reload()
        h = await wire_factory(pool_mode="transaction", server_pool_size=2)
        through = await _pg_dump(h.env("admin"))
        direct = await _pg_dump({}, "--dbname", demo_dsn)
        assert b"COPY public.customers" in direct and through == direct
        # Without the rule, the first set_config is refused and pg_dump stops with the reason.
        proxy.config_path.write_text(text)
        proxy.runtime.reload()
        proc = await asyncio.create_subprocess_exec(
            "pg_dump",
            "--no-password",
            env={**os.environ, **h.env("admin")},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode != 0 and b"set_config is dangerous" in err
    finally:
        proxy.config_path.write_text(text)
        proxy.runtime.reload()
    await proxy.runtime.audit.flush()
    store = proxy.runtime.audit.store
    assert store is not None
    copies = [
        r for r in await store.query(user="admin", limit=500) if (r.sql or "").startswith("COPY public.")
    ]
    assert copies and all(r.decision == "allow" and "copy" in r.extra for r in copies)
