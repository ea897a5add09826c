"""The stream door's authentication and frame handling, with a real WebSocket client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from sqlproxy.stream.frames import PROTOCOL
from tests.fix_stream import LiveProxy, start_live_proxy


async def _closed_code(client_conn) -> int | None:
    with pytest.raises(ConnectionClosed):
        while True:
            await client_conn.recv()
    code: int | None = client_conn.close_code
    return code


async def test_bearer_header_authenticates(live: LiveProxy) -> None:
    c = await live.ws("analyst")
    ready = await c.ready()
    assert ready["user"] == "analyst"
    assert ready["audit_scope"] == "own"
    assert ready["node"] == "live-1"
    await c.close()


async def test_first_frame_auth_for_browsers_and_subprotocol(live: LiveProxy) -> None:
    async with connect(live.ws_url, subprotocols=["sqlproxy.stream.v1"]) as conn:  # type: ignore[list-item]
        assert conn.subprotocol == "sqlproxy.stream.v1"
        await conn.send(json.dumps({"type": "auth", "token": live.keys["auditor"]}))
        ready = json.loads(await conn.recv())
        assert ready["type"] == "ready" and ready["user"] == "auditor" and ready["audit_scope"] == "all"


async def test_wrong_key_is_refused_with_1008_and_audited(live: LiveProxy) -> None:
    async with connect(live.ws_url, additional_headers={"Authorization": "Bearer sqlp_not-a-key"}) as conn:
        err = json.loads(await conn.recv())
        assert err["type"] == "error" and err["code"] == "unauthenticated"
        assert err["message"] == "invalid credentials"
        assert await _closed_code(conn) == 1008
    await live.runtime.audit.flush()
    recs = await live.runtime.audit.store.query(decision="unauthenticated", limit=5)
    assert any(r.door == "ws" and r.extra.get("action") == "stream_connect" for r in recs)
    assert all("sqlp_not-a-key" not in r.to_json() for r in recs)


async def test_first_frame_must_be_auth(live: LiveProxy) -> None:
    async with connect(live.ws_url) as conn:
        await conn.send(json.dumps({"type": "subscribe", "channel": "audit", "id": "a"}))
        err = json.loads(await conn.recv())
        assert err["code"] == "unauthenticated"
        assert await _closed_code(conn) == 1008


async def test_auth_deadline_closes_with_1008(live: LiveProxy) -> None:
    async with connect(live.ws_url) as conn:
        # Send nothing: the server's deadline (2 s in this config) ends the connection.
        err = json.loads(await conn.recv())
        assert err["code"] == "unauthenticated" and "timed out" in err["message"]
        assert await _closed_code(conn) == 1008
        assert conn.close_reason == "auth timeout"


async def test_bad_frames_get_error_frames_and_the_connection_stays(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    await c.conn.send("{not json")
    e1 = await c.recv()
    assert e1["type"] == "error" and e1["code"] == "bad_frame"
    await c.send({"type": "subscribe", "channel": "audit", "id": "a", "filters": {"usr": "x"}})
    e2 = await c.recv()
    assert e2["code"] == "bad_frame" and e2["id"] == "a" and "unknown field" in e2["message"]
    await c.send({"type": "subscribe", "channel": "bogus", "id": "b"})
    assert (await c.recv())["code"] == "bad_frame"
    await c.send({"type": "more", "id": "nope"})
    assert (await c.recv())["code"] == "bad_frame"
    await c.send({"type": "ping", "data": 7})
    assert await c.recv() == {"type": "pong", "data": 7}
    await c.close()


async def test_binary_frame_closes_with_1003(live: LiveProxy) -> None:
    c = await live.ws("admin")
    await c.ready()
    await c.conn.send(b"\x00\x01")
    assert (await c.recv())["code"] == "unsupported_data"
    assert await _closed_code(c.conn) == 1003


async def test_non_admin_may_not_watch_others_or_metrics(live: LiveProxy) -> None:
    c = await live.ws("analyst")
    await c.ready()
    await c.send({"type": "subscribe", "channel": "audit", "id": "a", "filters": {"user": "admin"}})
    err = await c.recv()
    assert err["code"] == "forbidden" and err["id"] == "a"
    await c.send({"type": "subscribe", "channel": "metrics", "id": "m"})
    err = await c.recv()
    assert err["code"] == "forbidden" and err["id"] == "m"
    await c.close()


async def test_frame_limit_counts_bytes_not_characters(live: LiveProxy) -> None:
    """max_frame_bytes (1 MiB) is a limit in UTF-8 bytes: a frame of 300,000 four-byte
    characters (1.2 MB) is refused with frame_too_big and close 1009, though it holds fewer
    characters than the limit; the same number of ASCII characters is an ordinary frame."""
    limit = live.runtime.config.current.stream.max_frame_bytes
    c = await live.ws("analyst")
    await c.ready()
    ascii_frame = json.dumps({"type": "ping", "pad": "a" * 300_000})
    assert len(ascii_frame.encode()) < limit
    await c.conn.send(ascii_frame)
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == "bad_frame", err
    wide = json.dumps({"type": "ping", "pad": "\U0001f600" * 300_000}, ensure_ascii=False)
    assert len(wide) < limit < len(wide.encode())
    await c.conn.send(wide)
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == "frame_too_big", err
    assert await _closed_code(c.conn) == 1009


async def test_disabled_door_closes_with_1013_and_still_selects_the_subprotocol(
    demo_dsn: str, tmp_path: Path, demo_keys: dict[str, str]
) -> None:
    """A browser that offers sqlproxy.stream.v1 fails any handshake that drops it (1006) and
    would never see why: the disabled door selects it and then closes with 1013."""
    proxy = await start_live_proxy(tmp_path / "off", demo_dsn, demo_keys, "[stream]\nenabled = false\n")
    try:
        async with connect(proxy.ws_url, subprotocols=[PROTOCOL]) as conn:  # type: ignore[list-item]
            assert conn.subprotocol == PROTOCOL
            assert await _closed_code(conn) == 1013
            assert conn.close_reason == "the stream door is disabled"
    finally:
        await proxy.stop()


async def test_shutdown_says_going_away_with_1001(
    demo_dsn: str, tmp_path: Path, demo_keys: dict[str, str]
) -> None:
    """Stopping the server (what SIGTERM does to `sqlproxy serve`) closes stream connections
    with 1001, authenticated or still authenticating, before uvicorn closes the rest."""
    proxy = await start_live_proxy(tmp_path / "down", demo_dsn, demo_keys)
    stopped = False
    try:
        c = await proxy.ws("analyst")
        await c.ready()
        pending = await connect(proxy.ws_url)  # connected, not authenticated yet
        await proxy.stop()
        stopped = True
        assert await _closed_code(c.conn) == 1001
        assert c.conn.close_reason == "server shutting down"
        assert await _closed_code(pending) == 1001
    finally:
        if not stopped:
            await proxy.stop()
