"""Server connections per database, shared by the wire sessions.

A connection comes back with :meth:`BackendPool.release`. When its session left state behind
that another client must not inherit (LISTEN, SQL-level PREPARE, temporary tables, a pinned
session's settings) it is reset with ``DISCARD ALL`` first, and only then handed to the next
waiter. A connection that broke, or was returned mid-query, is closed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from sqlproxy.pipeline.errors import UpstreamUnavailable
from sqlproxy.tcp import TcpOptions
from sqlproxy.wire.backend import BackendConnection, UpstreamTarget, connect_backend
from sqlproxy.wire.pump import HIDDEN, Exp, PumpOwner, ResponsePump

log = logging.getLogger(__name__)

# A connection idle for longer than this is checked for pending input before it is handed out
# (one poll system call); busier ones were just in use and are not.
_CHECK_AFTER_IDLE_S = 0.05


class _PoolOwner(PumpOwner):
    """Owns a connection while it is idle or being reset: forwards nothing, and tells the pool
    when the server goes away so the slot is freed at once."""

    def __init__(self, pool: BackendPool, be: BackendConnection) -> None:
        self.pool = pool
        self.be = be

    def backend_lost(self) -> None:
        self.pool._forget(self.be)


class BackendPool:
    def __init__(
        self,
        name: str,
        target: UpstreamTarget,
        size: int,
        connect_timeout: float,
        *,
        tcp: TcpOptions | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.size = size
        self.connect_timeout = connect_timeout
        self.tcp = tcp
        # Server connections that went away without the proxy closing them (the server closed
        # them, or the kernel gave up on a dead peer), dropped and never reused; on_lost is
        # told of each (the metrics counter).
        self.lost = 0
        self._on_lost = on_lost
        self.idle: deque[BackendConnection] = deque()
        self.total = 0  # open, opening or resetting
        self._waiters: deque[asyncio.Future[BackendConnection | None]] = deque()
        self._all: set[BackendConnection] = set()
        self.closed = False
        # The ParameterStatus values a client is told at login, by the startup settings that
        # shape them (application_name aside): learnt from the first login with those settings,
        # so later logins need no server connection (a pool held by open transactions must not
        # keep new clients from logging in).
        self.reported: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    @property
    def in_use(self) -> int:
        return self.total - len(self.idle)

    def take_idle(self) -> BackendConnection | None:
        """An idle connection, most recently used first (its caches are warm), or None.

        A connection idle for a while is checked first: an idle server connection has nothing
        to say, so anything waiting to be read on it (PostgreSQL's FATAL and end of stream
        after pg_terminate_backend, idle_session_timeout or a restart) means it is gone, even
        if the event loop has not read that yet. It is dropped and the next one tried."""
        if self.closed:
            return None
        idle = self.idle
        now = time.monotonic()
        while idle:
            be = idle.pop()
            if not be.closed and (now - be.idle_since < _CHECK_AFTER_IDLE_S or not be.has_input()):
                return be
            if not be.closed and be.lost_reason is None:
                be.lost_reason = "closed by the server while idle"
            self.discard(be)
        return None

    async def acquire(self) -> BackendConnection:
        while True:
            if self.closed:
                raise UpstreamUnavailable("the proxy is shutting down")
            be = self.take_idle()
            if be is not None:
                return be
            if self.total < self.size:
                self.total += 1
                try:
                    be = await connect_backend(self.target, self.connect_timeout, self.tcp)
                except BaseException:
                    self.total -= 1
                    self._wake_one()
                    raise
                be.pump = ResponsePump(be)
                self._all.add(be)
                return be
            fut: asyncio.Future[BackendConnection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    handed = fut.result()
                    if handed is not None:
                        self.release(handed)
                raise
            if got is not None:
                return got
            # None: a slot freed up (a connection closed); try again.

    def release(self, be: BackendConnection, *, reset: bool = False) -> None:
        pump = be.pump
        if be.closed or pump is None or pump.pending or pump.status != "I" or self.closed:
            self.discard(be)
            return
        be.attach_client(None)
        if reset or be.dirty:
            be.dirty = False
            be.settings_key = None
            be.prepared.clear()
            be.unnamed_owner = None
            pump.owner = _PoolOwner(self, be)
            pump.expect(Exp(HIDDEN, lambda _e: self._put_back(be)))
            be.write(b"Q\x00\x00\x00\x10DISCARD ALL\x00")
            return
        self._put_back(be)

    def _put_back(self, be: BackendConnection) -> None:
        if be.closed or self.closed:
            self.discard(be)
            return
        if be.pump is not None:
            be.pump.owner = _PoolOwner(self, be)
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(be)
                return
        be.idle_since = time.monotonic()
        self.idle.append(be)

    def discard(self, be: BackendConnection) -> None:
        be.close()
        self._forget(be)

    def _forget(self, be: BackendConnection) -> None:
        if be in self._all:
            self._all.discard(be)
            self.total -= 1
            if be.lost_reason is not None and not self.closed:
                self.lost += 1
                log.info("server connection %s to %s lost: %s", be.pid, self.name, be.lost_reason)
                if self._on_lost is not None:
                    self._on_lost()
            with contextlib.suppress(ValueError):
                self.idle.remove(be)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def close(self) -> None:
        self.closed = True
        for be in list(self._all):
            be.close()
        self._all.clear()
        self.idle.clear()
        self.total = 0
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
