"""pytest plugin: a real proxy on uvicorn on a free loopback port, and a small WebSocket client
for the stream door, shared by the test_stream_* modules.

Fixtures:
  live           the proxy most stream tests share (session-scoped).
  stream_prefix  a Redis key prefix of this test run's own.

The listening socket is bound and put in listen() before uvicorn runs, so a client may connect
at once: its connection waits in the backlog until uvicorn has run the lifespan (runtime start)
and accepts it. No polling, no sleeping."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import ProxyServer, build_app, uvicorn_config


@dataclass
class LiveProxy:
    runtime: Runtime
    port: int
    keys: dict[str, str]
    server: uvicorn.Server
    task: asyncio.Task[None]
    http: httpx.AsyncClient
    state_dir: Path
    # With TLS: the context that trusts the proxy's certificate (wss:// and https://).
    client_tls: ssl.SSLContext | None = None

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.client_tls is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}/api/v1/stream"

    @property
    def base_url(self) -> str:
        scheme = "https" if self.client_tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    async def query(self, user: str, sql: str, **extra: Any) -> httpx.Response:
        return await self.http.post("/api/v1/query", json={"sql": sql, **extra}, headers=self.auth(user))

    async def ws(self, user: str | None = None, **kw: Any) -> StreamClient:
        headers = self.auth(user) if user is not None else None
        kw.setdefault("max_size", None)
        if self.client_tls is not None:
            kw.setdefault("ssl", self.client_tls)
        conn = await connect(self.ws_url, additional_headers=headers, **kw)
        return StreamClient(conn)

    async def stop(self) -> None:
        await self.http.aclose()
        self.server.should_exit = True
        await self.task


async def start_live_proxy(
    state_dir: Path,
    dsn: str,
    keys: dict[str, str],
    extra_toml: str = "",
    *,
    server_toml: str = "",
    client_tls: ssl.SSLContext | None = None,
) -> LiveProxy:
    """``server_toml`` adds keys to the [server] section (tls_cert / tls_key); ``client_tls``
    is then the clients' context that trusts the certificate."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = write_demo_config(state_dir, dsn, 0, keys)
    text = cfg_path.read_text()
    if server_toml:
        text = text.replace("[server]\n", "[server]\n" + server_toml.rstrip("\n") + "\n", 1)
    # The wire door would take the fixed port 6432; these tests speak HTTP and WebSocket only.
    cfg_path.write_text(text + "\n[wire]\nenabled = false\n" + extra_toml + "\n")
    holder = ConfigHolder(load_config(cfg_path), cfg_path)
    app = build_app(holder, env={})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The same settings `sqlproxy serve` uses (TLS included); the socket is ours.
    config = uvicorn_config(app, holder, log_level="warning")
    server = ProxyServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    scheme = "https" if client_tls is not None else "http"
    http = httpx.AsyncClient(base_url=f"{scheme}://127.0.0.1:{port}", timeout=60, verify=client_tls or True)
    # The first request waits in the backlog until startup is done; after it, the runtime is up.
    r = await http.get("/health")
    assert r.status_code == 200, r.text
    return LiveProxy(app.state.runtime, port, keys, server, task, http, state_dir, client_tls)


@dataclass
class StreamClient:
    conn: ClientConnection
    received: list[dict[str, Any]] = field(default_factory=list)
    # Per subscription, records of a data frame that audit_until has not handed out yet.
    unread: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(frame))

    async def recv(self, wait_s: float = 30.0) -> dict[str, Any]:
        """The next frame that is not a heartbeat. The timeout only turns a hang into a failure."""
        while True:
            raw = await asyncio.wait_for(self.conn.recv(), wait_s)
            frame: dict[str, Any] = json.loads(raw)
            if frame.get("type") != "heartbeat":
                self.received.append(frame)
                return frame

    async def recv_type(self, ftype: str, sub_id: str | None = None) -> dict[str, Any]:
        while True:
            f = await self.recv()
            if f["type"] == ftype and (sub_id is None or f.get("id") == sub_id):
                return f
            if f["type"] == "error" and ftype != "error":
                raise AssertionError(f"unexpected error frame: {f}")

    async def ready(self) -> dict[str, Any]:
        return await self.recv_type("ready")

    async def audit_until(self, sub_id: str, pred: Any) -> list[dict[str, Any]]:
        """Audit records of ``sub_id`` up to and including the first one for which pred is true.
        Records of the same frame after that one are kept for the next call, not dropped: how
        records are split into frames depends on timing."""
        out: list[dict[str, Any]] = []
        unread = self.unread.setdefault(sub_id, [])
        while True:
            while unread:
                r = unread.pop(0)
                out.append(r)
                if pred(r):
                    return out
            f = await self.recv()
            if f.get("id") != sub_id:
                continue
            if f["type"] == "error":
                raise AssertionError(f"error frame: {f}")
            if f["type"] != "data":
                continue
            unread.extend(f["records"])

    async def close(self) -> None:
        await self.conn.close()


@pytest.fixture(scope="session")
def stream_prefix() -> str:
    return f"sqlproxy-test-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def live(
    demo_dsn: str, tmp_path_factory: pytest.TempPathFactory, demo_keys: dict[str, str]
) -> AsyncIterator[LiveProxy]:
    """The proxy most stream tests share: the demo config, a short auth deadline."""
    proxy = await start_live_proxy(
        tmp_path_factory.mktemp("stream-live"),
        demo_dsn,
        demo_keys,
        '[stream]\nauth_timeout_s = 2.0\nnode_id = "live-1"\nmetrics_min_interval_ms = 50\n',
    )
    yield proxy
    await proxy.stop()
