"""Two proxy nodes with separate hubs and audit stores, sharing one Redis: a subscriber on either
node sees both nodes' audit events, in order per node, and resumes across nodes without gaps."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio

from tests.fix_stream import LiveProxy, start_live_proxy


@pytest_asyncio.fixture(loop_scope="session")
async def two_nodes(
    demo_dsn: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    demo_keys: dict[str, str],
    stream_prefix: str,
) -> AsyncIterator[tuple[LiveProxy, LiveProxy]]:
    # Each pair of nodes gets streams of its own: a new node-a starts its audit sequence at 1
    # again, and Redis refuses stream ids below the ones an earlier node-a left there.
    prefix = f"{stream_prefix}-{uuid.uuid4().hex[:6]}"

    def cfg(node: str) -> str:
        return f'[stream]\nnode_id = "{node}"\nredis_url = "{redis_url}"\nredis_prefix = "{prefix}"\n'

    a = await start_live_proxy(tmp_path_factory.mktemp("node-a"), demo_dsn, demo_keys, cfg("node-a"))
    b = await start_live_proxy(tmp_path_factory.mktemp("node-b"), demo_dsn, demo_keys, cfg("node-b"))
    try:
        yield a, b
    finally:
        await b.stop()
        await a.stop()


async def test_subscriber_on_b_sees_a_in_order(two_nodes: tuple[LiveProxy, LiveProxy]) -> None:
    a, b = two_nodes
    c = await b.ws("admin")
    await c.ready()
    await c.send({"type": "subscribe", "channel": "audit", "id": "x", "filters": {"user": "analyst"}})
    await c.recv_type("live", "x")
    sent = []
    for i in range(5):
        r = await a.query("analyst", f"SELECT {i}")
        sent.append(r.json()["id"])
    local = await b.query("analyst", "SELECT 'b'")
    want = set(sent) | {local.json()["id"]}
    got: list[dict[str, Any]] = []
    while {r["id"] for r in got} < want:
        got.extend(await c.audit_until("x", lambda r: True))
    from_a = [r for r in got if r["node"] == "node-a"]
    assert [r["id"] for r in from_a if r["id"] in sent] == sent
    seqs = [r["seq"] for r in from_a]
    assert seqs == sorted(seqs)
    assert any(r["node"] == "node-b" and r["id"] == local.json()["id"] for r in got)
    await c.close()


async def test_resume_across_nodes_has_no_gap(two_nodes: tuple[LiveProxy, LiveProxy]) -> None:
    a, b = two_nodes
    c = await b.ws("admin")
    await c.ready()
    await c.send({"type": "subscribe", "channel": "audit", "id": "r", "filters": {"user": "developer"}})
    sub = await c.recv_type("subscribed", "r")
    await c.recv_type("live", "r")
    cursor = dict(sub["cursor"])
    first = await a.query("developer", "SELECT 1")
    for rec in await c.audit_until("r", lambda r: r["id"] == first.json()["id"]):
        cursor[rec["node"]] = rec["seq"]
    assert "node-a" in cursor and "node-b" in cursor
    await c.close()
    missed = [await n.query("developer", f"SELECT {i}") for i, n in enumerate([a, b, a, a, b])]
    marker_a = await a.query("developer", "SELECT 'end-a'")
    marker_b = await b.query("developer", "SELECT 'end-b'")
    c2 = await b.ws("admin")
    await c2.ready()
    await c2.send(
        {
            "type": "subscribe",
            "channel": "audit",
            "id": "r2",
            "resume": cursor,
            "filters": {"user": "developer"},
        }
    )
    got: list[dict[str, Any]] = []
    ends = {marker_a.json()["id"], marker_b.json()["id"]}
    while not ends <= {r["id"] for r in got}:
        got.extend(await c2.audit_until("r2", lambda r: r["id"] in ends))
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "duplicate"
    assert {m.json()["id"] for m in missed} <= set(ids)
    for node in ("node-a", "node-b"):
        node_seqs = [r["seq"] for r in got if r["node"] == node]
        assert node_seqs == sorted(node_seqs) and node_seqs[0] > cursor[node]
    # Against each node's own store: exactly the developer's records after the cursor.
    for node, proxy in (("node-a", a), ("node-b", b)):
        await proxy.runtime.audit.flush()
        expect = [
            r.seq
            for r in await proxy.runtime.audit.store.query(
                user="developer", after_seq=cursor[node], limit=1000
            )
        ]
        assert [r["seq"] for r in got if r["node"] == node] == expect[
            : len([r for r in got if r["node"] == node])
        ]
    await c2.close()


async def test_resume_from_the_start_of_a_trimmed_stream_is_reported(
    two_nodes: tuple[LiveProxy, LiveProxy], redis_url: str
) -> None:
    """Resuming a node from seq 0 asks for all it ever published: if Redis no longer holds the
    first records (trimmed by retention), the subscriber must be told, not silently skip them."""
    a, b = two_nodes
    c = await b.ws("admin")
    await c.ready()
    await c.send({"type": "subscribe", "channel": "audit", "id": "w", "filters": {"user": "developer"}})
    await c.recv_type("live", "w")
    ids = [(await a.query("developer", f"SELECT {i}")).json()["id"] for i in range(4)]
    got = await c.audit_until("w", lambda r: r["id"] == ids[-1])
    seqs = [r["seq"] for r in got if r["node"] == "node-a"]
    await c.close()
    fanout = b.runtime.stream.fanout
    assert fanout is not None
    key = fanout.key("node-a")
    r = redis.asyncio.from_url(redis_url)
    try:
        # Exact (not approximate) trimming: drop everything before the last record.
        await r.xtrim(key, minid=f"{seqs[-1]}-0", approximate=False)
        assert await r.xlen(key) == 1
    finally:
        await r.aclose()
    c2 = await b.ws("admin")
    await c2.ready()
    await c2.send({"type": "subscribe", "channel": "audit", "id": "t", "resume": {"node-a": 0}})
    await c2.recv_type("subscribed", "t")
    err = await c2.recv_type("error", "t")
    assert err["code"] == "resume_unavailable" and err["node"] == "node-a"
    assert err["first_available"] == seqs[-1]
    await c2.recv_type("live", "t")
    await c2.close()
