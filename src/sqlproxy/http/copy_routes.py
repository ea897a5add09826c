"""Bulk CSV over HTTP: a streamed upload into a table (COPY FROM STDIN) and a streamed download of
a query (COPY (query) TO STDOUT), through the same pipeline as every request.

The request's SQL is the COPY statement the proxy will run, so analysis, policy (insert on the
table and its columns; read of everything the query reads), the mask and row-filter rewrite and
the audit record all see exactly what is sent upstream. Data is never held whole: the upload is
read from the request body as it arrives, the download is written as the server sends it, and a
bounded queue between the server and the response gives backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from sqlproxy.execute.upstream import StatementResult, _begin_script, request_connection, translate_error
from sqlproxy.http.app import _error_response, _json, bearer_token
from sqlproxy.pipeline.errors import BadRequest, ProxyError
from sqlproxy.pipeline.request import Request
from sqlproxy.pipeline.stages import calls_change_session
from sqlproxy.runtime import Runtime
from sqlproxy.sql.model import StatementKind
from sqlproxy.sql.rewrite import quote_ident
from sqlproxy.wire.pump import row_count

_QUEUE_CHUNKS = 8  # server chunks held at most between the server and the HTTP response


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str
    database: str | None = None
    header: bool = True


def _check_copy(req: Request, direction: str) -> None:
    a = req.analysis
    st = a.statements[0] if a is not None and len(a.statements) == 1 else None
    if st is None or st.kind is not StatementKind.COPY or st.copy is None:
        raise BadRequest("expected exactly one query", sqlstate="42601")
    if st.copy.target != "stdio" or st.copy.direction != direction:
        raise BadRequest("expected exactly one query", sqlstate="42601")


async def _copy(req: Request, run: Any) -> None:
    """Run the decided COPY on an upstream connection, in a transaction with the request's
    settings (statement timeout, sqlproxy.user)."""
    up = req.upstream
    assert up is not None and req.identity is not None
    pool = up.pool
    if pool is None:
        raise ProxyError("upstream unavailable", sqlstate="08006")
    # An export's query may call set_config or take a session advisory lock (a COPY is never
    # session-neutral by kind, so its calls decide).
    assert req.analysis is not None
    leaves_state = any(calls_change_session(st) for st in req.analysis.statements)
    started = time.perf_counter()
    try:
        async with request_connection(pool, up.config.connect_timeout_s, leaves_state) as conn:
            try:
                await conn.execute(_begin_script(up.config.statement_timeout_ms, req.identity.name))
                tag: str = await run(conn, req.statements[0])
                await conn.execute("COMMIT")
            except BaseException:
                # A COPY broken off midway leaves the connection in a state no one may reuse.
                if not conn.is_closed():
                    conn.terminate()
                raise
    except BaseException as e:
        req.extra["copy"]["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if isinstance(e, asyncio.CancelledError):
            raise
        err = translate_error(e)
        req.extra["copy"]["error"] = {"sqlstate": err.sqlstate, "message": err.message}
        raise err from e
    req.extra["copy"]["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
    req.extra["copy"]["rows"] = row_count(tag)
    req.results = [StatementResult(command=tag, row_count=row_count(tag))]


def install_copy_routes(app: FastAPI, runtime: Runtime) -> None:
    def _request(request: HttpRequest, sql: str | None, database: str | None) -> Request:
        client = request.client
        req = Request(
            door="http",
            sql=sql,
            database=database,
            source_ip=client.host if client else "unknown",
            source_port=client.port if client else None,
            api_key=bearer_token(request),
        )
        req.extra["copy_stream"] = True
        return req

    @app.post("/api/v1/export", summary="Stream a query's result as CSV (COPY ... TO STDOUT)")
    async def export(request: HttpRequest) -> Response:
        try:
            body = ExportBody.model_validate_json(await request.body())
        except ValidationError as e:
            problem = e.errors()[0]
            loc = ".".join(str(p) for p in problem.get("loc", ()))
            return _json({"error": {"code": "bad_request", "message": f"{loc}: {problem['msg']}"}}, 400)
        header = "true" if body.header else "false"
        sql = f"COPY ({body.sql}) TO STDOUT WITH (FORMAT csv, HEADER {header})"
        req = _request(request, sql, body.database)
        stats: dict[str, Any] = {"direction": "out", "format": "csv", "rows": None, "bytes": 0}
        req.extra["copy"] = stats
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_CHUNKS)

        async def run(conn: Any, stmt: str) -> str:
            async def output(chunk: bytes) -> None:
                stats["bytes"] += len(chunk)
                await queue.put(bytes(chunk))

            tag: str = await conn._copy_out(stmt, output, None)
            return tag

        async def execute(r: Request) -> None:
            _check_copy(r, "to")
            await _copy(r, run)

        req.executor = execute

        async def pipeline() -> None:
            try:
                await runtime.handle(req)
            finally:
                await queue.put(None)

        task = asyncio.get_running_loop().create_task(pipeline())
        first = await queue.get()
        if first is None:
            try:
                await task
            except ProxyError as e:
                return _error_response(e, req.id)
            return Response(b"", media_type="text/csv", headers={"X-Request-Id": req.id})

        async def stream() -> AsyncIterator[bytes]:
            try:
                chunk: bytes | None = first
                while chunk is not None:
                    yield chunk
                    chunk = await queue.get()
                with contextlib.suppress(ProxyError):
                    await task  # an error midway ends the stream early; the audit record has it
            finally:
                if not task.done():
                    task.cancel()  # the client went away: stop the server's work
                    with contextlib.suppress(BaseException):
                        await task

        return StreamingResponse(stream(), media_type="text/csv", headers={"X-Request-Id": req.id})

    @app.post(
        "/api/v1/import/{table}",
        summary="Stream a CSV upload into a table (COPY ... FROM STDIN)",
    )
    async def import_csv(
        request: HttpRequest,
        table: str,
        columns: str | None = None,
        database: str | None = None,
        header: bool = True,
    ) -> Response:
        parts = table.split(".")
        if not 1 <= len(parts) <= 2 or not all(parts):
            return _json({"error": {"code": "bad_request", "message": "table: expected [schema.]name"}}, 400)
        target = ".".join(quote_ident(p) for p in parts)
        cols = [c.strip() for c in columns.split(",")] if columns else []
        if any(not c for c in cols):
            return _json({"error": {"code": "bad_request", "message": "columns: empty column name"}}, 400)
        listed = f" ({', '.join(quote_ident(c) for c in cols)})" if cols else ""
        sql = f"COPY {target}{listed} FROM STDIN WITH (FORMAT csv, HEADER {'true' if header else 'false'})"
        req = _request(request, sql, database)
        stats: dict[str, Any] = {"direction": "in", "format": "csv", "rows": None, "bytes": 0}
        req.extra["copy"] = stats

        async def source() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                if chunk:
                    stats["bytes"] += len(chunk)
                    yield chunk

        async def run(conn: Any, stmt: str) -> str:
            tag: str = await conn._copy_in(stmt, source(), None)
            return tag

        async def execute(r: Request) -> None:
            _check_copy(r, "from")
            await _copy(r, run)

        req.executor = execute
        try:
            await runtime.handle(req)
        except ProxyError as e:
            return _error_response(e, req.id)
        return _json({"id": req.id, "command": req.results[0].command, "rows": stats["rows"]})
