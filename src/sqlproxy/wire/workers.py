"""The wire door as worker processes (``[wire] workers`` > 1), seen from the proxy's process.

Each worker (:mod:`sqlproxy.wire.worker`) binds the wire port with SO_REUSEPORT, so the kernel
spreads new client connections over them and the door can use as many CPUs as there are
workers.
What must be one for the whole proxy stays here: the audit chain (workers send their records,
this process seals them in arrival order, exactly as its own), the lockout table (failures from
every worker and the HTTP door count together; a lock is sent to every worker), the
configuration (a reload here is sent to every worker), cancel routing between workers, and
``/metrics`` (workers send theirs once a second).

A worker that dies is started again (its clients' connections are gone with it, as with a
PostgreSQL backend that crashed). A worker killed outright loses the audit records it had not
sent yet: those of its last few milliseconds (``AuditForwarder.LINGER_S``), as the proxy's own
process killed outright loses its writer's queue. A worker that stops (told to, SIGTERM, or its
proxy gone) sends every record first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlproxy.config.loader import Commit
from sqlproxy.config.models import ProxyConfig
from sqlproxy.runtime import Runtime
from sqlproxy.wire.channel import Channel, ChannelClosed
from sqlproxy.wire.listener import MAX_WORKERS, load_mock_secret, worker_of
from sqlproxy.wire.tls import make_ssl_context

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 30.0


class WorkerStartError(RuntimeError):
    pass


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    pid: int
    task: asyncio.Task[None] | None = None


class WireWorkers:
    def __init__(self, runtime: Runtime, count: int, env: Mapping[str, str] | None = None) -> None:
        if not 1 < count <= MAX_WORKERS:
            raise ValueError(f"workers must be between 2 and {MAX_WORKERS}")
        self.runtime = runtime
        self.count = count
        self._env = {**os.environ, **(env if env is not None else runtime.env)}
        self.port = runtime.config.current.wire.port
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.restarts = 0
        self.cancels_routed = 0
        self._restarting: set[asyncio.Task[None]] = set()
        self._listening = False

    @property
    def bound_port(self) -> int:
        return self.port

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        # Files every worker reads: made here first, so that workers never race to create them.
        load_mock_secret(self.runtime)
        if not self._listening:
            # Before the first worker: a reload while the others start reaches it too (the
            # ones started later read the configuration as it is then).
            self._listening = True
            self.runtime.config.on_change(self._on_config_change)
        # Before the first worker too: failures from it while the others start can lock.
        self._watch_lockout()
        try:
            # The first worker binds (port 0: the kernel picks one); the others join its port.
            for i in range(self.count):
                w = await self._spawn(i)
                self.workers[i] = w
        except BaseException:
            await self.stop(0)
            raise
        log.info("wire door listening on %s:%s with %d worker processes", self._host, self.port, self.count)

    @property
    def _host(self) -> str:
        return self.runtime.config.current.wire.host

    async def _spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc: asyncio.subprocess.Process | None = None
        channel: Channel | None = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sqlproxy.wire.worker",
                str(child.fileno()),
                str(index),
                str(self.count),
                pass_fds=(child.fileno(),),
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
            )
            channel = await Channel.open(parent)
            channel.send(("start", self.runtime.config.current, self.port))
            try:
                msg = await asyncio.wait_for(channel.recv(), START_TIMEOUT_S)
            except (TimeoutError, ChannelClosed) as e:
                raise WorkerStartError(f"wire worker {index} did not start") from e
            if msg[0] != "ready":
                raise WorkerStartError(
                    f"wire worker {index} could not start: {msg[1] if len(msg) > 1 else msg}"
                )
        except BaseException:
            # Never leave a half-started worker behind (a failure, a timeout, or a stop
            # cancelling a restart).
            if channel is not None:
                channel.close()
            else:
                parent.close()
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
            raise
        finally:
            child.close()
        self.port = int(msg[1])
        w = _Worker(index=index, process=proc, channel=channel, pid=int(msg[2]))
        # Locks decided before this worker started (it replaces one that died, say).
        for key, seconds in self.runtime.users.lockout.active_locks():
            channel.send(("lock", key, seconds))
        w.task = asyncio.get_running_loop().create_task(self._serve(w), name=f"wire-worker-{index}")
        return w

    async def stop(self, grace_s: float | None = None) -> None:
        """Tell every worker to stop (each lets its clients' transactions finish up to the grace
        period, as the in-process door does), then take the last of their audit records."""
        grace = self.runtime.config.current.wire.shutdown_grace_s if grace_s is None else grace_s
        self.stopping = True
        for t in list(self._restarting):
            t.cancel()
        workers = list(self.workers.values())
        for w in workers:
            w.channel.send(("stop", grace))
        for w in workers:
            try:
                await asyncio.wait_for(w.process.wait(), grace + 15)
            except TimeoutError:
                log.error("wire worker %d did not stop in time; killed", w.index)
                with contextlib.suppress(ProcessLookupError):
                    w.process.kill()
                await w.process.wait()
        for w in workers:
            if w.task is not None:
                # Reads to the end of the channel: every record the worker sent is queued.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.task, 15)
            w.channel.close()

    # -- messages from a worker -----------------------------------------------------------------
    async def _serve(self, w: _Worker) -> None:
        rt = self.runtime
        audit = rt.audit
        try:
            while True:
                msg = await w.channel.recv()
                kind = msg[0]
                if kind == "audit":
                    for record in msg[1]:
                        if not audit.try_enqueue(record):
                            await audit.enqueue(record)
                elif kind == "auth_failure":
                    self._auth_failure(msg[1])
                elif kind == "auth_reset":
                    rt.users.lockout.reset(msg[1])
                elif kind == "cancel":
                    self._route_cancel(w, msg[1], msg[2])
                elif kind == "metrics":
                    rt.metrics.update_source(("wire-worker", w.index), msg[1])
                else:
                    log.warning("wire worker %d sent an unknown message %r", w.index, kind)
        except ChannelClosed:
            pass
        except Exception:
            # A message this process cannot take: the worker is replaced rather than left
            # running unheard (its records would pile up unread).
            log.exception("wire worker %d: bad message; stopping it", w.index)
            with contextlib.suppress(ProcessLookupError):
                w.process.kill()
        finally:
            rt.metrics.retire_source(("wire-worker", w.index))
        code = await w.process.wait()
        if self.stopping:
            return
        log.error("wire worker %d (pid %d) exited with code %s; starting it again", w.index, w.pid, code)
        task = asyncio.get_running_loop().create_task(self._restart(w.index))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, index: int) -> None:
        delay = _RESTART_MIN_S
        while not self.stopping:
            await asyncio.sleep(delay)
            try:
                self.workers[index] = await self._spawn(index)
                self.restarts += 1
                self.runtime.metrics.wire_worker_restarts.inc()
                return
            except (WorkerStartError, OSError) as e:
                log.error("%s; trying again in %.1f s", e, delay)
                delay = min(delay * 2, _RESTART_MAX_S)

    def _auth_failure(self, key: str) -> None:
        self.runtime.users.lockout.record_failure(key)

    def _watch_lockout(self) -> None:
        # Locks decided here, on failures from any worker or the HTTP door, go to every worker.
        # A reload that changes [auth] makes a new table: watched again from the change on.
        lockout = self.runtime.users.lockout
        if lockout.on_lock is None:
            lockout.on_lock = self._broadcast_lock

    def _broadcast_lock(self, key: str, seconds: float) -> None:
        for w in self.workers.values():
            w.channel.send(("lock", key, seconds))

    def _route_cancel(self, sender: _Worker, pid: int, secret: bytes) -> None:
        target = self.workers.get(worker_of(pid))
        if target is None or target is sender:
            return  # no such worker: a CancelRequest for no one, ignored as PostgreSQL does
        self.cancels_routed += 1
        target.channel.send(("cancel", pid, secret))

    def _on_config_change(self, old: ProxyConfig, new: ProxyConfig) -> Commit | None:
        """A reload: checked here as a worker would (the TLS files are loaded: a file that
        cannot be loaded refuses the reload, naming its key), sent to the workers only once
        every listener has accepted it."""
        if self.stopping:
            return None
        make_ssl_context(new.wire, self.runtime._state_path)

        def commit() -> None:
            self._watch_lockout()  # the runtime's commit ran first: its lockout table is in place
            for w in self.workers.values():
                w.channel.send(("config", new))

        return commit

    def status(self) -> dict[str, Any]:
        """For /health: how many workers run (one being replaced does not), restarts so far."""
        return {
            "workers": self.count,
            "running": sum(1 for w in self.workers.values() if w.process.returncode is None),
            "restarts": self.restarts,
            "cancels_routed": self.cancels_routed,
        }
