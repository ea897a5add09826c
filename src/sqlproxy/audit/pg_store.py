"""The audit store in PostgreSQL: the optional alternative to SQLite, with the same semantics.

``audit.store = "postgresql://user:pass@host:5432/db?schema=audit"``. ``schema`` (default
``public``) is taken out of the URL; every other query parameter goes to asyncpg (``sslmode``
and the like). Two tables live there, created if missing:

- ``sqlproxy_audit_records``: one row per record, keyed by ``(node, seq)``; lists and dicts in
  JSONB, ``ts`` as the record's own fixed-width UTC text in the "C" collation (so string order
  is time order, as in SQLite, and the bytes the HMAC covers come back unchanged).
- ``sqlproxy_audit_chain_head``: one row per node, updated in the transaction that inserts the
  node's records, so a restart resumes exactly where the last committed batch ended.

**One chain per node.** Several proxies may share one database; each writes its own chain under
its node id (``stream.node_id``, or the id kept in the node's state directory), because the
chain's key and its sealing order are per process. Every read and write is scoped to the
store's node; verification checks that node's chain.

Exactness: PostgreSQL text cannot hold NUL, and JSONB rewrites some numbers (``1e+20`` comes
back as an integer, ``-0.0`` as ``0.0``). A record with such a value still gets its columns
(NUL shown as U+FFFD, the odd float as its repr) for querying, and its exact JSON in
``verbatim``; reading it checks that the columns are what that JSON projects to, so editing
either side is still caught. Every other row has ``verbatim`` NULL and is read from its columns.

Privileges: with the tables made beforehand, the proxy's role needs SELECT and INSERT on
``sqlproxy_audit_records`` and SELECT, INSERT and UPDATE on ``sqlproxy_audit_chain_head``
(DDL is attempted only for what is missing). The database must be UTF8.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from sqlproxy.audit.chain import ChainState
from sqlproxy.audit.record import (
    STORE_COLUMNS,
    STORE_JSON_COLUMNS,
    AuditRecord,
    Undecodable,
    normalize_ts,
)

RECORDS_TABLE = "sqlproxy_audit_records"
HEAD_TABLE = "sqlproxy_audit_chain_head"
URL_SCHEMES = ("postgresql://", "postgres://")

_COLUMNS = STORE_COLUMNS
_JSON_COLUMNS = STORE_JSON_COLUMNS
_COLS_SQL = ", ".join(f'"{c}"' for c in _COLUMNS)
_INT64 = (-(2**63), 2**63 - 1)

_DDL = """
CREATE TABLE IF NOT EXISTS {records} (
    "node" text NOT NULL,
    "seq" bigint NOT NULL,
    "id" text NOT NULL,
    "ts" text COLLATE "C" NOT NULL,
    "user" text,
    "roles" jsonb NOT NULL,
    "source" text NOT NULL,
    "door" text NOT NULL,
    "database" text,
    "sql" text,
    "fingerprint" text,
    "statement_kinds" jsonb NOT NULL,
    "relations" jsonb NOT NULL,
    "columns" jsonb NOT NULL,
    "decision" text NOT NULL,
    "rule" text,
    "reason" text,
    "rows" bigint,
    "duration_ms" double precision NOT NULL,
    "classifications" jsonb NOT NULL,
    "sqlstate" text,
    "error" text,
    "extra" jsonb NOT NULL,
    "prev_hash" text NOT NULL,
    "hash" text NOT NULL,
    "verbatim" text,
    PRIMARY KEY ("node", "seq")
);
CREATE INDEX IF NOT EXISTS sqlproxy_audit_records_ts ON {records} ("node", "ts");
CREATE INDEX IF NOT EXISTS sqlproxy_audit_records_user ON {records} ("node", "user", "seq");
CREATE INDEX IF NOT EXISTS sqlproxy_audit_records_decision ON {records} ("node", "decision", "seq");
CREATE INDEX IF NOT EXISTS sqlproxy_audit_records_id ON {records} ("node", "id");
CREATE TABLE IF NOT EXISTS {head} (
    "node" text PRIMARY KEY,
    "seq" bigint NOT NULL,
    "hash" text NOT NULL
);
"""


class ChainConflict(RuntimeError):
    """A batch that is not a retry of what the store holds: another process is writing a
    different chain under the same node id. Raised rather than skipped, since skipping would
    drop that process's records without a trace."""


def parse_store_url(url: str) -> tuple[str, str]:
    """``(dsn for asyncpg, schema)`` from an ``audit.store`` URL; ValueError if it is not one."""
    if not url.startswith(URL_SCHEMES):
        raise ValueError("audit.store: a PostgreSQL store URL starts with postgresql://")
    parts = urlsplit(url)
    schema = "public"
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if not schema or len(schema.encode("utf-8")) > 63 or "\x00" in schema:
        raise ValueError("audit.store: ?schema= must be a PostgreSQL identifier of 1..63 bytes")
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def redact_url(url: str) -> str:
    """The URL without its password, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- exact representation -------------------------------------------------------------------------


def _float_survives_jsonb(f: float) -> bool:
    # JSONB keeps numbers as numeric: Python's exponent form for |f| >= 1e16 reads back as an
    # integer, and numeric has no negative zero. Everything else reads back as the same float.
    return "e+" not in repr(f) and not (f == 0.0 and math.copysign(1.0, f) < 0)


def _clean(v: Any) -> Any:
    """``v`` as the columns can hold it: lossless for almost every value, see the module doc."""
    if isinstance(v, str):
        return v.replace("\x00", "\ufffd")
    if isinstance(v, float):
        return v if _float_survives_jsonb(v) else repr(v)
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {_clean(k): _clean(x) for k, x in v.items()}
    return v


def _project(r: AuditRecord) -> dict[str, Any]:
    d = r.to_dict()
    out: dict[str, Any] = {}
    for c in _COLUMNS:
        v = d[c]
        if c == "duration_ms":
            out[c] = v  # double precision holds every Python float
        elif c in ("rows", "seq") and isinstance(v, int):
            out[c] = v if _INT64[0] <= v <= _INT64[1] else None
        else:
            out[c] = _clean(v)
    return out


def _dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _to_row(node: str, r: AuditRecord) -> tuple[Any, ...]:
    proj = _project(r)
    # Compared as JSON text, which tells apart what == does not (-0.0 and 0.0, True and 1).
    exact = _dumps(proj) == _dumps({c: getattr(r, c) for c in _COLUMNS})
    values = tuple(_dumps(proj[c]) if c in _JSON_COLUMNS else proj[c] for c in _COLUMNS)
    return (node, *values, None if exact else r.to_json())


def _row_columns(row: asyncpg.Record) -> dict[str, Any]:
    return {c: (json.loads(row[c]) if c in _JSON_COLUMNS else row[c]) for c in _COLUMNS}


def _from_row(row: asyncpg.Record) -> AuditRecord:
    cols = _row_columns(row)
    verbatim = row["verbatim"]
    if verbatim is None:
        return AuditRecord.from_dict(cols)
    r = AuditRecord.from_json(verbatim)
    if _dumps(_project(r)) != _dumps(cols):
        raise ValueError("the row's columns differ from its verbatim record")
    return r


# -- the store ------------------------------------------------------------------------------------


class PgStore:
    """Audit records of one node's chain in PostgreSQL; see the module doc.

    The connection pool is made on first use, on the running loop, so the store can be built
    before the loop exists (as the runtime does).
    """

    def __init__(
        self,
        url: str,
        node: str,
        *,
        max_connections: int = 4,
        command_timeout_s: float = 30.0,
    ) -> None:
        if not node or "\x00" in node:
            raise ValueError("audit store: node id must be a non-empty string without NUL")
        self._dsn, self.schema = parse_store_url(url)
        self.node = node
        self._max_connections = max_connections
        # A hung server then fails the batch, and the writer's retry takes over; a commit that
        # did land before the timeout is skipped on that retry.
        self._command_timeout_s = command_timeout_s
        s = _ident(self.schema)
        self._records = f"{s}.{RECORDS_TABLE}"
        self._head = f"{s}.{HEAD_TABLE}"
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._where = f"{self.schema}.{RECORDS_TABLE} node {node}"

    def __repr__(self) -> str:
        return f"PgStore({redact_url(self._dsn)!r}, schema={self.schema!r}, node={self.node!r})"

    # -- plumbing
    async def _ensure(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._max_connections,
                    command_timeout=self._command_timeout_s,
                )
                try:
                    async with pool.acquire() as conn:
                        await self._prepare_schema(conn)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    async def _prepare_schema(self, conn: asyncpg.Connection) -> None:
        encoding = await conn.fetchval("SHOW server_encoding")
        if encoding != "UTF8":
            # Any other encoding turns some record into an error on every retry, forever.
            raise RuntimeError(f"audit store: the database encoding is {encoding}, not UTF8")
        present = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            self._records,
            self._head,
        )
        if present:
            # Nothing to create, so a role without CREATE privilege works too.
            return
        async with conn.transaction():
            # Nodes starting together would otherwise race in CREATE ... IF NOT EXISTS.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"sqlproxy_audit_ddl:{self.schema}"
            )
            has_schema = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", self.schema
            )
            if not has_schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(self.schema)}")
            await conn.execute(_DDL.format(records=self._records, head=self._head))

    async def open(self) -> None:
        await self._ensure()

    async def close(self) -> None:
        async with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- writing
    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        rows = list(records)
        pool = await self._ensure()
        async with pool.acquire() as conn, conn.transaction():
            # Serialises writers of one node's chain, including a first batch (no head row yet
            # to lock with FOR UPDATE).
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"sqlproxy_audit_chain:{self.schema}:{self.node}",
            )
            head = await conn.fetchrow(f'SELECT "seq", "hash" FROM {self._head} WHERE "node" = $1', self.node)
            done = int(head["seq"]) if head is not None else 0
            # Skipping what is already committed makes a retried batch harmless.
            todo = [r for r in rows if r.seq > done]
            skipped = [r for r in rows if r.seq <= done]
            if skipped:
                await self._check_retry(conn, skipped)
            if head is not None and todo and todo[0].seq == done + 1 and todo[0].prev_hash != head["hash"]:
                raise ChainConflict(
                    f"audit store: seq {todo[0].seq} of node {self.node} does not link to the stored "
                    "head; another proxy is writing with the same node id"
                )
            if todo:
                placeholders = ", ".join(f"${i}" for i in range(1, len(_COLUMNS) + 3))
                await conn.executemany(
                    f'INSERT INTO {self._records} ("node", {_COLS_SQL}, "verbatim") VALUES ({placeholders})',
                    [_to_row(self.node, r) for r in todo],
                )
                last = todo[-1]
                await conn.execute(
                    f'INSERT INTO {self._head} ("node", "seq", "hash") VALUES ($1, $2, $3) '
                    'ON CONFLICT ("node") DO UPDATE SET "seq" = excluded."seq", "hash" = excluded."hash"',
                    self.node,
                    last.seq,
                    last.hash,
                )

    async def _check_retry(self, conn: asyncpg.Connection, skipped: list[AuditRecord]) -> None:
        stored = {
            int(row["seq"]): row["hash"]
            for row in await conn.fetch(
                f'SELECT "seq", "hash" FROM {self._records} WHERE "node" = $1 AND "seq" = ANY($2::bigint[])',
                self.node,
                [r.seq for r in skipped],
            )
        }
        for r in skipped:
            got = stored.get(r.seq)
            if got is not None and got != r.hash:
                raise ChainConflict(
                    f"audit store: seq {r.seq} of node {self.node} already holds a different record; "
                    "another proxy is writing with the same node id"
                )

    # -- reading
    async def head(self) -> ChainState | None:
        pool = await self._ensure()
        row = await pool.fetchrow(f'SELECT "seq", "hash" FROM {self._head} WHERE "node" = $1', self.node)
        return None if row is None else ChainState(int(row["seq"]), str(row["hash"]))

    async def last(self) -> AuditRecord | None:
        pool = await self._ensure()
        row = await pool.fetchrow(
            f'SELECT {_COLS_SQL}, "verbatim" FROM {self._records} WHERE "node" = $1 '
            'ORDER BY "seq" DESC LIMIT 1',
            self.node,
        )
        return None if row is None else _from_row(row)

    async def _after(self, seq: int, limit: int) -> list[asyncpg.Record]:
        pool = await self._ensure()
        rows: list[asyncpg.Record] = await pool.fetch(
            f'SELECT {_COLS_SQL}, "verbatim" FROM {self._records} WHERE "node" = $1 AND "seq" > $2 '
            'ORDER BY "seq" LIMIT $3',
            self.node,
            seq,
            max(1, limit),
        )
        return rows

    async def get_after(self, seq: int, limit: int = 1000) -> list[AuditRecord]:
        """Records with seq > ``seq``, oldest first (the live stream resumes with this)."""
        return [_from_row(r) for r in await self._after(seq, limit)]

    async def scan(self, after_seq: int, limit: int = 1000) -> list[AuditRecord | Undecodable]:
        """Like ``get_after``, but a row that cannot be decoded comes back as ``Undecodable``
        instead of failing the whole read (verification must report it, not crash on it)."""
        out: list[AuditRecord | Undecodable] = []
        for row in await self._after(after_seq, limit):
            try:
                out.append(_from_row(row))
            except (ValueError, TypeError) as e:
                seq = int(row["seq"])
                out.append(Undecodable(seq, f"{self._where} seq {seq}", str(e)))
        return out

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
        """Matching records, oldest first; the same filters as ``SqliteStore.query``.

        With ``after_seq`` the first ``limit`` matches after it (paging forward); without it the
        newest ``limit`` matches. ``table`` matches ``schema.name`` exactly, or any schema when
        given without one; ``kind`` matches a statement kind case-insensitively (ASCII, as
        SQLite's lower()). ``since`` is inclusive and ``until`` exclusive; both accept any
        ISO-8601 date or timestamp (naive is UTC). A malformed timestamp raises ValueError.
        """
        args: list[Any] = [self.node]

        def arg(v: Any) -> str:
            args.append(v)
            return f"${len(args)}"

        where = ['"node" = $1']
        if user is not None:
            where.append(f'"user" = {arg(_clean(user))}::text')
        if decision is not None:
            where.append(f'"decision" = {arg(_clean(decision))}::text')
        # A tampered row whose relations are not an array must not make every query fail.
        rels = "CASE WHEN jsonb_typeof(\"relations\") = 'array' THEN \"relations\" ELSE '[]' END"
        if table is not None:
            t = _clean(table)
            if "." in t:
                cond = f"j->>'table' = {arg(t)}::text"
            else:
                p, n = arg(t), arg(len(t) + 1)
                cond = f"(j->>'table' = {p}::text OR right(j->>'table', {n}::int) = '.' || {p}::text)"
            where.append(f"EXISTS (SELECT 1 FROM jsonb_array_elements({rels}) j WHERE {cond})")
        if kind is not None:
            kinds = (
                "CASE WHEN jsonb_typeof(\"statement_kinds\") = 'array' THEN \"statement_kinds\" ELSE '[]' END"
            )
            where.append(
                f"EXISTS (SELECT 1 FROM jsonb_array_elements_text({kinds}) k "
                f"WHERE {_ascii_lower('k')} = {_ascii_lower(arg(_clean(kind)) + '::text')})"
            )
        if since is not None:
            where.append(f'"ts" >= {arg(normalize_ts(since))}::text')
        if until is not None:
            where.append(f'"ts" < {arg(normalize_ts(until))}::text')
        if after_seq is not None:
            where.append(f'"seq" > {arg(after_seq)}::bigint')
        order = "ASC" if after_seq is not None else "DESC"
        sql = (
            f'SELECT {_COLS_SQL}, "verbatim" FROM {self._records} WHERE {" AND ".join(where)} '
            f'ORDER BY "seq" {order} LIMIT {arg(max(1, limit))}::bigint'
        )
        pool = await self._ensure()
        found = [_from_row(r) for r in await pool.fetch(sql, *args)]
        return found if after_seq is not None else found[::-1]

    async def nodes(self) -> list[str]:
        """Every node id with a chain in this store's schema."""
        pool = await self._ensure()
        return [str(r["node"]) for r in await pool.fetch(f'SELECT "node" FROM {self._head} ORDER BY "node"')]


def _ascii_lower(expr: str) -> str:
    # SQLite's lower() folds ASCII only; the database's locale could fold more (or differently).
    return f"translate({expr}, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"
