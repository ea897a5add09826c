"""The audit writer: ordering, back-pressure, retries, restarts, catch-up and listeners."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest

from sqlproxy.audit.chain import ChainState
from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import JsonlSink, SqliteStore
from sqlproxy.audit.verify import verify_store
from sqlproxy.audit.writer import AuditWriter
from tests.audit_checks import verify_trail

KEY = bytes.fromhex("33" * 32)


def rec(n: int = 0, **kw: object) -> AuditRecord:
    base: dict[str, object] = {
        "user": "carol",
        "roles": [],
        "source": "127.0.0.1",
        "door": "ws",
        "sql": f"SELECT {n}",
        "decision": "allow",
        "duration_ms": 2.0,
    }
    base.update(kw)
    return AuditRecord.new(**base)  # type: ignore[arg-type]


class GateSink:
    """Blocks every write until the test opens the gate; records what it got."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.got: list[AuditRecord] = []

    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        self.entered.set()
        await self.gate.wait()
        self.got.extend(records)

    async def close(self) -> None:
        pass


class FlakySink:
    """Fails its first ``failures`` writes, then works."""

    def __init__(self, failures: int) -> None:
        self.left = failures
        self.got: list[AuditRecord] = []
        self.calls = 0

    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise OSError("disk full")
        self.got.extend(records)

    async def close(self) -> None:
        pass


def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "audit.db", tmp_path / "audit.jsonl"


def make_writer(tmp_path: Path, *, jsonl: bool = True, **kw: int) -> AuditWriter:
    db, jl = paths(tmp_path)
    sinks = [JsonlSink(jl, rotate_bytes=4096, keep_files=100)] if jsonl else []
    return AuditWriter(
        sinks=sinks,
        store=SqliteStore(db),
        key=KEY,
        queue_size=kw.get("queue_size", 100),
        batch_size=kw.get("batch_size", 8),
    )


async def full_check(tmp_path: Path, expected: int) -> None:
    await verify_trail(*paths(tmp_path), KEY, expected)


async def test_submit_seals_in_order_and_flush_makes_durable(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    await w.start()
    out = await asyncio.gather(*(w.submit(rec(i)) for i in range(30)))
    assert [r.seq for r in out] == list(range(1, 31))
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(out))
    await w.flush()
    assert w.queue_depth == 0 and w.written == 30 and w.failures == 0
    assert await w.store.get_after(0, 100) == out
    await w.close()
    await full_check(tmp_path, 30)


async def test_chain_continues_across_restart(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    await w.start()
    first = [await w.submit(rec(i)) for i in range(5)]
    await w.close()

    w2 = make_writer(tmp_path)
    await w2.start()
    assert w2.head == ChainState(5, first[-1].hash)
    nxt = await w2.submit(rec(99))
    assert nxt.seq == 6 and nxt.prev_hash == first[-1].hash
    for i in range(10):
        await w2.submit(rec(100 + i))
    await w2.close()
    await full_check(tmp_path, 16)


async def test_full_queue_makes_submit_wait_and_drops_nothing(tmp_path: Path) -> None:
    gate = GateSink()
    w = AuditWriter(sinks=[gate], store=SqliteStore(tmp_path / "a.db"), key=KEY, queue_size=2, batch_size=1)
    await w.start()
    await w.submit(rec(1))
    await gate.entered.wait()  # the drain task holds seq 1 inside the blocked sink
    await w.submit(rec(2))
    assert w.queue_depth == 2

    started = asyncio.Event()

    async def third() -> AuditRecord:
        started.set()
        return await w.submit(rec(3))

    task = asyncio.create_task(third())
    # set() wakes us only after the task has run on to its first suspension, i.e. the wait
    # for queue space inside submit.
    await started.wait()
    assert not task.done()
    assert w.head.seq == 2  # not sealed yet, so not dropped either
    assert w.queue_depth == 2

    gate.gate.set()
    r3 = await task
    assert r3.seq == 3
    await w.flush()
    assert [r.seq for r in gate.got] == [1, 2, 3]
    assert [r.seq for r in await w.store.get_after(0)] == [1, 2, 3]
    await w.close()


async def test_cancelled_wait_leaves_no_hole_in_the_chain(tmp_path: Path) -> None:
    gate = GateSink()
    store = SqliteStore(tmp_path / "a.db")
    w = AuditWriter(sinks=[gate], store=store, key=KEY, queue_size=1, batch_size=1)
    await w.start()
    await w.submit(rec(1))
    await gate.entered.wait()
    started = asyncio.Event()

    async def waiting() -> AuditRecord:
        started.set()
        return await w.submit(rec(2))

    task = asyncio.create_task(waiting())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.gate.set()
    r = await w.submit(rec(3))
    assert r.seq == 2
    await w.close()
    reopened = SqliteStore(tmp_path / "a.db")
    try:
        report = await verify_store(reopened, KEY)
    finally:
        await reopened.close()
    assert report.ok and report.records == 2


async def test_failing_sink_is_retried_and_keeps_its_records(tmp_path: Path) -> None:
    flaky = FlakySink(failures=3)
    w = AuditWriter(
        sinks=[flaky],
        store=SqliteStore(tmp_path / "a.db"),
        key=KEY,
        queue_size=50,
        batch_size=50,
        retry_initial_s=0.0,
    )
    await w.start()
    sent = [await w.submit(rec(i)) for i in range(7)]
    await w.flush()
    assert flaky.got == sent
    assert w.failures == 3 and w.written == 7
    await w.close()


async def test_failing_store_retry_does_not_duplicate(tmp_path: Path) -> None:
    class FlakyStore(SqliteStore):
        left = 2

        async def write_batch(self, records: Sequence[AuditRecord]) -> None:
            await super().write_batch(records)
            if self.left:  # committed, but the caller sees an error: the retry must be harmless
                self.left -= 1
                raise OSError("lost the reply")

    w = AuditWriter(
        sinks=[],
        store=FlakyStore(tmp_path / "a.db"),
        key=KEY,
        queue_size=10,
        batch_size=3,
        retry_initial_s=0.0,
    )
    await w.start()
    for i in range(5):
        await w.submit(rec(i))
    await w.close()
    assert w.failures == 2
    store = SqliteStore(tmp_path / "a.db")
    try:
        report = await verify_store(store, KEY)
    finally:
        await store.close()
    assert report.ok and report.records == 5


async def test_failing_sink_written_in_the_stores_thread_hop_is_retried_alone(tmp_path: Path) -> None:
    """The store and the JSONL sink are written in one hop to a worker thread; when the sink
    fails there, the store's write stands and only the sink is retried."""

    class FlakyJsonl(JsonlSink):
        left = 2
        calls = 0

        def _write_batch(self, records: list[AuditRecord]) -> None:
            self.calls += 1
            if self.left:
                self.left -= 1
                raise OSError("disk full")
            super()._write_batch(records)

    class CountingStore(SqliteStore):
        batches = 0

        def write_batch_sync(self, records: Sequence[AuditRecord]) -> None:
            self.batches += 1
            super().write_batch_sync(records)

    db, jl = paths(tmp_path)
    sink, store = FlakyJsonl(jl), CountingStore(db)
    w = AuditWriter(sinks=[sink], store=store, key=KEY, queue_size=50, batch_size=50, retry_initial_s=0.0)
    await w.start()
    for i in range(5):
        await w.submit(rec(i))
    await w.close()
    assert w.failures == 2 and w.written == 5
    assert store.batches == 1 and sink.calls == 3
    await full_check(tmp_path, 5)


async def test_jsonl_sink_catches_up_from_store_after_missing_writes(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    await w.start()
    for i in range(3):
        await w.submit(rec(i))
    await w.close()
    # As if the process died after the store commit and before the JSONL write.
    w = make_writer(tmp_path, jsonl=False)
    await w.start()
    for i in range(3, 7):
        await w.submit(rec(i))
    await w.close()

    w = make_writer(tmp_path)
    await w.start()
    await w.submit(rec(7))
    await w.close()
    await full_check(tmp_path, 8)


async def test_listeners_get_each_written_batch_in_order(tmp_path: Path) -> None:
    w = make_writer(tmp_path, jsonl=False, batch_size=4)
    seen: list[int] = []
    stopped: list[int] = []

    def listener(records: Sequence[AuditRecord]) -> None:
        seen.extend(r.seq for r in records)

    def broken(records: Sequence[AuditRecord]) -> None:
        raise RuntimeError("a bad listener must not stop the writer")

    w.add_listener(broken)
    w.add_listener(listener)
    w.add_listener(lambda rs: stopped.extend(r.seq for r in rs))
    await w.start()
    for i in range(10):
        await w.submit(rec(i))
    await w.flush()
    assert seen == list(range(1, 11))
    w.remove_listener(listener)
    await w.submit(rec(11))
    await w.flush()
    assert seen == list(range(1, 11))
    assert stopped == list(range(1, 12))
    await w.close()


async def test_submit_refused_before_start_and_after_close(tmp_path: Path) -> None:
    w = make_writer(tmp_path, jsonl=False)
    with pytest.raises(RuntimeError):
        await w.submit(rec())
    await w.start()
    await w.submit(rec())
    await w.close()
    with pytest.raises(RuntimeError):
        await w.submit(rec())


def _all_files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}


async def test_secrets_never_reach_the_store(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    await w.start()
    await w.submit(
        rec(extra={"copy": {"direction": "in", "bytes": 10}, "password": "hunter2", "token": "tok-123"})
    )
    await w.close()
    db, _ = paths(tmp_path)
    blobs = _all_files(tmp_path)  # the database, any WAL left behind, and the JSONL file
    assert set(blobs) >= {"audit.db", "audit.jsonl"}
    for blob in blobs.values():
        assert b"hunter2" not in blob and b"tok-123" not in blob
    store = SqliteStore(db)
    try:
        last = await store.last()
    finally:
        await store.close()
    assert last is not None and last.extra == {"copy": {"direction": "in", "bytes": 10}}


async def test_enqueued_records_are_sealed_in_order_by_the_drain(tmp_path: Path) -> None:
    w = make_writer(tmp_path)
    await w.start()
    for i in range(20):
        await w.enqueue(rec(i))
    sealed = await w.submit(rec(20))  # seals everything queued before it first
    assert sealed.seq == 21
    for i in range(21, 40):
        await w.enqueue(rec(i))
    await w.close()
    await full_check(tmp_path, 40)


async def test_a_record_json_cannot_encode_is_kept_escaped(tmp_path: Path) -> None:
    # A lone surrogate (possible in text decoded from a JSON request body) cannot be UTF-8
    # encoded for the hash; the record is kept with it escaped, and the writer goes on.
    w = make_writer(tmp_path)
    await w.start()
    await w.enqueue(rec(1, sql="SELECT '\ud800'"))
    await w.enqueue(rec(2))
    await w.close()
    await full_check(tmp_path, 2)
    store = SqliteStore(paths(tmp_path)[0])
    try:
        got = await store.get_after(0)
    finally:
        await store.close()
    assert [r.sql for r in got] == ["SELECT '\\ud800'", "SELECT 2"]


async def test_try_enqueue_refuses_when_full_and_queues_nothing(tmp_path: Path) -> None:
    gate = GateSink()
    w = AuditWriter(sinks=[gate], store=SqliteStore(tmp_path / "a.db"), key=KEY, queue_size=2, batch_size=1)
    await w.start()
    assert w.try_enqueue(rec(1))
    await gate.entered.wait()  # the drain task holds seq 1 inside the blocked sink
    assert w.try_enqueue(rec(2))
    assert not w.try_enqueue(rec(3))
    assert w.queue_depth == 2
    gate.gate.set()
    await w.enqueue(rec(4))
    await w.flush()
    assert [r.sql for r in gate.got] == ["SELECT 1", "SELECT 2", "SELECT 4"]
    await w.close()
    with pytest.raises(RuntimeError):
        w.try_enqueue(rec(5))
