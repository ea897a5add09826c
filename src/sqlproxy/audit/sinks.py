"""Where sealed audit records go: an append-only JSON-lines file set, and a queryable store.

Every sink is idempotent by seq: the writer retries a failed batch, and a record the sink has
already made durable is skipped rather than written twice. Blocking file and SQLite work runs in
a worker thread so the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from sqlproxy.audit.chain import ChainState
from sqlproxy.audit.record import (
    STORE_COLUMNS,
    STORE_JSON_COLUMNS,
    AuditRecord,
    Undecodable,
    normalize_ts,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@runtime_checkable
class Sink(Protocol):
    async def write_batch(self, records: Sequence[AuditRecord]) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class CatchUpSink(Sink, Protocol):
    """A sink that can say how far it got, so the writer can replay what it missed from the
    store after a crash between the store commit and the sink write."""

    async def last_seq(self) -> int | None: ...


class AuditStore(Sink, Protocol):
    async def head(self) -> ChainState | None: ...

    async def last(self) -> AuditRecord | None: ...

    async def get_after(self, seq: int, limit: int = 1000) -> list[AuditRecord]: ...

    async def query(
        self,
        user: str | None = None,
        decision: str | None = None,
        table: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after_seq: int | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]: ...

    async def scan(self, after_seq: int, limit: int = 1000) -> list[AuditRecord | Undecodable]: ...


def thread_writer(target: object) -> Callable[[Sequence[AuditRecord]], None] | None:
    """``target.write_batch_sync`` when ``target.write_batch`` is nothing but that run in a worker
    thread (the sinks of this module, not a subclass that overrides ``write_batch``), else None.
    The audit writer then writes the store and the sinks in one thread hop: a hop costs the
    CPU of writing dozens of records."""
    if getattr(type(target), "write_batch", None) in _THREADED:
        fn: Callable[[Sequence[AuditRecord]], None] = target.write_batch_sync  # type: ignore[attr-defined]
        return fn
    return None


# -- JSON lines ----------------------------------------------------------------------------------


class JsonlSink:
    """``audit.jsonl`` plus rotated ``audit.jsonl.1`` (newest) … ``audit.jsonl.N`` (oldest).

    A file is rotated before a line that would take it past ``rotate_bytes``, so a record is
    never split across files; a single record larger than ``rotate_bytes`` gets a file of its own.
    """

    def __init__(self, path: Path | str, rotate_bytes: int = 64 * 1024 * 1024, keep_files: int = 10) -> None:
        if rotate_bytes < 1:
            raise ValueError("rotate_bytes must be positive")
        if keep_files < 1:
            raise ValueError("keep_files must be at least 1")
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.keep_files = keep_files
        self._f: Any = None  # a binary append-mode file object once opened
        self._size = 0
        # Highest seq this process made durable: a retried batch skips up to it. Deliberately not
        # read from the files, so a chain that restarted at seq 1 is appended (and flagged by
        # verify) rather than silently skipped.
        self._written_seq = 0
        # Highest seq found in the files when opened, for the writer's catch-up.
        self._file_last_seq: int | None = None
        self._lock = threading.Lock()

    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await asyncio.to_thread(self.write_batch_sync, records)

    def write_batch_sync(self, records: Sequence[AuditRecord]) -> None:
        """``write_batch`` in the calling thread (a worker thread: it blocks on the disk)."""
        if records:
            self._write_batch(list(records))

    async def last_seq(self) -> int | None:
        return await asyncio.to_thread(self._locked, self._ensure_open_and_last)

    async def close(self) -> None:
        await asyncio.to_thread(self._locked, self._close)

    def close_sync(self) -> None:
        self._locked(self._close)

    def resume_after_files(self) -> None:
        """Skip records up to the last seq in the files. For a writer that replaces one that
        died mid-batch: the chain is the same, so the lines it left are the retried batch's."""
        with self._lock:
            self._open()
            self._written_seq = max(self._written_seq, self._file_last_seq or 0)

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    def _ensure_open_and_last(self) -> int | None:
        self._open()
        return self._written_seq or self._file_last_seq

    def _open(self) -> None:
        if self._f is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "ab")  # noqa: SIM115 - held open across batches
        self._f = f
        self._size = f.seek(0, os.SEEK_END)
        if self._file_last_seq is None and self._written_seq == 0:
            self._file_last_seq = _last_seq_in_files(all_jsonl_files(self.path))
        if self._size > 0 and _last_byte(self.path) != b"\n":
            # A torn line from a crash: end it, so it stays one malformed line that verify
            # reports instead of corrupting the next record appended to it.
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            self._size += 1

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _write_batch(self, records: list[AuditRecord]) -> None:
        with self._lock:
            self._open()
            pending = [r for r in records if r.seq > self._written_seq]
            segment: list[tuple[int, bytes]] = []
            seg_size = self._size
            for r in pending:
                line = r.jsonl_line()
                if seg_size > 0 and seg_size + len(line) > self.rotate_bytes:
                    self._append(segment)
                    self._rotate()
                    segment, seg_size = [], 0
                segment.append((r.seq, line))
                seg_size += len(line)
            self._append(segment)

    def _append(self, segment: list[tuple[int, bytes]]) -> None:
        if not segment:
            return
        f = self._f
        start = self._size
        try:
            f.write(b"".join(line for _, line in segment))
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            # Undo a partial append so the retry does not leave half a batch behind it.
            try:
                f.truncate(start)
                f.seek(start)
            except OSError:
                log.exception("audit jsonl: could not undo a failed append to %s", self.path)
            raise
        self._size = f.tell()
        self._written_seq = segment[-1][0]

    def _rotate(self) -> None:
        self._close()
        oldest = _rotated(self.path, self.keep_files)
        if oldest.exists():
            oldest.unlink()
        for n in range(self.keep_files - 1, 0, -1):
            src = _rotated(self.path, n)
            if src.exists():
                os.replace(src, _rotated(self.path, n + 1))
        os.replace(self.path, _rotated(self.path, 1))
        _fsync_dir(self.path.parent)
        self._open()


def _rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def all_jsonl_files(path: Path | str) -> list[Path]:
    """The file set oldest first: ``.N`` … ``.1``, then the live file."""
    path = Path(path)
    pat = re.compile(re.escape(path.name) + r"\.(\d+)$")
    numbered: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pat.match(p.name)
            if m:
                numbered.append((int(m.group(1)), p))
    files = [p for _, p in sorted(numbered, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _last_seq_in_files(files: list[Path]) -> int | None:
    for p in reversed(files):
        seq = _last_seq_in_file(p)
        if seq is not None:
            return seq
    return None


def _last_seq_in_file(path: Path, chunk: int = 65536) -> int | None:
    """The seq of the last decodable line, reading backwards so a large file costs one chunk."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        carry = b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + carry).split(b"\n")
            # The first piece may be the tail of a line that starts in an earlier chunk.
            carry = lines[0] if pos > 0 else b""
            for line in reversed(lines[1:] if pos > 0 else lines):
                try:
                    seq = json.loads(line)["seq"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(seq, int) and not isinstance(seq, bool):
                    return seq
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- SQLite ---------------------------------------------------------------------------------------

_COLUMNS = STORE_COLUMNS
_JSON_COLUMNS = STORE_JSON_COLUMNS
_COLS_SQL = ", ".join(f'"{c}"' for c in _COLUMNS)
_INSERT_SQL = f"INSERT INTO audit_records ({_COLS_SQL}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# Rows per INSERT statement: one statement step per row costs more than the row's insert.
_ROWS_PER_INSERT = 32
_INSERT_MANY_SQL = f"INSERT INTO audit_records ({_COLS_SQL}) VALUES " + ", ".join(
    [f"({', '.join('?' * len(_COLUMNS))})"] * _ROWS_PER_INSERT
)


def _insert_rows(c: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """INSERT ``rows`` (in order), ``_ROWS_PER_INSERT`` to a statement while there are as many."""
    full = len(rows) - len(rows) % _ROWS_PER_INSERT
    if full:
        flat = list(itertools.chain.from_iterable(rows[:full]))
        per = _ROWS_PER_INSERT * len(_COLUMNS)
        c.executemany(_INSERT_MANY_SQL, [flat[i : i + per] for i in range(0, len(flat), per)])
    if full < len(rows):
        c.executemany(_INSERT_SQL, rows[full:])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    "seq" INTEGER PRIMARY KEY,
    "id" TEXT NOT NULL,
    "ts" TEXT NOT NULL,
    "user" TEXT,
    "roles" TEXT NOT NULL,
    "source" TEXT NOT NULL,
    "door" TEXT NOT NULL,
    "database" TEXT,
    "sql" TEXT,
    "fingerprint" TEXT,
    "statement_kinds" TEXT NOT NULL,
    "relations" TEXT NOT NULL,
    "columns" TEXT NOT NULL,
    "decision" TEXT NOT NULL,
    "rule" TEXT,
    "reason" TEXT,
    "rows" INTEGER,
    "duration_ms" REAL NOT NULL,
    "classifications" TEXT NOT NULL,
    "sqlstate" TEXT,
    "error" TEXT,
    "extra" TEXT NOT NULL,
    "prev_hash" TEXT NOT NULL,
    "hash" TEXT NOT NULL
);
-- An index for each filter of query() ("seq" is the rowid). No index on "id": nothing looks a
-- record up by it, and random ids made every insert touch a random page of that index, which
-- came to cost more than the rest of the insert together on a large file.
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records ("ts");
CREATE INDEX IF NOT EXISTS audit_records_user ON audit_records ("user", "seq");
CREATE INDEX IF NOT EXISTS audit_records_decision ON audit_records ("decision", "seq");
CREATE TABLE IF NOT EXISTS chain_head (
    "id" INTEGER PRIMARY KEY CHECK ("id" = 1),
    "seq" INTEGER NOT NULL,
    "hash" TEXT NOT NULL
);
"""


_CACHE_KIB = 16 * 1024


def _drop_unused_index(conn: sqlite3.Connection, path: Path) -> None:
    """Drop the "id" index files made by earlier versions have (see _SCHEMA). If the file is
    busy or read-only, it stays: records are written and read the same with it."""
    try:
        if conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'audit_records_id'"
        ).fetchone():
            conn.execute("DROP INDEX IF EXISTS audit_records_id")
    except sqlite3.OperationalError as e:
        log.warning("audit store %s: could not drop the unused index audit_records_id: %s", path, e)


def _to_row(r: AuditRecord) -> tuple[Any, ...]:
    # The JSON columns hold the same text the chain hashed (kept by seal; encoded here otherwise).
    return r.store_row()


def _from_row(row: sqlite3.Row) -> AuditRecord:
    d = {c: (json.loads(row[c]) if c in _JSON_COLUMNS else row[c]) for c in _COLUMNS}
    return AuditRecord.from_dict(d)


class SqliteStore:
    """Audit records in SQLite (WAL), with the chain head kept in the same transaction as the
    records so a restart resumes exactly where the last committed batch ended.

    One connection per store, used from worker threads one call at a time.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # -- plumbing
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            return fn(self._conn)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed audit batch survives power loss, not just a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        # The indexes of a large file stay in memory (the default is 2 MiB).
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        conn.executescript(_SCHEMA)
        _drop_unused_index(conn, self.path)
        return conn

    async def open(self) -> None:
        await self._run(lambda c: None)

    async def close(self) -> None:
        def _close(_: sqlite3.Connection) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await self._run(_close)

    def close_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- writing
    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await asyncio.to_thread(self.write_batch_sync, records)

    def write_batch_sync(self, records: Sequence[AuditRecord]) -> None:
        """``write_batch`` in the calling thread (a worker thread: it blocks on the disk)."""
        if not records:
            return
        rows = list(records)

        def _write(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                head = c.execute('SELECT "seq" FROM chain_head WHERE "id" = 1').fetchone()
                done = head["seq"] if head is not None else 0
                # Skipping what is already committed makes a retried batch harmless.
                todo = [r for r in rows if r.seq > done]
                if todo:
                    _insert_rows(c, [_to_row(r) for r in todo])
                    last = todo[-1]
                    c.execute(
                        'INSERT INTO chain_head ("id", "seq", "hash") VALUES (1, ?, ?) '
                        'ON CONFLICT ("id") DO UPDATE SET "seq" = excluded."seq", "hash" = excluded."hash"',
                        (last.seq, last.hash),
                    )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        self._call(_write)

    # -- reading
    async def head(self) -> ChainState | None:
        def _head(c: sqlite3.Connection) -> ChainState | None:
            row = c.execute('SELECT "seq", "hash" FROM chain_head WHERE "id" = 1').fetchone()
            return None if row is None else ChainState(int(row["seq"]), str(row["hash"]))

        return await self._run(_head)

    async def last(self) -> AuditRecord | None:
        def _last(c: sqlite3.Connection) -> AuditRecord | None:
            row = c.execute(f'SELECT {_COLS_SQL} FROM audit_records ORDER BY "seq" DESC LIMIT 1').fetchone()
            return None if row is None else _from_row(row)

        return await self._run(_last)

    async def get_after(self, seq: int, limit: int = 1000) -> list[AuditRecord]:
        """Records with seq > ``seq``, oldest first (the live stream resumes with this)."""

        def _get(c: sqlite3.Connection) -> list[AuditRecord]:
            cur = c.execute(
                f'SELECT {_COLS_SQL} FROM audit_records WHERE "seq" > ? ORDER BY "seq" LIMIT ?',
                (seq, max(1, limit)),
            )
            return [_from_row(r) for r in cur.fetchall()]

        return await self._run(_get)

    async def scan(self, after_seq: int, limit: int = 1000) -> list[AuditRecord | Undecodable]:
        """Like ``get_after``, but a row that cannot be decoded comes back as ``Undecodable``
        instead of failing the whole read (verification must report it, not crash on it)."""

        def _scan(c: sqlite3.Connection) -> list[AuditRecord | Undecodable]:
            cur = c.execute(
                f'SELECT {_COLS_SQL} FROM audit_records WHERE "seq" > ? ORDER BY "seq" LIMIT ?',
                (after_seq, max(1, limit)),
            )
            out: list[AuditRecord | Undecodable] = []
            for row in cur.fetchall():
                try:
                    out.append(_from_row(row))
                except (ValueError, TypeError) as e:
                    out.append(Undecodable(row["seq"], f"{self.path} seq {row['seq']}", str(e)))
            return out

        return await self._run(_scan)

    async def query(
        self,
        user: str | None = None,
        decision: str | None = None,
        table: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after_seq: int | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Matching records, oldest first.

        With ``after_seq`` the first ``limit`` matches after it (paging forward); without it the
        newest ``limit`` matches. ``table`` matches ``schema.name`` exactly, or any schema when
        given without one; ``kind`` matches a statement kind case-insensitively. ``since`` is
        inclusive and ``until`` exclusive; both accept any ISO-8601 date or timestamp (naive is
        UTC). A malformed timestamp raises ValueError.
        """
        where: list[str] = []
        args: list[Any] = []
        if user is not None:
            where.append('"user" = ?')
            args.append(user)
        if decision is not None:
            where.append('"decision" = ?')
            args.append(decision)
        if table is not None:
            if "." in table:
                where.append(
                    'EXISTS (SELECT 1 FROM json_each(audit_records."relations") j '
                    "WHERE json_extract(j.value, '$.table') = ?)"
                )
                args.append(table)
            else:
                where.append(
                    'EXISTS (SELECT 1 FROM json_each(audit_records."relations") j '
                    "WHERE json_extract(j.value, '$.table') = ? "
                    "OR substr(json_extract(j.value, '$.table'), -?) = ?)"
                )
                args.extend([table, len(table) + 1, "." + table])
        if kind is not None:
            where.append(
                'EXISTS (SELECT 1 FROM json_each(audit_records."statement_kinds") k '
                "WHERE lower(k.value) = lower(?))"
            )
            args.append(kind)
        if since is not None:
            where.append('"ts" >= ?')
            args.append(normalize_ts(since))
        if until is not None:
            where.append('"ts" < ?')
            args.append(normalize_ts(until))
        if after_seq is not None:
            where.append('"seq" > ?')
            args.append(after_seq)
        cond = " AND ".join(where) if where else "1"
        order = "ASC" if after_seq is not None else "DESC"
        sql = f'SELECT {_COLS_SQL} FROM audit_records WHERE {cond} ORDER BY "seq" {order} LIMIT ?'
        args.append(max(1, limit))

        def _query(c: sqlite3.Connection) -> list[AuditRecord]:
            return [_from_row(r) for r in c.execute(sql, args).fetchall()]

        rows = await self._run(_query)
        return rows if after_seq is not None else rows[::-1]


# The write_batch methods that only run write_batch_sync in a thread (see thread_writer).
_THREADED = (JsonlSink.write_batch, SqliteStore.write_batch)
