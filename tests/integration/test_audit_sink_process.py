"""The audit store and JSONL files written by a child process (sink_process): the same bytes
as the in-process writer, nothing lost or doubled when the child dies, failures retried,
terminal signals ignored, a clean exit at close. Real child processes, real files."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sqlproxy.audit.chain import Chain, ChainState
from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sink_process import SinkProcess, process_spec, wait_for_writers, writer_lock_path
from sqlproxy.audit.sinks import JsonlSink, SqliteStore, all_jsonl_files
from sqlproxy.audit.writer import AuditWriter
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.demo.launcher import write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.server import build_app
from tests.audit_checks import verify_trail

KEY = bytes.fromhex("44" * 32)


def rec(n: int) -> AuditRecord:
    # Fixed id and time: two writers given these records seal identical bytes.
    r = AuditRecord.new(
        user="carol",
        roles=["analyst"],
        source="127.0.0.1",
        door="wire",
        sql=f"SELECT {n}, 'é'",
        decision="allow",
        duration_ms=1.5,
        rows=n,
    )
    return dataclasses.replace(r, id=f"id-{n:06d}", ts="2026-12-03T20:00:00.000000Z")


def writer(tmp: Path, process: SinkProcess | None, *, jsonl: Path | None = None) -> AuditWriter:
    return AuditWriter(
        sinks=[JsonlSink(jsonl or tmp / "audit.jsonl", rotate_bytes=4096, keep_files=1000)],
        store=SqliteStore(tmp / "audit.db"),
        key=KEY,
        queue_size=1000,
        batch_size=16,
        sink_process=process,
    )


async def check(tmp: Path, expected: int) -> None:
    await verify_trail(tmp / "audit.db", tmp / "audit.jsonl", KEY, expected)


def jsonl_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in all_jsonl_files(path))


async def test_the_child_writes_the_same_bytes_as_the_thread(tmp_path: Path) -> None:
    by_thread, by_child = tmp_path / "thread", tmp_path / "child"
    by_thread.mkdir()
    by_child.mkdir()
    proc = SinkProcess()
    for d, p in ((by_thread, None), (by_child, proc)):
        w = writer(d, p)
        await w.start()
        for i in range(100):
            await w.enqueue(rec(i))
        await w.flush()
        await w.close()
    assert proc.pid is None  # closed with the writer
    # Rotation at 4 KiB: the child rotated the files as the thread did.
    assert len(all_jsonl_files(by_child / "audit.jsonl")) > 3
    assert jsonl_bytes(by_child / "audit.jsonl") == jsonl_bytes(by_thread / "audit.jsonl")
    rows = []
    for d in (by_thread, by_child):
        s = SqliteStore(d / "audit.db")
        rows.append([r.to_dict() for r in await s.get_after(0, 1000)])
        await s.close()
    assert rows[0] == rows[1] and len(rows[0]) == 100
    await check(by_child, 100)


async def test_a_killed_child_is_replaced_and_nothing_is_lost_or_doubled(tmp_path: Path) -> None:
    proc = SinkProcess()
    w = writer(tmp_path, proc)
    await w.start()
    for i in range(20):
        await w.enqueue(rec(i))
    await w.flush()
    first = proc.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await asyncio.sleep(0.2)
    for i in range(20, 60):
        await w.enqueue(rec(i))
    await w.flush()
    # Replaced (at once if the loop had reaped it, else after one failed write).
    assert proc.pid is not None and proc.pid != first
    await w.close()
    await check(tmp_path, 60)


async def test_a_replacement_child_skips_what_a_dead_one_wrote(tmp_path: Path) -> None:
    """The child died after writing a batch but before answering: the retried batch goes to a
    new child, which must not append it a second time."""
    chain = Chain(KEY, ChainState.genesis())
    batch = [chain.append(rec(i)) for i in range(10)]
    store, sink = SqliteStore(tmp_path / "audit.db"), JsonlSink(tmp_path / "audit.jsonl")
    specs = [process_spec(store), process_spec(sink)]
    assert None not in specs
    proc = SinkProcess()
    assert await proc.write(specs, batch) == (2, None)  # type: ignore[arg-type]
    pid = proc.pid
    assert pid is not None
    # Stopped, then killed while the batch is in its pipe: the write reports the death.
    os.kill(pid, signal.SIGSTOP)
    pending = asyncio.create_task(proc.write(specs, batch))  # type: ignore[arg-type]
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    done, exc = await pending
    assert done == 0 and exc is not None and "died" in str(exc)
    # The same batch again, to a new child: it finds the batch in the files and the store.
    assert await proc.write(specs, batch) == (2, None)  # type: ignore[arg-type]
    assert proc.pid not in (None, pid)
    more = [chain.append(rec(i)) for i in range(10, 15)]
    assert await proc.write(specs, more) == (2, None)  # type: ignore[arg-type]
    await proc.close()
    await check(tmp_path, 15)


async def test_a_failing_target_in_the_child_is_retried_until_it_works(tmp_path: Path) -> None:
    blocked = tmp_path / "logs"
    proc = SinkProcess()
    w = writer(tmp_path, proc, jsonl=blocked / "audit.jsonl")
    await w.start()
    blocked.rename(tmp_path / "logs-away")
    blocked.write_text("a file where the JSONL directory should be")
    for i in range(5):
        await w.enqueue(rec(i))
    for _ in range(200):
        if w.failures >= 2:
            break
        await asyncio.sleep(0.05)
    assert w.failures >= 2
    assert w.written == 0  # held back, not dropped
    blocked.unlink()
    await asyncio.wait_for(w.flush(), 30)
    await w.close()
    lines = (blocked / "audit.jsonl").read_bytes().splitlines()
    assert len(lines) == 5
    store = SqliteStore(tmp_path / "audit.db")
    assert [r.seq for r in await store.get_after(0, 100)] == [1, 2, 3, 4, 5]
    await store.close()


async def test_the_child_ignores_terminal_signals_and_exits_at_close(tmp_path: Path) -> None:
    proc = SinkProcess()
    w = writer(tmp_path, proc)
    await w.start()
    await w.enqueue(rec(0))
    await w.flush()
    pid = proc.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(0.2)
    for i in range(1, 10):
        await w.enqueue(rec(i))
    await w.flush()
    assert proc.pid == pid and w.failures == 0
    await w.close()
    assert proc.pid is None
    await asyncio.sleep(0.1)
    # Reaped: no process of that pid is our child any more.
    assert not Path(f"/proc/{pid}").exists() or "zombie" not in Path(f"/proc/{pid}/status").read_text()
    await check(tmp_path, 10)


async def test_a_child_that_cannot_start_is_retried_not_fatal(tmp_path: Path) -> None:
    """Spawning fails (here: the interpreter path is gone, as after an upgrade in place): the
    batch is held and retried, and written once a child can start."""
    proc = SinkProcess()
    w = writer(tmp_path, proc)
    await w.start()
    real = sys.executable
    sys.executable = str(tmp_path / "no-such-python")
    try:
        for i in range(3):
            await w.enqueue(rec(i))
        for _ in range(200):
            if w.failures >= 2:
                break
            await asyncio.sleep(0.05)
        assert w.failures >= 2 and w.written == 0
    finally:
        sys.executable = real
    await asyncio.wait_for(w.flush(), 30)
    await w.close()
    await check(tmp_path, 3)


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process holding a target's writer lock, as a child of a dead proxy finishing
    its last batch would."""
    code = (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'ab')\n"
        "fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"locked\n"
    return p


async def test_a_new_writer_waits_for_a_previous_one_still_writing(tmp_path: Path) -> None:
    """The chain head is read only once no earlier writer process holds the store: one that
    committed a batch after the head was read would make the store skip the new records."""
    holder = _hold_lock(writer_lock_path(("sqlite", str(tmp_path / "audit.db"))), 1.0)
    try:
        w = writer(tmp_path, SinkProcess())
        started = time.monotonic()
        await w.start()
        assert time.monotonic() - started >= 0.7
        assert holder.poll() is not None  # it had to let go first
        await w.enqueue(rec(0))
        await w.flush()
        # Its own child now holds the store, for as long as it lives.
        store_spec = ("sqlite", str(tmp_path / "audit.db"))
        with pytest.raises(RuntimeError):
            await asyncio.to_thread(wait_for_writers, [store_spec], 0.2)
        await w.close()
        await asyncio.to_thread(wait_for_writers, [store_spec], 5)
    finally:
        holder.kill()
        holder.wait()
    await check(tmp_path, 1)


async def test_a_target_locked_for_good_is_reported(tmp_path: Path) -> None:
    holder = _hold_lock(writer_lock_path(("jsonl", str(tmp_path / "audit.jsonl"))), 30.0)
    try:
        specs = [process_spec(JsonlSink(tmp_path / "audit.jsonl"))]
        with pytest.raises(RuntimeError, match="same state_dir"):
            await asyncio.to_thread(wait_for_writers, specs, 0.5)  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait()


async def test_the_runtime_writes_through_a_thread_when_told_to(
    demo_dsn: str, tmp_path: Path, demo_keys: dict[str, str], demo_passwords: dict[str, str]
) -> None:
    """[audit] writer_process = false: the same records, written from a worker thread, and no
    writer process started."""
    path = write_demo_config(tmp_path, demo_dsn, 8080, demo_keys, demo_passwords)
    cfg = load_config(path)
    audit_cfg = cfg.audit.model_copy(update={"writer_process": False})
    runtime: Runtime = build_app(
        ConfigHolder(cfg.model_copy(update={"audit": audit_cfg}), path), env={}
    ).state.runtime
    await runtime.start()
    try:
        for i in range(3):
            await runtime.audit.enqueue(rec(i))
        await runtime.audit.flush()
        assert runtime.audit.written == 3
        assert not any("sink_process" in p.read_text(errors="replace") for p in _our_children())
    finally:
        await runtime.close()
    state = Path(cfg.server.state_dir)
    # The runtime's key, not the test's: the trail verifies under the key in state_dir.
    key = bytes.fromhex((state / "audit" / "chain.key").read_text().strip())
    await verify_trail(state / "audit" / "audit.db", state / "audit" / "audit.jsonl", key, 3)


def _our_children() -> list[Path]:
    """The command lines of this process's children."""
    me = str(os.getpid())
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                out.append(stat.with_name("cmdline"))
        except (OSError, IndexError):
            continue
    return out
