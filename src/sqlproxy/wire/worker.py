"""A wire worker process (``[wire] workers`` > 1): serves PostgreSQL wire clients on the shared
port and hands everything that must be one for the whole proxy to the proxy's process over its
channel (:mod:`sqlproxy.wire.channel`):

- audit records, in batches, to be sealed into the one chain (this process holds no chain key
  and no store);
- authentication failures, counted by the proxy's lockout table, which tells every worker when a
  key is locked (a client must not get ``workers`` times the attempts);
- CancelRequests for another worker's clients (the process id in BackendKeyData names the worker);
- its metrics, once a second, for the proxy's ``/metrics``.

It receives its configuration from the proxy (and every reload after), locks, cancels and the
order to stop. When the proxy's process goes away the worker stops as if told to.

Started by :class:`sqlproxy.wire.workers.WireWorkers` as
``python -m sqlproxy.wire.worker FD INDEX COUNT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from sqlproxy.audit.record import AuditRecord
from sqlproxy.auth.lockout import Lockout
from sqlproxy.config.loader import ConfigHolder
from sqlproxy.config.models import ProxyConfig
from sqlproxy.gctune import tune_gc
from sqlproxy.runtime import Runtime
from sqlproxy.wire.channel import HIGH_WATER, Channel, ChannelClosed
from sqlproxy.wire.listener import WireServer, WorkerSlot

log = logging.getLogger("sqlproxy.worker")

METRICS_EVERY_S = 1.0


class AuditForwarder:
    """The worker's audit queue: records go to the proxy's writer in batches, at most
    ``LINGER_S`` after the first of a batch came (a frame per record would cost a system call
    and a wake-up of the proxy's process each). Not lossy: past ``HIGH_WATER`` bytes not yet
    taken by the proxy, ``try_enqueue`` refuses and ``enqueue`` waits, as the writer's own queue
    does when full; the worker's shutdown sends what is left."""

    LINGER_S = 0.005
    BATCH = 256

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._batch: list[AuditRecord] = []
        self._timer: asyncio.TimerHandle | None = None
        self.forwarded = 0

    def try_enqueue(self, record: AuditRecord) -> bool:
        if self._channel.buffered > HIGH_WATER:
            return False
        batch = self._batch
        batch.append(record)
        if len(batch) == 1:
            self._timer = asyncio.get_running_loop().call_later(self.LINGER_S, self._send)
        elif len(batch) >= self.BATCH:
            self._send()
        return True

    async def enqueue(self, record: AuditRecord) -> None:
        while not self.try_enqueue(record):
            await self._channel.drain()

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if batch:
            self._channel.send(("audit", batch))
            self.forwarded += len(batch)

    async def flush(self) -> None:
        self._send()
        with contextlib.suppress(ChannelClosed):
            await self._channel.drain()


class SharedLockout(Lockout):
    """This worker's lockout table, which also reports every failure (and success) to the
    proxy's process; the proxy counts them over all workers and its HTTP door and sends back
    the locks (``lock_for``)."""

    def __init__(self, channel: Channel, threshold: int, window_s: float, duration_s: float) -> None:
        super().__init__(threshold, window_s, duration_s)
        self._channel = channel

    def record_failure(self, key: str) -> bool:
        self._channel.send(("auth_failure", key))
        return super().record_failure(key)

    def reset(self, key: str) -> None:
        self._channel.send(("auth_reset", key))
        super().reset(key)


class WorkerRuntime(Runtime):
    def __init__(self, holder: ConfigHolder, env: Mapping[str, str], channel: Channel, count: int) -> None:
        self.channel = channel
        self.forwarder = AuditForwarder(channel)
        super().__init__(holder, env, audit_queue=self.forwarder)
        # Alone, each worker holds 1/N of every limit (the kernel spreads clients evenly); with
        # distributed rate limiting each worker is a node of the cluster.
        self.rate_limiter.alone_share = 1.0 / count

    def _new_lockout(self, config: ProxyConfig) -> Lockout | None:
        a = config.auth
        return SharedLockout(self.channel, a.lockout_threshold, a.lockout_window_s, a.lockout_duration_s)

    async def close(self) -> None:
        await super().close()
        await self.forwarder.flush()  # what the last sessions audited


async def _metrics_loop(rt: WorkerRuntime) -> None:
    while True:
        await asyncio.sleep(METRICS_EVERY_S)
        rt.refresh_gauges()
        rt.channel.send(("metrics", rt.metrics.snapshot()))


async def run(fd: int, index: int, count: int) -> int:
    sock = socket.socket(fileno=fd)
    channel = await Channel.open(sock)
    start = await channel.recv()
    if start[0] != "start":
        log.error("worker %d: expected the start message, got %r", index, start[0])
        return 2
    config: ProxyConfig = start[1]
    port: int = start[2]
    holder = ConfigHolder(config, None)
    rt = WorkerRuntime(holder, os.environ, channel, count)
    slot = WorkerSlot(index, count, lambda pid, secret: channel.send(("cancel", pid, secret)))
    try:
        await rt.start()
        wire = WireServer(rt, port=port, worker=slot)
        await wire.start()
    except Exception as e:
        log.exception("worker %d could not start", index)
        channel.send(("failed", f"{type(e).__name__}: {e}"))
        with contextlib.suppress(ChannelClosed):
            await channel.drain()
        return 1
    tune_gc()
    channel.send(("ready", wire.bound_port, os.getpid()))

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[float] = loop.create_future()

    def stop_now(grace: float) -> None:
        if not stop.done():
            stop.set_result(grace)

    loop.add_signal_handler(signal.SIGTERM, lambda: stop_now(holder.current.wire.shutdown_grace_s))
    tasks: set[asyncio.Task[Any]] = set()

    async def receive() -> None:
        while True:
            try:
                msg = await channel.recv()
            except ChannelClosed as e:
                log.warning("worker %d: the proxy's process has gone (%r); stopping", index, e.__cause__ or e)
                stop_now(holder.current.wire.shutdown_grace_s)
                return
            kind = msg[0]
            if kind == "config":
                try:
                    rt.replace_config(msg[1])
                except Exception:
                    log.exception("worker %d: configuration refused", index)
            elif kind == "lock":
                rt.users.lockout.lock_for(msg[1], msg[2])
            elif kind == "cancel":
                task = loop.create_task(wire.cancel(msg[1], msg[2]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "stop":
                stop_now(float(msg[1]))
                return

    receiver = loop.create_task(receive())
    metrics = loop.create_task(_metrics_loop(rt))
    grace = await stop
    metrics.cancel()
    await wire.stop(grace)
    await rt.close()
    rt.refresh_gauges()
    channel.send(("metrics", rt.metrics.snapshot()))  # the last of this worker's counts
    receiver.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receiver
    with contextlib.suppress(ChannelClosed):
        await channel.drain()  # all of it sent before the process ends
    channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, index, count = (int(a) for a in args)
    # Ctrl-C in a terminal reaches the whole process group: the proxy's process stops the
    # workers itself, after the clients' transactions (see WireWorkers.stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("SQLPROXY_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s",
    )
    import uvloop

    return uvloop.run(run(fd, index, count))


if __name__ == "__main__":
    sys.exit(main())
