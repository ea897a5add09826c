"""The audit channel: live records, filters, own-only scope, tail, gap-free resume, lagging."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from sqlproxy.audit.record import AuditRecord
from sqlproxy.stream.channels import AuditSubscription
from tests.fix_stream import LiveProxy, StreamClient, start_live_proxy


async def _subscribe(c: StreamClient, sub_id: str, **kw: object) -> dict[str, Any]:
    await c.send({"type": "subscribe", "channel": "audit", "id": sub_id, **kw})
    sub = await c.recv_type("subscribed", sub_id)
    await c.recv_type("live", sub_id)
    return sub


async def test_live_record_arrives_with_node_and_seq(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    sub = await _subscribe(c, "a")
    assert set(sub["cursor"]) == {"live-1"}
    r = await live.query("analyst", "SELECT id, email FROM customers LIMIT 2")
    assert r.status_code == 200
    req_id = r.json()["id"]
    recs = await c.audit_until("a", lambda rec: rec["id"] == req_id)
    mine = recs[-1]
    assert mine["user"] == "analyst" and mine["decision"] == "allow" and mine["door"] == "http"
    assert mine["node"] == "live-1" and mine["seq"] > sub["cursor"]["live-1"]
    assert mine["classifications"]["email"] == ["PII.Email"]
    await c.close()


async def test_filters_match_decision_table_and_kind(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    await _subscribe(c, "d", filters={"decision": "deny", "table": "employees", "kind": "select"})
    assert (await live.query("analyst", "SELECT name FROM customers LIMIT 1")).status_code == 200
    # Denied too, but another table: the table filter keeps it out.
    assert (await live.query("analyst", "SELECT * FROM sensitive_records")).status_code == 403
    denied = await live.query("analyst", "SELECT name, salary FROM employees")
    assert denied.status_code == 403
    # Per-node order: had anything else matched, it would have come before this record.
    recs = await c.audit_until("d", lambda rec: True)
    assert [x["id"] for x in recs] == [denied.json()["id"]]
    assert recs[0]["decision"] == "deny" and recs[0]["rule"] == "analyst-no-employees"
    await c.close()


async def test_non_admin_sees_only_their_own_records(live: LiveProxy) -> None:
    c = await live.ws("developer")
    await c.ready()
    sub = await _subscribe(c, "own")
    assert sub["filters"]["user"] == "developer"
    assert (await live.query("admin", "SELECT 1")).status_code == 200
    assert (await live.query("analyst", "SELECT 2")).status_code == 200
    mine = await live.query("developer", "SELECT id FROM orders LIMIT 1")
    recs = await c.audit_until("own", lambda rec: rec["id"] == mine.json()["id"])
    # Its own connect record may come first; nobody else's ever does.
    assert {x["user"] for x in recs} == {"developer"}
    await c.close()


async def test_tail_sends_recent_history_first(live: LiveProxy) -> None:
    marks = [(await live.query("auditor", f"SELECT {i}")).json()["id"] for i in range(3)]
    await live.runtime.audit.flush()
    c = await live.ws("admin")
    await c.ready()
    await c.send(
        {"type": "subscribe", "channel": "audit", "id": "t", "tail": 3, "filters": {"user": "auditor"}}
    )
    await c.recv_type("subscribed", "t")
    data = await c.recv_type("data", "t")
    assert [r["id"] for r in data["records"]] == marks
    await c.recv_type("live", "t")
    await c.close()


async def test_resume_has_no_gap_and_no_duplicate(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    sub = await _subscribe(c, "r")
    cursor = dict(sub["cursor"])
    first = await live.query("analyst", "SELECT 1")
    for rec in await c.audit_until("r", lambda rec: rec["id"] == first.json()["id"]):
        cursor[rec["node"]] = rec["seq"]
    await c.close()
    # Missed while disconnected: allowed, denied, other users.
    missed = [
        await live.query(u, s)
        for u, s in [
            ("analyst", "SELECT 2"),
            ("analyst", "SELECT salary FROM employees"),
            ("developer", "SELECT 3"),
            ("admin", "SELECT 4"),
        ]
    ]
    c2 = await live.ws("admin")
    await c2.ready()
    await c2.send({"type": "subscribe", "channel": "audit", "id": "r2", "resume": cursor})
    await c2.recv_type("subscribed", "r2")
    after = await live.query("auditor", "SELECT 5")
    got = await c2.audit_until("r2", lambda rec: rec["id"] == after.json()["id"])
    seqs = [r["seq"] for r in got]
    assert seqs == list(range(cursor["live-1"] + 1, seqs[-1] + 1)), seqs
    ids = {r["id"] for r in got}
    assert {m.json()["id"] for m in missed} <= ids
    # The replay-to-live switch is announced, and everything before it came from the store.
    assert any(f["type"] == "live" and f["id"] == "r2" for f in c2.received)
    await c2.close()


async def test_filtered_resume_matches_the_store_query(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    sub = await _subscribe(c, "f", filters={"user": "developer"})
    start = sub["cursor"]["live-1"]
    await c.close()
    for i in range(4):
        await live.query("developer", f"SELECT {i}")
        await live.query("analyst", f"SELECT {i}")
    end = (await live.query("developer", "SELECT 99")).json()["id"]
    c2 = await live.ws("admin")
    await c2.ready()
    await c2.send(
        {
            "type": "subscribe",
            "channel": "audit",
            "id": "f2",
            "resume": start,
            "filters": {"user": "developer"},
        }
    )
    got = await c2.audit_until("f2", lambda rec: rec["id"] == end)
    expect = await live.runtime.audit.store.query(user="developer", after_seq=start, limit=1000)
    assert [r["seq"] for r in got] == [r.seq for r in expect][: len(got)]
    assert got[-1]["id"] == end
    await c2.close()


async def test_resume_from_an_unknown_node_without_redis_is_reported(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    await c.send({"type": "subscribe", "channel": "audit", "id": "x", "resume": {"elsewhere": 5}})
    await c.recv_type("subscribed", "x")
    err = await c.recv_type("error", "x")
    assert err["code"] == "resume_unavailable" and err["node"] == "elsewhere"
    await c.recv_type("live", "x")
    await c.close()


def _big_record(i: int) -> AuditRecord:
    return AuditRecord.new(
        user="loadgen",
        source="127.0.0.1",
        door="http",
        decision="allow",
        duration_ms=0.1,
        # Random, so permessage-deflate cannot shrink it to nothing.
        sql="SELECT '" + secrets.token_hex(8000) + f"' AS n{i}",
    )


async def test_lagging_subscriber_is_closed_with_resume_cursor_and_others_unaffected(
    demo_dsn: str, tmp_path_factory: pytest.TempPathFactory, demo_keys: dict[str, str]
) -> None:
    proxy = await start_live_proxy(
        tmp_path_factory.mktemp("stream-lag"),
        demo_dsn,
        demo_keys,
        '[stream]\nqueue_records = 20\nnode_id = "lag"\n',
    )
    try:
        rt = proxy.runtime
        # The slow client reads nothing: websockets stops reading after one queued frame, so TCP
        # back-pressure reaches the server's send and the subscription's queue fills.
        slow = await proxy.ws("admin", max_queue=1)
        fast = await proxy.ws("admin")
        await fast.ready()
        fsub = await _subscribe(fast, "fast", filters={"user": "loadgen"})
        start = fsub["cursor"]["lag"]
        await slow.send(
            {"type": "subscribe", "channel": "audit", "id": "slow", "filters": {"user": "loadgen"}}
        )

        def slow_sub() -> AuditSubscription | None:
            subs = [s for s in rt.stream._subs if isinstance(s, AuditSubscription) and s.id == "slow"]
            return subs[0] if subs else None

        # The fast subscriber reads all the while, in its own task, until the end marker.
        fast_task = asyncio.create_task(fast.audit_until("fast", lambda rec: rec["sql"] == "END"))

        # Wait for the slow subscription to exist without sleeping: each flush is a round trip
        # through the writer, and the subscription attaches as soon as its frame is read.
        # Chunks stay below queue_records so that only falling behind, not one big batch, lags.
        submitted = 0
        while slow_sub() is None or not slow_sub().lagging:  # type: ignore[union-attr]
            assert submitted < 5000, "the slow subscriber never lagged"
            for i in range(10):
                await rt.audit.submit(_big_record(submitted + i))
            submitted += 10
            await rt.audit.flush()
        end_rec = await rt.audit.submit(
            AuditRecord.new(
                user="loadgen", source="127.0.0.1", door="http", decision="allow", duration_ms=0.1, sql="END"
            )
        )
        end = end_rec.seq

        # The fast subscriber got every record, in order, none missing.
        got_fast = await fast_task
        await rt.audit.flush()
        expected = [r.seq for r in await rt.audit.store.query(user="loadgen", after_seq=start, limit=100_000)]
        assert expected[-1] == end
        assert [r["seq"] for r in got_fast] == expected

        # The slow one now reads: some data, then "lagging" with its cursor, then close 4008.
        seen: list[int] = []
        lag = None
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                f = await slow.recv()
                if f["type"] == "data":
                    seen.extend(r["seq"] for r in f["records"])
                elif f["type"] == "error":
                    assert f["code"] == "lagging"
                    lag = f
        except ConnectionClosed:
            pass
        assert lag is not None and slow.conn.close_code == 4008
        resume = lag["resume"]
        if seen:
            assert resume["lag"] == seen[-1]
        assert seen == expected[: len(seen)]

        # Resuming from the cursor gets exactly the rest.
        again = await proxy.ws("admin")
        await again.ready()
        await again.send(
            {
                "type": "subscribe",
                "channel": "audit",
                "id": "back",
                "resume": resume,
                "filters": {"user": "loadgen"},
            }
        )
        rest = await again.audit_until("back", lambda rec: rec["seq"] == end)
        # Together: every matching record exactly once, in order.
        assert seen + [r["seq"] for r in rest] == expected
        await again.close()
        await fast.close()
    finally:
        await proxy.stop()
