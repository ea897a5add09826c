"""Upstream PostgreSQL databases: a connection pool and a catalog snapshot each, and the code that
runs an approved request on them.

A request runs in one transaction with ``statement_timeout`` set locally, so a multi-statement
request is all-or-nothing and a timeout never outlives the request. Row-returning statements are
read through a portal with a row limit (``max_rows + 1``) so a cap is enforced while reading,
never after fetching everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from sqlproxy.config.models import DatabaseConfig
from sqlproxy.pipeline.errors import ProxyError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from sqlproxy.sql.catalog import Catalog, load_catalog
from sqlproxy.tcp import TcpOptions

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ColumnInfo:
    name: str
    type: str


@dataclass(slots=True)
class StatementResult:
    command: str  # the command tag, e.g. "SELECT 3", "UPDATE 2"
    columns: list[ColumnInfo] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    row_count: int = 0  # rows returned, or affected for DML
    truncated: bool = False  # more rows existed than the cap allowed


def _row_count_from_tag(tag: str) -> int:
    parts = tag.split()
    if (
        parts
        and parts[-1].isdigit()
        and parts[0] in {"INSERT", "UPDATE", "DELETE", "MERGE", "SELECT", "COPY", "MOVE", "FETCH"}
    ):
        return int(parts[-1])
    return 0


def _quote_literal(value: str) -> str:
    # E'' so the result is right whatever standard_conforming_strings says.
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _begin_script(timeout_ms: int, user: str) -> str:
    """BEGIN and the request's settings in one simple-query round trip; SET LOCAL and
    set_config(..., true) end with the transaction, so nothing outlives the request."""
    return (
        f"BEGIN; SET LOCAL statement_timeout = {int(timeout_ms)}; "
        f"SELECT set_config('sqlproxy.user', {_quote_literal(user)}, true)"
    )


@contextlib.asynccontextmanager
async def request_connection(
    pool: asyncpg.Pool, timeout_s: float, leaves_state: bool
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for one request. When the request's statements may leave state on
    the server session (``may_change_session``: a session-level SET, a set_config, a WITH HOLD
    cursor, an advisory lock), the connection is closed afterwards (terminated on an error)
    instead of going back to the pool, so the next user never inherits that state."""
    async with pool.acquire(timeout=timeout_s) as conn:
        try:
            yield conn
        except BaseException:
            if leaves_state and not conn.is_closed():
                conn.terminate()
            raise
        if leaves_state:
            await conn.close(timeout=timeout_s)


async def _release_as_is(conn: asyncpg.Connection) -> None:
    """Pool reset hook. Requests that cannot change session state leave nothing to reset, so the
    round trip asyncpg's default reset costs is skipped; the others discard their connection
    (see ``Upstream.run``)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.ConnectionFailureError,
)


def translate_error(exc: BaseException) -> ProxyError:
    """Map an upstream failure to the proxy's error kinds, keeping PostgreSQL's SQLSTATE."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return UpstreamTimeout("the statement exceeded the statement timeout")
    if isinstance(exc, (*_CONNECTION_ERRORS, asyncio.TimeoutError)):
        return UpstreamUnavailable(f"upstream unavailable: {type(exc).__name__}")
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or "XX000"
        msg = str(getattr(exc, "message", None) or exc)
        return UpstreamError(msg, sqlstate=sqlstate, detail=getattr(exc, "detail", None))
    if isinstance(exc, asyncpg.InterfaceError):
        return UpstreamError(str(exc), sqlstate="08000")
    return UpstreamError(f"internal error: {type(exc).__name__}", sqlstate="XX000")


class Upstream:
    """One configured database: pool, catalog, health."""

    def __init__(self, name: str, config: DatabaseConfig, tcp: TcpOptions | None = None) -> None:
        self.name = name
        self.config = config
        # Keepalive and user timeout for the pool's connections, as for the wire door's own.
        self.tcp = tcp
        self._pool: asyncpg.Pool | None = None
        self._catalog: Catalog | None = None
        self._catalog_loaded_at = 0.0
        self._catalog_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self.last_error: str | None = None

    @property
    def catalog(self) -> Catalog | None:
        return self._catalog

    def catalog_age(self) -> float:
        return time.monotonic() - self._catalog_loaded_at

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self._pool

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._start_lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self.config.dsn,
                        min_size=self.config.pool_min,
                        max_size=self.config.pool_max,
                        timeout=self.config.connect_timeout_s,
                        command_timeout=None,
                        reset=_release_as_is,
                        init=self._on_connect if self.tcp is not None else None,
                    )
                    self.last_error = None
                except BaseException as e:
                    self.last_error = f"{type(e).__name__}: {e}"
                    raise translate_error(e) from e
            return self._pool

    async def _on_connect(self, conn: asyncpg.Connection) -> None:
        # asyncpg has no public way to the socket; its transport attribute has been there
        # since its first release (and the test reads the options back through it).
        transport = getattr(conn, "_transport", None)
        if transport is not None and self.tcp is not None:
            self.tcp.apply(transport)

    async def start(self) -> None:
        """Open the pool and load the catalog; failures are remembered, not fatal, so the proxy
        comes up and reports the upstream as not ready."""
        try:
            await self.ensure_catalog()
        except ProxyError as e:
            log.warning("upstream %s not ready: %s", self.name, e)

    async def ensure_catalog(self, refresh: bool = False) -> Catalog:
        if self._catalog is not None and not refresh:
            return self._catalog
        async with self._catalog_lock:
            if self._catalog is not None and not refresh:
                return self._catalog
            pool = await self._ensure_pool()
            try:
                async with pool.acquire(timeout=self.config.connect_timeout_s) as conn:
                    self._catalog = await load_catalog(conn)
                    self._catalog_loaded_at = time.monotonic()
            except BaseException as e:
                self.last_error = f"{type(e).__name__}: {e}"
                raise translate_error(e) from e
            return self._catalog

    async def check(self) -> bool:
        try:
            pool = await self._ensure_pool()
            async with pool.acquire(timeout=self.config.connect_timeout_s) as conn:
                await conn.fetchval("SELECT 1")
            self.last_error = None
            return True
        except BaseException as e:  # readiness must report, never raise
            if isinstance(e, asyncio.CancelledError):
                raise
            self.last_error = f"{type(e).__name__}: {e}"
            return False

    def pool_stats(self) -> dict[str, int]:
        if self._pool is None:
            return {"size": 0, "idle": 0, "max": self.config.pool_max}
        return {
            "size": self._pool.get_size(),
            "idle": self._pool.get_idle_size(),
            "max": self.config.pool_max,
        }

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    async def run(
        self,
        statements: Sequence[str],
        *,
        user: str,
        max_rows: int | None = None,
        timeout_ms: int | None = None,
        params: Sequence[Any] | None = None,
        session_state: bool = True,
    ) -> list[StatementResult]:
        """Run ``statements`` in one transaction. ``params`` binds $1.. of a single statement.

        ``session_state`` says the statements may leave state on the server session (SET,
        LISTEN, temp tables, SQL-level PREPARE, session advisory locks, ...): the connection is
        then closed instead of going back to the pool, so nothing leaks to the next user."""
        pool = await self._ensure_pool()
        cap = max_rows if max_rows is not None else self.config.max_result_rows
        cap = min(cap, self.config.max_result_rows)
        timeout = self.config.statement_timeout_ms if timeout_ms is None else timeout_ms
        results: list[StatementResult] = []
        try:
            async with request_connection(pool, self.config.connect_timeout_s, session_state) as conn:
                try:
                    await conn.execute(_begin_script(timeout, user))
                    for sql in statements:
                        args = tuple(params) if params and len(statements) == 1 else ()
                        results.append(await self._run_one(conn, sql, cap, args))
                    await conn.execute("COMMIT")
                except BaseException:
                    # A connection that keeps no session state goes back to the pool, rolled back
                    # (request_connection ends the others).
                    if not session_state and not conn.is_closed() and conn.is_in_transaction():
                        try:
                            await asyncio.shield(conn.execute("ROLLBACK"))
                        except Exception:  # a broken connection must not mask the error
                            conn.terminate()
                    raise
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            raise translate_error(e) from e
        return results

    @staticmethod
    async def _run_one(
        conn: asyncpg.Connection, sql: str, cap: int, args: tuple[Any, ...]
    ) -> StatementResult:
        stmt = await conn.prepare(sql)
        attrs = stmt.get_attributes()
        if not attrs:
            await stmt.fetch(*args)
            tag = stmt.get_statusmsg() or ""
            return StatementResult(command=tag, row_count=_row_count_from_tag(tag))
        cols = [ColumnInfo(a.name, a.type.name) for a in attrs]
        cursor = await stmt.cursor(*args, prefetch=None)
        rows = await cursor.fetch(cap + 1)
        truncated = len(rows) > cap
        if truncated:
            rows = rows[:cap]
        out_rows = [tuple(r.values()) for r in rows]
        tag = f"SELECT {len(out_rows)}"
        return StatementResult(
            command=tag, columns=cols, rows=out_rows, row_count=len(out_rows), truncated=truncated
        )
