"""The wire door's listener: accepts clients, owns the server-connection pools, routes
CancelRequests, follows configuration reloads (TLS and TCP settings, for new connections),
and shuts down gracefully (stop accepting, let transactions finish up to a deadline, then
close)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlproxy.config.loader import Commit
from sqlproxy.config.models import ProxyConfig, WireConfig
from sqlproxy.runtime import Runtime
from sqlproxy.tcp import TcpOptions
from sqlproxy.wire.backend import UpstreamTarget, send_cancel
from sqlproxy.wire.decide import Decider
from sqlproxy.wire.pool import BackendPool
from sqlproxy.wire.session import TLS_HANDSHAKE, WireSession, peek_first
from sqlproxy.wire.tls import make_ssl_context

log = logging.getLogger(__name__)


def load_mock_secret(runtime: Runtime) -> bytes:
    """A persistent secret for SCRAM mock exchanges: an unknown user's fake salt must not
    change across restarts, or probing twice would tell unknown users from real ones."""
    path = runtime._state_path("wire/scram-mock.secret")
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


# The [wire] keys a reload applies: to connections accepted after it (sessions already open keep
# what they started with). The others are read when the listener starts. Every key that the
# WireConfig validator relates to another is in here, so a mix of both stays valid.
RELOADABLE = frozenset(
    {
        "tls_cert",
        "tls_key",
        "require_tls",
        "client_ca_file",
        "client_crl_file",
        "require_client_cert",
        "tcp_keepalive",
        "tcp_keepidle_s",
        "tcp_keepintvl_s",
        "tcp_keepcnt",
        "tcp_user_timeout_ms",
    }
)


@dataclass(frozen=True, slots=True)
class DoorSettings:
    """What the listener accepts a connection with: the [wire] settings, the TLS context made
    from them (None without tls_cert) and the TCP options. A reload replaces it whole; a
    connection keeps the one that was current when it was accepted."""

    config: WireConfig
    ssl_context: ssl.SSLContext | None
    tcp: TcpOptions


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _peek(sock: socket.socket) -> bytes:
    """The first byte of ``sock`` once it has come (MSG_PEEK: it stays in the socket); b""
    when the client has gone."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    while True:
        first = peek_first(sock)
        if first is not None:
            return first
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _set_done, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


# Worker processes (``[wire] workers``): the low bits of the process id the proxy gives a
# client (BackendKeyData) name the worker serving it, so that a CancelRequest, which the kernel
# may hand to any worker, can be passed to the right one.
WORKER_BITS = 6
MAX_WORKERS = 1 << WORKER_BITS


def worker_of(pid: int) -> int:
    return pid & (MAX_WORKERS - 1)


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """This process is worker ``index`` of ``count``; ``forward_cancel`` passes a CancelRequest
    for another worker's client on (through the proxy's process)."""

    index: int
    count: int
    forward_cancel: Callable[[int, bytes], None]


class WireServer:
    def __init__(
        self,
        runtime: Runtime,
        *,
        host: str | None = None,
        port: int | None = None,
        config: WireConfig | None = None,
        worker: WorkerSlot | None = None,
    ) -> None:
        """Without ``config`` the listener follows ``runtime.config``: a reload applies the
        RELOADABLE keys to new connections. With one (the tests' listeners), it keeps that."""
        self.runtime = runtime
        self.worker = worker
        wire = config if config is not None else runtime.config.current.wire
        self.host = host if host is not None else wire.host
        self.port = port if port is not None else wire.port
        self.mock_secret = load_mock_secret(runtime)
        self.decider = Decider(runtime)
        self.door = self._door_for(wire)
        self.sessions: set[WireSession] = set()
        self.active = 0
        self.stopping = False
        self.pools: dict[str, BackendPool] = {}
        self._by_pid: dict[int, WireSession] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Connections handed over before their first byte was known (hand_over).
        self._routing: set[asyncio.Task[None]] = set()
        if config is None:
            # The holder has no way to remove a listener: once stopped, this one does nothing.
            runtime.config.on_change(self._on_config_change)

    @property
    def config(self) -> WireConfig:
        return self.door.config

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.door.ssl_context

    @property
    def tcp(self) -> TcpOptions:
        return self.door.tcp

    def _door_for(self, c: WireConfig) -> DoorSettings:
        return DoorSettings(c, make_ssl_context(c, self.runtime._state_path), TcpOptions.from_config(c))

    def _on_config_change(self, old: ProxyConfig, new: ProxyConfig) -> Commit | None:
        """A reload: the new TLS context (its files read again, so a certificate replaced in
        place is picked up) and TCP options, for the connections accepted from then on and
        the server connections opened from then on. A file that cannot be loaded refuses the
        reload (ConfigError naming its key) and leaves everything as it was."""
        if self.stopping:
            return None
        running = self.door.config
        door = self._door_for(running.model_copy(update={k: getattr(new.wire, k) for k in RELOADABLE}))
        fixed = [
            k
            for k in WireConfig.model_fields
            if k not in RELOADABLE and getattr(new.wire, k) != getattr(running, k)
        ]

        def commit() -> None:
            self.door = door
            for pool in self.pools.values():
                pool.tcp = door.tcp  # for the server connections it opens next
            log.info(
                "wire door: new connections get the reloaded TLS (%s) and TCP settings",
                "on" if door.ssl_context is not None else "off",
            )
            if fixed:
                log.warning(
                    "wire door: %s changed, but take effect only when the proxy restarts", ", ".join(fixed)
                )

        return commit

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: WireSession(self),
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.worker is not None,
            backlog=1024,
        )
        log.info("wire door listening on %s:%s", self.host, self.bound_port)

    # -- direct TLS --------------------------------------------------------------------------
    def hand_over(self, transport: asyncio.Transport, source: str, door: DoorSettings) -> None:
        """Take over a new connection whose first byte has not arrived yet or starts a TLS
        handshake (WireSession.connection_made peeked). Its transport is closed without
        having read a byte; a second descriptor of the socket keeps the connection, and
        _route waits for that byte and then makes the session: over TLS with a handshake
        of its own (connect_accepted_socket), so the ClientHello reaches the TLS layer
        whole. ``door``: the settings the connection was accepted with, kept to the end."""
        raw = transport.get_extra_info("socket")
        try:
            sock = socket.socket(raw.family, raw.type, raw.proto, os.dup(raw.fileno()))
        except OSError as e:  # out of file descriptors, say
            log.warning("connection from %s dropped: %s", source, e)
            transport.abort()
            return
        transport.close()  # closes only its own descriptor: no FIN while `sock` holds one
        loop = asyncio.get_running_loop()
        deadline = loop.time() + door.config.startup_timeout_s
        task = loop.create_task(self._route(sock, source, deadline, door))
        self._routing.add(task)
        task.add_done_callback(self._routing.discard)

    async def _route(self, sock: socket.socket, source: str, deadline: float, door: DoorSettings) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                first = await asyncio.wait_for(_peek(sock), max(deadline - loop.time(), 0.001))
            except (TimeoutError, OSError):
                first = b""  # silent until startup_timeout_s, or reset: as PostgreSQL, no word
            if not first or self.stopping:
                sock.close()
                return
            if first[0] != TLS_HANDSHAKE:
                await loop.connect_accepted_socket(
                    lambda: WireSession(self, deadline=deadline, door=door), sock
                )
                return
            ctx = door.ssl_context
            if ctx is None:
                # As PostgreSQL without ssl: the connection is closed without a word (a
                # PostgreSQL error message would be garbage to a TLS client).
                log.info("direct TLS connection from %s closed: the wire door has no TLS", source)
                sock.close()
                return
            try:
                await loop.connect_accepted_socket(
                    lambda: WireSession(self, direct_tls=True, deadline=deadline, door=door),
                    sock,
                    ssl=ctx,
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                )
            except (OSError, TimeoutError) as e:  # ssl.SSLError, a reset: the client's failure
                log.info("direct TLS handshake with %s failed: %s", source, e)
                sock.close()  # a no-op if the loop closed it already
        except asyncio.CancelledError:
            sock.close()
            raise

    def status(self) -> dict[str, Any]:
        """For /health."""
        return {"workers": 1, "running": 0 if self.stopping else 1, "clients": self.active}

    # -- sessions ----------------------------------------------------------------------------
    def admit(self, session: WireSession) -> bool:
        if self.active >= self.config.max_clients or self.stopping:
            return False
        self.active += 1
        session.counted = True
        return True

    def register(self, session: WireSession) -> tuple[int, bytes]:
        while True:
            if self.worker is None:
                pid = secrets.randbelow(2**31 - 1) + 1
            else:
                high = secrets.randbelow(2 ** (31 - WORKER_BITS) - 1) + 1
                pid = (high << WORKER_BITS) | self.worker.index
            if pid not in self._by_pid:
                break
        self._by_pid[pid] = session
        return pid, secrets.token_bytes(4)

    def forget(self, session: WireSession) -> None:
        self.sessions.discard(session)
        if session.counted:
            session.counted = False
            self.active -= 1
        if self._by_pid.get(session.key[0]) is session:
            del self._by_pid[session.key[0]]

    def pool_for(self, database: str) -> BackendPool:
        pool = self.pools.get(database)
        if pool is None or pool.closed:
            db = self.runtime.config.current.databases[database]
            pool = self.pools[database] = self.make_pool(database, UpstreamTarget.from_dsn(db.dsn))
        return pool

    def make_pool(self, database: str, target: UpstreamTarget) -> BackendPool:
        db = self.runtime.config.current.databases[database]
        return BackendPool(
            database,
            target,
            self.config.server_pool_size or db.pool_max,
            db.connect_timeout_s,
            tcp=self.tcp,
            on_lost=self.runtime.metrics.wire_server_lost.labels(database).inc,
        )

    # -- cancel ------------------------------------------------------------------------------
    async def cancel(self, pid: int, secret: bytes) -> None:
        w = self.worker
        if w is not None and worker_of(pid) != w.index and worker_of(pid) < w.count:
            w.forward_cancel(pid, secret)
            return
        session = self._by_pid.get(pid)
        if session is None:
            # Same work either way: a caller must not learn which keys are live.
            hmac.compare_digest(hashlib.sha256(secret).digest(), hashlib.sha256(b"").digest())
            return
        await session.cancel_if(secret)

    async def cancel_backend(self, target: UpstreamTarget, pid: int, secret: bytes) -> None:
        await send_cancel(target, pid, secret)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- shutdown ----------------------------------------------------------------------------
    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting; idle sessions end now, sessions in a transaction when it ends or
        at the deadline; then every server connection is closed."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.stopping = True
        if self._server is not None:
            self._server.close()
        routing = list(self._routing)
        for task in routing:
            task.cancel()  # connections still without a first byte or a TLS handshake
        if routing:
            await asyncio.wait(routing, timeout=5)
        for s in list(self.sessions):
            s.wake()
        tasks = [s.task for s in self.sessions if s.task is not None and not s.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for s in list(self.sessions):
                if s.transport is not None and not s.transport.is_closing():
                    from sqlproxy.protocol.errors import fatal_response

                    s.transport.write(
                        fatal_response("57P01", "terminating connection due to administrator command")
                    )
                if s.task is not None and not s.task.done():
                    s.task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for pool in self.pools.values():
            await pool.close()
        for t in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 5)
