"""Writing the SQLite store and the JSONL files from a child process.

With those writes in a worker thread of the proxy, pgbench -S through the proxy took 88 us of
proxy CPU per transaction, and 62 with the writes skipped; with the proxy pinned to one core the
writes cost nothing measurable. So the cost was the thread and the event loop running on two
cores, most likely handing the interpreter lock back and forth all through every batch (sqlite3
releases it around each step, the file writes and fsyncs release it too). A child process
writes the same bytes with the same code (``JsonlSink``, ``SqliteStore``) and holds nothing the
event loop waits for.

The parent seals records (the chain stays in the proxy) and sends each batch; the child writes
it to each target in order and answers how many targets succeeded. Frames on the child's stdin
and stdout are a 4-byte big-endian length and a pickle (both ends are this module):

- parent to child: ``(targets, records)``; a target is ``("sqlite", path)`` or
  ``("jsonl", path, rotate_bytes, keep_files)``, a record ``(seq, hash, line, row)`` with the
  JSONL line and the store row exactly as the sealed record holds them (None where no target
  needs them);
- child to parent: ``(done, error)``, the number of targets written and the first failure's text.

The child exits when its stdin closes, so it never outlives the proxy. It ignores SIGINT and
SIGTERM: a Ctrl-C in a terminal reaches the whole process group, and the proxy still has to
flush through the child before it stops. A child that dies is replaced at the next batch; the
replacement skips what its predecessor wrote (the store by its chain head, the JSONL files by
the last seq in them), so a retried batch is neither lost nor written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, cast

from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import JsonlSink, SqliteStore

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
# What a batch frame may hold: the parent's batches are bounded by audit.batch_size records.
_MAX_FRAME = 1 << 31
_PIPE_BYTES = 1 << 20

Spec = tuple[Any, ...]
# The child imports this package from where the parent found it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_CHILD_MAIN = "import sys; from sqlproxy.audit.sink_process import main; sys.exit(main(sys.argv[1:]))"


class SinkProcessError(RuntimeError):
    """A target failed in the child, or the child itself died."""


def process_spec(target: object) -> Spec | None:
    """How the child rebuilds ``target``, or None when it cannot (another kind of store, or a
    subclass whose writes the child would not reproduce)."""
    if type(target) is SqliteStore:
        return ("sqlite", str(target.path))
    if type(target) is JsonlSink:
        return ("jsonl", str(target.path), target.rotate_bytes, target.keep_files)
    return None


def writer_lock_path(spec: Spec) -> Path:
    """The lock a child holds on a target for as long as it lives (see wait_for_writers)."""
    return Path(str(spec[1]) + ".writer-lock")


def _open_lock(spec: Spec) -> IO[bytes]:
    path = writer_lock_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def _try_lock(f: IO[bytes]) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _hold_writer_lock(spec: Spec) -> IO[bytes]:
    """In the child: take the target's lock, waiting for a child of an earlier proxy process
    that is still finishing its last batch. The returned file holds the lock until exit."""
    f = _open_lock(spec)
    if not _try_lock(f):
        log.warning("audit writer process: waiting for the previous writer of %s to finish", spec[1])
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def wait_for_writers(specs: Sequence[Spec], timeout_s: float = 60.0) -> None:
    """In the proxy, before it reads where the chain stands: wait until no writer process
    (a child of an earlier proxy process whose parent died mid-batch) still holds a target.
    Reading the chain head while such a child commits one last batch would resume the chain
    behind it, and the store would then skip the new records with those seqs as written.
    Raises RuntimeError when a target stays locked (another proxy on the same state_dir)."""
    for spec in specs:
        deadline = time.monotonic() + timeout_s
        with _open_lock(spec) as f:
            while not _try_lock(f):
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"audit target {spec[1]} is still being written by another process "
                        f"after {timeout_s:.0f} s (does another proxy use the same state_dir?)"
                    )
                time.sleep(0.05)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class SinkProcess:
    """The parent's end: starts the child on first use and again after it died."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._started = 0  # children started so far; every one after the first resumes

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def _child(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        # Not ``-m``: the package imports this module before runpy would run it as __main__.
        argv = [sys.executable, "-c", _CHILD_MAIN]
        if self._started:
            argv.append("--resume")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        self._proc = proc
        self._started += 1
        _widen_pipe(proc.stdin)
        return proc

    async def write(
        self, specs: Sequence[Spec], batch: Sequence[AuditRecord]
    ) -> tuple[int, Exception | None]:
        """Write ``batch`` to each target of ``specs`` in order: how many succeeded, and the
        failure that stopped the rest (None when all did)."""
        want_line = any(s[0] == "jsonl" for s in specs)
        want_row = any(s[0] == "sqlite" for s in specs)
        records = [
            (r.seq, r.hash, r.jsonl_line() if want_line else None, r.store_row() if want_row else None)
            for r in batch
        ]
        payload = pickle.dumps((tuple(specs), records), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            proc = await self._child()
        except OSError as e:  # out of processes or descriptors: the writer retries the batch
            return 0, SinkProcessError(f"cannot start the audit writer process: {e}")
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(_LEN.pack(len(payload)) + payload)
            await proc.stdin.drain()
            (n,) = _LEN.unpack(await proc.stdout.readexactly(_LEN.size))
            done, error = pickle.loads(await proc.stdout.readexactly(n))  # noqa: S301 - our own child
        except (OSError, EOFError, asyncio.IncompleteReadError) as e:
            code = await self._reap()
            return 0, SinkProcessError(f"the audit writer process died (exit code {code}): {e!r}")
        except BaseException:
            # Cancelled (or worse) mid-frame: the next frame would be read out of step.
            await self._reap()
            raise
        return int(done), None if error is None else SinkProcessError(str(error))

    async def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return await proc.wait()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Let the child finish and exit (it stops at the end of its input)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            log.error("audit writer process %d did not exit; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _widen_pipe(stream: asyncio.StreamWriter | None) -> None:
    """Give the pipe to the child room for a whole batch (a few hundred KiB): with Linux's
    default 64 KiB, one batch took several writes, each waking the child, and as many turns of
    the event loop. Best effort: the limit for unprivileged users is 1 MiB."""
    if stream is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    pipe = stream.transport.get_extra_info("pipe")
    if pipe is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


# -- the child ------------------------------------------------------------------------------------


class _Sealed:
    """A sealed record as the sinks' batch writers read it: seq, hash, JSONL line, store row."""

    __slots__ = ("_line", "_row", "hash", "seq")

    def __init__(self, seq: int, hash: str, line: bytes | None, row: tuple[Any, ...] | None) -> None:
        self.seq = seq
        self.hash = hash
        self._line = line
        self._row = row

    def jsonl_line(self) -> bytes:
        assert self._line is not None
        return self._line

    def store_row(self) -> tuple[Any, ...]:
        assert self._row is not None
        return self._row


def _make_target(spec: Spec, resume: bool) -> JsonlSink | SqliteStore:
    if spec[0] == "sqlite":
        return SqliteStore(spec[1])
    if spec[0] == "jsonl":
        sink = JsonlSink(spec[1], spec[2], spec[3])
        if resume:
            sink.resume_after_files()
        return sink
    raise ValueError(f"unknown audit target {spec[0]!r}")


def _read_exact(f: IO[bytes], n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve(inp: IO[bytes], out: IO[bytes], resume: bool) -> None:
    targets: dict[Spec, JsonlSink | SqliteStore] = {}
    locks: list[IO[bytes]] = []
    try:
        while True:
            head = _read_exact(inp, _LEN.size)
            if head is None:
                return
            (n,) = _LEN.unpack(head)
            if n > _MAX_FRAME:
                raise SystemExit(f"audit writer process: frame of {n} bytes")
            body = _read_exact(inp, n)
            if body is None:
                return
            specs, rows = pickle.loads(body)  # noqa: S301 - from our own parent, over a pipe
            batch = cast(list[AuditRecord], [_Sealed(*r) for r in rows])
            done, error = 0, None
            for spec in specs:
                try:
                    target = targets.get(spec)
                    if target is None:
                        locks.append(_hold_writer_lock(spec))
                        target = targets[spec] = _make_target(spec, resume)
                    target.write_batch_sync(batch)
                except Exception as e:
                    log.exception("audit writer process: writing to %s failed", spec[1])
                    error = f"{spec[0]} {spec[1]}: {type(e).__name__}: {e}"
                    break
                done += 1
            reply = pickle.dumps((done, error))
            out.write(_LEN.pack(len(reply)) + reply)
            out.flush()
    finally:
        for target in targets.values():
            with contextlib.suppress(Exception):
                target.close_sync()
        for f in locks:
            f.close()


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The protocol owns stdout; anything else that prints goes to stderr with the logs.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(sys.stdin.buffer, out, "--resume" in argv)
    return 0
