"""The metrics channel: snapshots at the client's interval that move with the traffic."""

from __future__ import annotations

from tests.fix_stream import LiveProxy


async def test_metrics_snapshots_follow_traffic(live: LiveProxy) -> None:
    c = await live.ws("auditor")
    await c.ready()
    await c.send({"type": "subscribe", "channel": "metrics", "id": "m", "interval_ms": 50})
    sub = await c.recv_type("subscribed", "m")
    assert sub["interval_ms"] == 50
    first = (await c.recv_type("data", "m"))["snapshot"]
    assert first["node"] == "live-1"
    assert {"requests_per_s", "latency_ms", "top_users", "top_tables", "pools", "audit", "rate_limit"} <= set(
        first
    )
    assert first["pools"]["demo"]["max"] == 10
    before_allow = first["totals"].get("allow", 0)
    before_deny = first["totals"].get("deny", 0)
    for _ in range(3):
        assert (await live.query("developer", "SELECT id FROM orders LIMIT 1")).status_code == 200
    assert (await live.query("analyst", "SELECT salary FROM employees")).status_code == 403
    # Snapshots keep coming; one of them shows the new requests.
    while True:
        snap = (await c.recv_type("data", "m"))["snapshot"]
        if snap["totals"].get("deny", 0) > before_deny and snap["totals"].get("allow", 0) >= before_allow + 3:
            break
    users = dict(map(tuple, snap["top_users"]))
    assert users.get("developer", 0) >= 3
    assert "public.orders" in dict(map(tuple, snap["top_tables"]))
    assert any(d["user"] == "analyst" and d["rule"] == "analyst-no-employees" for d in snap["recent_denied"])
    assert snap["latency_ms"]["p50"] is not None and snap["latency_ms"]["count"] >= 4
    assert snap["requests_per_s_total"] > 0
    await c.send({"type": "unsubscribe", "id": "m"})
    await c.recv_type("unsubscribed", "m")
    await c.close()
