"""TCP keepalive and TCP_USER_TIMEOUT on the wire door's sockets ([wire] tcp_*).

First the options themselves, read back with getsockopt from the live sockets: the client
connection as the proxy accepted it, and the server connection the proxy opened. Then dead
peers for real: a network path cut silently (tests/netns.py: a namespace of the test's own
whose veth end goes down, so nothing comes back, not even a RST) between the proxy and
PostgreSQL (through a relay in the namespace), or between a client and the proxy. The kernel
reports the dead connection (ETIMEDOUT) and the proxy's existing paths take over: 08006 to
the client whose server went away, the broken server connection dropped and counted, never
reused; a vanished client's session ended and its transaction's server connection dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import write_demo_config
from sqlproxy.protocol.messages import DataRow, NoticeResponse, ReadyForQuery
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app
from sqlproxy.wire.backend import BackendConnection, UpstreamTarget
from sqlproxy.wire.listener import WireServer
from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireFactory, WireHarness, reload_wire
from tests.netns import CutPath, Relay, hard_close, require_netns
from tests.raw_wire import HANG_S, ROBUST_SQL, RawClient, errors, fatal, lock_key, query, session_ended
from tests.tcp_checks import tcp_options_of

_T = socket.IPPROTO_TCP


def _sock(transport: Any) -> Any:
    sock = transport.get_extra_info("socket")
    assert sock is not None
    return sock


async def _login(h: WireHarness, user: str = "admin") -> RawClient:
    raw = await RawClient.open(h.port)
    msgs = await raw.login(user, h.passwords[user])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    return raw


def _idle_backend(h: WireHarness) -> BackendConnection:
    (be,) = list(h.server.pools["demo"].idle)
    assert be.transport is not None
    return be


async def _sockets(h: WireHarness) -> tuple[Any, Any]:
    """The proxy's two sockets for one logged-in client: the client's (checked to be that
    client's by its address) and the server connection's (checked to be PostgreSQL's)."""
    _, client, server = await _client_and_sockets(h)
    return client, server


async def _client_and_sockets(h: WireHarness) -> tuple[RawClient, Any, Any]:
    """_sockets, with the client (the session lasts as long as it is open)."""
    raw = await _login(h)
    assert raw.key is not None
    session = h.server._by_pid[raw.key.process_id]
    assert session.transport is not None
    client = _sock(session.transport)
    assert client.getpeername() == raw.writer.get_extra_info("sockname")
    raw.send(query("SELECT 1"))
    assert not errors(await raw.until_ready())
    be = _idle_backend(h)  # transaction mode: the query's server connection is idle again
    server = _sock(be.transport)
    assert server.family == socket.AF_INET and server.getpeername()[1] == be.target.port
    return raw, client, server


async def test_configured_options_on_client_and_server_sockets(wire_factory: WireFactory) -> None:
    h = await wire_factory(
        pool_mode="transaction",
        server_pool_size=1,
        tcp_keepidle_s=17,
        tcp_keepintvl_s=3,
        tcp_keepcnt=4,
        tcp_user_timeout_ms=2500,
    )
    client, server = await _sockets(h)
    assert tcp_options_of(client) == (1, 17, 3, 4, 2500)
    assert tcp_options_of(server) == (1, 17, 3, 4, 2500)


async def test_defaults_on_client_and_server_sockets(wire_factory: WireFactory) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    client, server = await _sockets(h)
    assert tcp_options_of(client) == (1, 60, 10, 6, 0)
    assert tcp_options_of(server) == (1, 60, 10, 6, 0)


async def test_keepalive_off_still_sets_the_user_timeout(wire_factory: WireFactory) -> None:
    h = await wire_factory(
        pool_mode="transaction", server_pool_size=1, tcp_keepalive=False, tcp_user_timeout_ms=700
    )
    client, server = await _sockets(h)
    for sock in (client, server):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(_T, socket.TCP_USER_TIMEOUT) == 700


async def test_reload_sets_new_options_on_new_connections(
    wire_following: WireFactory, proxy: ProxyHarness
) -> None:
    """A reload's tcp_* apply to client connections accepted after it and to server
    connections opened after it (pools made before it too); connections already open keep
    what they were given."""
    h = await wire_following(tcp_keepidle_s=17, tcp_keepintvl_s=3, tcp_keepcnt=4, tcp_user_timeout_ms=2500)
    raw, old_client, old_server = await _client_and_sockets(h)
    assert tcp_options_of(old_client) == tcp_options_of(old_server) == (1, 17, 3, 4, 2500)
    reload_wire(proxy.runtime, tcp_keepidle_s=23, tcp_keepintvl_s=5, tcp_keepcnt=3, tcp_user_timeout_ms=4100)
    pool = h.server.pools["demo"]
    for be in list(pool.idle):
        pool.discard(be)  # so that the next login opens a server connection
    client, server = await _sockets(h)
    assert tcp_options_of(client) == tcp_options_of(server) == (1, 23, 5, 3, 4100)
    assert tcp_options_of(old_client) == (1, 17, 3, 4, 2500)
    await raw.close()
    reload_wire(proxy.runtime, tcp_keepalive=False)
    for be in list(pool.idle):
        pool.discard(be)
    client, server = await _sockets(h)
    for sock in (client, server):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(_T, socket.TCP_USER_TIMEOUT) == 4100


# ------------------------------------------------------------------------------ dead paths


@pytest.fixture(scope="module")
def robust_db(demo_dsn: str) -> Iterator[str]:
    with psycopg.connect(demo_dsn, autocommit=True) as conn:
        conn.execute(ROBUST_SQL)
    yield demo_dsn


@pytest_asyncio.fixture(loop_scope="session")
async def cut_path() -> AsyncIterator[CutPath]:
    require_netns()
    path = await asyncio.to_thread(CutPath.create)
    try:
        yield path
    finally:
        await asyncio.to_thread(path.close)


@pytest_asyncio.fixture(loop_scope="session")
async def relay(cut_path: CutPath, robust_db: str) -> AsyncIterator[Relay]:
    pg = UpstreamTarget.from_dsn(robust_db)
    r = await Relay(cut_path, pg.host, pg.port).start()
    try:
        yield r
    finally:
        await r.close()


def _unacked(sock: Any) -> int:
    """tcp_info.tcpi_unacked: segments sent and not yet acknowledged."""
    info = sock.getsockopt(_T, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 24)[0])


async def _all_acked(sock: Any) -> None:
    """Until the peer has acknowledged all the socket sent: cut after that, only keepalive can
    find the dead peer (with data in flight, retransmission does)."""
    deadline = time.monotonic() + HANG_S
    while _unacked(sock):
        assert time.monotonic() < deadline, "the peer never acknowledged"
        await asyncio.sleep(0.01)


def _lost_total(proxy: ProxyHarness) -> float:
    v = proxy.runtime.metrics.registry.get_sample_value(
        "sqlproxy_wire_server_connections_lost_total", {"database": "demo"}
    )
    return v or 0.0


async def _through_relay(wire_factory: WireFactory, relay: Relay, **overrides: Any) -> WireHarness:
    """A listener whose "demo" server connections cross the cut path."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=2, **overrides)
    pg = h.server.pool_for("demo").target
    h.server.pools["demo"] = h.server.make_pool(
        "demo", dataclasses.replace(pg, host=relay.path.far, port=relay.port)
    )
    return h


async def _still_serving(wire: WireHarness) -> None:
    """Another session on the same proxy (its own listener, a server path that works)."""
    async with await psycopg.AsyncConnection.connect(wire.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_query_to_a_server_behind_a_dead_path_fails_by_user_timeout(
    wire_factory: WireFactory, relay: Relay, wire: WireHarness, proxy: ProxyHarness
) -> None:
    """A query written to a server connection whose path died while it sat in the pool: the
    data is never acknowledged, TCP_USER_TIMEOUT (1 s) ends the connection, and the client
    gets 08006 within a few seconds instead of waiting for the kernel's ~15 minutes."""
    h = await _through_relay(wire_factory, relay, tcp_user_timeout_ms=1000)
    pool = h.server.pools["demo"]
    lost_before = _lost_total(proxy)
    raw = await _login(h)
    raw.send(query("SELECT 1"))
    assert not errors(await raw.until_ready())
    be = _idle_backend(h)
    await _all_acked(_sock(be.transport))
    relay.path.cut()
    t0 = time.monotonic()
    raw.send(query("SELECT 2"))
    msgs = await raw.until_eof()
    elapsed = time.monotonic() - t0
    await raw.close()
    err = fatal(msgs)
    assert err.sqlstate == "08006", msgs
    assert 0.9 < elapsed < 10, elapsed
    assert be.closed and be.lost_reason is not None and "timed out" in be.lost_reason.lower()
    assert pool.lost == 1 and pool.total == 0 and h.backends_in_use() == 0
    assert _lost_total(proxy) == lost_before + 1
    await _still_serving(wire)
    # Mended: the next client gets a new server connection, never the broken one.
    relay.path.mend()
    raw = await _login(h)
    raw.send(query("SELECT 3"))
    assert not errors(await raw.until_ready())
    assert relay.accepted == 2 and pool.total == 1 and pool.lost == 1
    await raw.close()


async def test_query_waiting_on_a_server_behind_a_dead_path_fails_by_keepalive(
    wire_factory: WireFactory, relay: Relay, robust_db: str, wire: WireHarness
) -> None:
    """The server is running the client's statement when the path dies: nothing is in
    flight, so only keepalive can tell (1 s idle, 2 probes 1 s apart; no user timeout). The
    client gets 08006 instead of waiting forever."""
    h = await _through_relay(wire_factory, relay, tcp_keepidle_s=1, tcp_keepintvl_s=1, tcp_keepcnt=2)
    pool = h.server.pools["demo"]
    raw = await _login(h)
    raw.send(query(f"SELECT robust.hold({lock_key()}, 3600)"))
    server_pid = 0
    try:
        while not server_pid:  # the NOTICE says the statement runs (and acknowledges the query)
            msg = await raw.recv()
            assert msg is not None and not errors([msg]), msg
            if isinstance(msg, NoticeResponse):
                server_pid = int((msg.message or "").split()[-1])
        (be,) = [b for b in pool._all]
        await _all_acked(_sock(be.transport))
        relay.path.cut()
        t0 = time.monotonic()
        msgs = await raw.until_eof()
        elapsed = time.monotonic() - t0
        await raw.close()
        assert fatal(msgs).sqlstate == "08006", msgs
        assert 1.5 < elapsed < 15, elapsed
        assert pool.lost == 1 and pool.total == 0 and h.backends_in_use() == 0
        await _still_serving(wire)
    finally:
        if server_pid:  # the relay still holds PostgreSQL's side: end the statement there
            async with await psycopg.AsyncConnection.connect(robust_db, autocommit=True) as d:
                await d.execute("SELECT pg_terminate_backend(%s, 10000)", (server_pid,))


async def test_idle_server_connection_behind_a_dead_path_is_dropped_before_use(
    wire_factory: WireFactory, relay: Relay
) -> None:
    """Keepalive finds a dead server connection while it is idle in the pool: it is dropped
    and counted, and the next statement runs on a new connection without an error."""
    h = await _through_relay(wire_factory, relay, tcp_keepidle_s=1, tcp_keepintvl_s=1, tcp_keepcnt=2)
    pool = h.server.pools["demo"]
    lost = asyncio.Event()
    count = pool._on_lost
    assert count is not None

    def on_lost() -> None:
        count()
        lost.set()

    pool._on_lost = on_lost
    raw = await _login(h)
    be = _idle_backend(h)
    await _all_acked(_sock(be.transport))
    relay.path.cut()
    t0 = time.monotonic()
    await asyncio.wait_for(lost.wait(), HANG_S)
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 15, elapsed
    assert be.closed and pool.lost == 1 and pool.total == 0 and not pool.idle
    relay.path.mend()
    raw.send(query("SELECT 42"))
    msgs = await raw.until_ready()
    assert not errors(msgs) and [m.values for m in msgs if isinstance(m, DataRow)] == [(b"42",)]
    assert relay.accepted == 2 and pool.lost == 1
    await raw.close()


async def test_client_behind_a_dead_path_is_dropped_with_its_transaction(
    proxy: ProxyHarness, demo_passwords: dict[str, str], cut_path: CutPath, robust_db: str
) -> None:
    """A client that vanished silently in the middle of a transaction: keepalive on the
    client's socket ends its session, and the server connection it held (with the
    transaction's locks) is dropped, not kept until an idle timeout, which is off here."""
    cfg = proxy.runtime.config.current.wire.model_copy(
        update={
            "pool_mode": "transaction",
            "server_pool_size": 1,
            "idle_in_transaction_timeout_s": 0.0,
            "tcp_keepidle_s": 1,
            "tcp_keepintvl_s": 1,
            "tcp_keepcnt": 2,
        }
    )
    server = WireServer(proxy.runtime, host=cut_path.near, port=0, config=cfg)
    await server.start()
    h = WireHarness(passwords=demo_passwords, server=server)
    sock = cut_path.socket_in_far()
    raw: RawClient | None = None
    try:
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (cut_path.near, h.port)), HANG_S)
        r, w = await asyncio.open_connection(sock=sock)
        raw = RawClient(r, w)
        msgs = await raw.login("admin", demo_passwords["admin"])
        assert isinstance(msgs[-1], ReadyForQuery), msgs
        assert raw.key is not None
        session = server._by_pid[raw.key.process_id]
        key = lock_key()
        raw.send(query(f"BEGIN; SELECT robust.hold({key}, 0)"))
        assert (await raw.until_ready())[-1] == ReadyForQuery("T")
        assert h.backends_in_use() == 1
        assert session.transport is not None
        await _all_acked(_sock(session.transport))
        cut_path.cut()
        t0 = time.monotonic()
        await session_ended(session)
        elapsed = time.monotonic() - t0
        assert 1.5 < elapsed < 15, elapsed
        assert h.backends_in_use() == 0
        # The transaction is gone with its server connection: its lock is free.
        async with await psycopg.AsyncConnection.connect(robust_db, autocommit=True) as d:
            await d.execute("SET lock_timeout = '10s'")
            async with d.transaction():
                await d.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
    finally:
        if raw is not None:
            hard_close(raw.writer.transport)
        else:
            sock.close()
        await server.stop(grace_s=1)


async def test_http_door_upstream_connections_get_the_options(
    demo_dsn: str, tmp_path: Any, demo_keys: dict[str, str], demo_passwords: dict[str, str]
) -> None:
    """The HTTP and WebSocket doors' asyncpg pools get the same keepalive and user timeout as
    the wire door's server connections, and a reload's new ones for the connections opened
    after it."""
    path = write_demo_config(tmp_path, demo_dsn, 8080, demo_keys, demo_passwords)
    cfg = load_config(path)
    wire = cfg.wire.model_copy(
        update={"tcp_keepidle_s": 23, "tcp_keepintvl_s": 5, "tcp_keepcnt": 3, "tcp_user_timeout_ms": 4100}
    )
    holder = ConfigHolder(cfg.model_copy(update={"wire": wire}), path)
    runtime: Runtime = build_app(holder, env={}).state.runtime
    await runtime.start()
    try:
        pool = runtime.upstreams["demo"].pool
        assert pool is not None  # start() opened it to load the catalog
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            sock = _sock(conn._transport)
            assert sock.getpeername()[1] == UpstreamTarget.from_dsn(demo_dsn).port
            assert tcp_options_of(sock) == (1, 23, 5, 3, 4100)
        # A reload that changes only tcp_*: the pool stays, and the connections it opens from
        # then on get the new options.
        wire = cfg.wire.model_copy(update={"tcp_keepidle_s": 31, "tcp_user_timeout_ms": 0})
        holder.replace(cfg.model_copy(update={"wire": wire}))
        await pool.expire_connections()  # each is closed and opened again when next acquired
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
            assert tcp_options_of(_sock(conn._transport)) == (1, 31, 10, 6, 0)
        assert runtime.upstreams["demo"].pool is pool
    finally:
        await runtime.close()
