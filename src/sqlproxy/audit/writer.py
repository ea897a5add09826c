"""The audit writer: seals records into the chain in submission order and drains them to the
store and the sinks in the background.

``enqueue`` is cheap (an append) so audit adds little to a request: the drain task seals the
records into the chain in queue order, a batch at a time, and writes them. ``submit`` does the
same and seals at once, for a caller that wants the sealed record back. Neither is lossy: when
``queue_size`` records are accepted and not yet written, both wait. A failing sink is
retried with backoff and keeps its records, so a broken disk turns into back-pressure on
requests rather than unaudited traffic. Records are written to the store first (it is what a
restart resumes from), then to each sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from sqlproxy.audit.chain import Chain, ChainState
from sqlproxy.audit.record import AuditRecord, escaped_record
from sqlproxy.audit.sink_process import SinkProcess, Spec, process_spec, wait_for_writers
from sqlproxy.audit.sinks import AuditStore, CatchUpSink, Sink, thread_writer

log = logging.getLogger(__name__)

Listener = Callable[[Sequence[AuditRecord]], None]


class AuditQueue(Protocol):
    """Where the doors hand their audit records: the writer itself, or in a wire worker process
    the forwarder that passes them to the proxy's writer (sqlproxy.wire.worker)."""

    def try_enqueue(self, record: AuditRecord) -> bool: ...

    async def enqueue(self, record: AuditRecord) -> None: ...


class AuditWriter:
    def __init__(
        self,
        sinks: Sequence[Sink],
        store: AuditStore,
        key: bytes,
        queue_size: int = 10_000,
        batch_size: int = 500,
        *,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        linger_s: float = 0.01,
        sink_process: SinkProcess | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        self.sinks = list(sinks)
        self.store = store
        self._key = key
        self.queue_size = queue_size
        self.batch_size = batch_size
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        # How long the drain waits for a small batch to grow before writing it: every batch is
        # a transaction and an fsync per target, so writing 100 records at once costs a third
        # of the CPU per record that writing them 10 at a time does.
        self._linger_s = linger_s
        # When given, the SQLite store and the JSONL files are written by a child process (see
        # sink_process) instead of a worker thread of this one.
        self._process = sink_process
        self._chain: Chain | None = None
        # Accepted and not yet sealed (in queue order), then sealed and not yet taken by the drain.
        # Each with whether the writer owns the object (enqueue: sealed in place, no copy).
        self._unsealed: deque[tuple[AuditRecord, bool]] = deque()
        self._pending: deque[AuditRecord] = deque()
        self._inflight = 0
        # Set when there is work for the drain task (cheaper than waking it through _cond on
        # every record: set() on a set event is a no-op).
        self._work = asyncio.Event()
        self._written_seq = 0
        self._cond = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._listeners: list[Listener] = []
        # Counters for metrics.
        self.written = 0
        self.failures = 0

    # -- state
    @property
    def queue_depth(self) -> int:
        """Records accepted and not yet written everywhere."""
        return len(self._unsealed) + len(self._pending) + self._inflight

    @property
    def head(self) -> ChainState:
        """The chain head as sealed (may be ahead of what is written); seals what is queued."""
        if self._chain is None:
            raise RuntimeError("audit writer not started")
        self._seal_queued()
        return self._chain.state

    @property
    def written_seq(self) -> int:
        return self._written_seq

    # -- lifecycle
    async def start(self) -> None:
        if self._task is not None:
            return
        if self._process is not None:
            specs = [spec for t in [self.store, *self.sinks] if (spec := process_spec(t)) is not None]
            await asyncio.to_thread(wait_for_writers, specs)
        state = await self._resume_state()
        self._chain = Chain(self._key, state)
        self._written_seq = state.seq
        await self._catch_up_sinks(state)
        if self._process is not None:
            # The child writes these from now on: this process keeps no file of theirs open
            # (the child rotates the JSONL files). The store stays open here for reading.
            for sink in self.sinks:
                if process_spec(sink) is not None:
                    await sink.close()
        self._task = asyncio.create_task(self._drain(), name="audit-writer")

    async def _resume_state(self) -> ChainState:
        head = await self.store.head()
        last = await self.store.last()
        if head is None and last is None:
            return ChainState.genesis()
        if head is None:
            assert last is not None
            log.error("audit store has records but no chain head; resuming after seq %d", last.seq)
            return ChainState(last.seq, last.hash)
        if last is None or last.seq < head.seq:
            # Records were removed behind the head's back. Continuing from the head keeps the
            # hole visible to verify instead of papering over it with reused seqs.
            log.error(
                "audit store: chain head is at seq %d but the last record is %s",
                head.seq,
                None if last is None else last.seq,
            )
            return head
        if last.seq > head.seq:
            # Resuming from the head would reuse seqs that exist; continue after the last record.
            log.error("audit store: records beyond the chain head (head %d, last %d)", head.seq, last.seq)
            return ChainState(last.seq, last.hash)
        if last.hash != head.head_hash:
            log.error("audit store: chain head hash differs from the last record (seq %d)", head.seq)
        return head

    async def _catch_up_sinks(self, state: ChainState) -> None:
        for sink in self.sinks:
            if not isinstance(sink, CatchUpSink):
                continue
            got = await sink.last_seq()
            if got is None or got == state.seq:
                continue
            if got > state.seq:
                log.error(
                    "audit sink %r is ahead of the store (seq %d > %d); the store lost records",
                    sink,
                    got,
                    state.seq,
                )
                continue
            # A crash between the store commit and the sink write: replay the difference.
            after = got
            while True:
                page = await self.store.get_after(after, self.batch_size)
                if not page:
                    break
                await self._write_with_retry(sink, page)
                after = page[-1].seq
            log.warning("audit sink %r caught up from seq %d to %d", sink, got, after)

    async def flush(self) -> None:
        """Wait until every record submitted before this call is written everywhere."""
        if self._chain is None:
            return
        target = self._chain.state.seq + len(self._unsealed)
        async with self._cond:
            await self._cond.wait_for(lambda: self._written_seq >= target)

    async def close(self) -> None:
        """Flush, stop the drain task and close the store and sinks. Waits for a failing sink
        for as long as it takes; wrap in ``asyncio.timeout`` to bound a shutdown."""
        if self._closed:
            return
        if self._task is not None:
            async with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._work.set()
            await self._task
        self._closed = True
        if self._process is not None:
            await self._process.close()
        for s in [self.store, *self.sinks]:
            try:
                await s.close()
            except Exception:
                log.exception("audit: closing %r failed", s)

    # -- submitting
    async def enqueue(self, record: AuditRecord) -> None:
        """Queue ``record`` to be sealed as the next in the chain and written. The writer takes
        the record over: it is sealed in place (its seq and hashes set), not copied, so the
        caller must not hand the same object in again.

        Waits while the queue is full. The check and the append have no await between them, so
        queue order is seq order and a cancelled wait leaves no hole in the chain.
        """
        await self._wait_for_room()
        self._unsealed.append((record, not record.hash))
        self._work.set()

    def try_enqueue(self, record: AuditRecord) -> bool:
        """``enqueue`` without waiting: False (and nothing queued) when the queue is full.
        Raises like ``enqueue`` when the writer is not running."""
        if self._chain is None or self._closing:
            raise RuntimeError("audit writer is not running")
        if self.queue_depth >= self.queue_size:
            return False
        self._unsealed.append((record, not record.hash))
        self._work.set()
        return True

    async def submit(self, record: AuditRecord) -> AuditRecord:
        """Like ``enqueue``, and seal a copy of ``record`` (with everything queued before it) at
        once; return the sealed copy."""
        await self._wait_for_room()
        self._unsealed.append((record, False))
        self._work.set()
        self._seal_queued()
        return self._pending[-1]

    async def _wait_for_room(self) -> None:
        # No await between the caller's return from here and its append.
        if self._chain is None or self._closing:
            raise RuntimeError("audit writer is not running")
        if self.queue_depth >= self.queue_size:
            async with self._cond:
                await self._cond.wait_for(lambda: self.queue_depth < self.queue_size or self._closing)
                if self._closing:
                    raise RuntimeError("audit writer is closing")

    def _seal_queued(self, limit: int | None = None) -> None:
        """Seal queued records in order (at most ``limit`` of them)."""
        chain = self._chain
        assert chain is not None
        unsealed, pending = self._unsealed, self._pending
        n = len(unsealed) if limit is None else min(limit, len(unsealed))
        for _ in range(n):
            record, owned = unsealed.popleft()
            try:
                sealed = chain.append(record, in_place=owned)
            except (ValueError, TypeError) as e:
                # Text the JSON encoding refuses (a lone surrogate from a client): the record is
                # kept with that text escaped rather than lost, and the drain task lives on.
                log.error("audit record %s could not be encoded (%s); storing it escaped", record.id, e)
                sealed = chain.append(escaped_record(record))
            pending.append(sealed)

    # -- listeners
    def add_listener(self, cb: Listener) -> None:
        """``cb(records)`` runs on the event loop after each batch is written; it must not block
        (hand off to its own bounded queue and mark itself lagging if that fills)."""
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    # -- draining
    async def _drain(self) -> None:
        while True:
            if not (self._pending or self._unsealed):
                if self._closing:
                    return  # closing and everything written
                self._work.clear()
                await self._work.wait()
                continue
            if self._linger_s > 0 and not self._closing and self.queue_depth < self.batch_size:
                await asyncio.sleep(self._linger_s)
            self._seal_queued(self.batch_size - len(self._pending))
            n = min(self.batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(n)]
            self._inflight = n
            await self._write_everywhere(batch)
            async with self._cond:
                self._inflight = 0
                self.written += len(batch)
                self._written_seq = batch[-1].seq
                self._cond.notify_all()
            for cb in list(self._listeners):
                try:
                    cb(batch)
                except Exception:
                    log.exception("audit listener %r failed", cb)

    async def _write_everywhere(self, batch: Sequence[AuditRecord]) -> None:
        """``batch`` to the store, then to each sink in order, each retried until it succeeds.
        Consecutive targets that write in a worker thread anyway (``thread_writer``) are written
        in one hop to the thread, not one each."""
        targets: list[Sink] = [self.store, *self.sinks]
        i = 0
        delay = self._retry_initial_s
        while i < len(targets):
            specs = self._process_specs(targets[i:])
            if specs:
                assert self._process is not None
                done, exc = await self._process.write(specs, batch)
                i, delay = await self._after_group(targets, batch, i, done, exc, delay)
                continue
            fns = []
            for t in targets[i:]:
                fn = thread_writer(t)
                if fn is None:
                    break
                fns.append(fn)
            if not fns:
                await self._write_with_retry(targets[i], batch)
                i += 1
                delay = self._retry_initial_s
                continue
            done, exc = await asyncio.to_thread(_write_in_order, fns, batch)
            i, delay = await self._after_group(targets, batch, i, done, exc, delay)

    def _process_specs(self, targets: Sequence[Sink]) -> list[Spec]:
        """The specs of the leading run of ``targets`` the child process can write."""
        specs: list[Spec] = []
        if self._process is None:
            return specs
        for t in targets:
            spec = process_spec(t)
            if spec is None:
                break
            specs.append(spec)
        return specs

    async def _after_group(
        self,
        targets: Sequence[Sink],
        batch: Sequence[AuditRecord],
        i: int,
        done: int,
        exc: Exception | None,
        delay: float,
    ) -> tuple[int, float]:
        """After writing a group of targets from ``i``: where to go on, and the retry delay
        (slept here when one failed)."""
        if done:
            i += done
            delay = self._retry_initial_s
        if exc is not None:
            self.failures += 1
            log.error(
                "audit: writing seq %d..%d to %r failed; retrying in %.2fs",
                batch[0].seq,
                batch[-1].seq,
                targets[i],
                delay,
                exc_info=exc,
            )
            await asyncio.sleep(delay)
            delay = self._next_delay(delay)
        return i, delay

    def _next_delay(self, delay: float) -> float:
        return min(self._retry_max_s, max(delay * 2, 0.001)) if delay else 0.0

    async def _write_with_retry(self, target: Sink, batch: Sequence[AuditRecord]) -> None:
        delay = self._retry_initial_s
        while True:
            try:
                await target.write_batch(batch)
                return
            except Exception:
                self.failures += 1
                log.exception(
                    "audit: writing seq %d..%d to %r failed; retrying in %.2fs",
                    batch[0].seq,
                    batch[-1].seq,
                    target,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = self._next_delay(delay)


def _write_in_order(
    fns: Sequence[Callable[[Sequence[AuditRecord]], None]], batch: Sequence[AuditRecord]
) -> tuple[int, Exception | None]:
    """Run each of ``fns`` on ``batch`` in order until one fails: how many succeeded, and the
    failure."""
    for done, fn in enumerate(fns):
        try:
            fn(batch)
        except Exception as e:
            return done, e
    return len(fns), None
