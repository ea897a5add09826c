"""The HTTP door: FastAPI routes that turn JSON into a pipeline Request and the outcome back into
JSON. No policy, analysis or audit logic lives here; the pipeline has it once for every door."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Query
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sqlproxy import __version__
from sqlproxy.config.loader import ConfigError
from sqlproxy.http.jsonenc import dumps, to_jsonable
from sqlproxy.pipeline.errors import BadRequest, Denied, ProxyError, TooLarge, Unauthenticated
from sqlproxy.pipeline.request import Request
from sqlproxy.runtime import Runtime

log = logging.getLogger(__name__)


class QueryBody(BaseModel):
    """A query request. Identity comes only from the Authorization header, never from the body."""

    model_config = ConfigDict(extra="forbid")

    sql: str = Field(description="One or more SQL statements; several run in one transaction")
    database: str | None = Field(default=None, description="Upstream database name; default if omitted")
    params: list[Any] | None = Field(
        default=None, description="Values for $1, $2, ... (single statement only)"
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="Row cap, at most the database's max_result_rows"
    )


class ErrorBody(BaseModel):
    error: dict[str, Any]
    id: str | None = None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error_response(err: ProxyError, request_id: str | None) -> Response:
    headers: dict[str, str] = {}
    if err.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sqlproxy"'
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    body: dict[str, Any] = {"error": err.to_json()}
    if request_id:
        body["id"] = request_id
    return _json(body, err.http_status, headers)


def bearer_token(request: HttpRequest) -> str | None:
    auth = request.headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise TooLarge(f"request body larger than the limit of {limit} bytes")
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_query_body(raw: bytes) -> QueryBody:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})", sqlstate="22021") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return QueryBody.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadRequest(f"{loc}: {msg}") from None


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="sqlproxy",
        version=__version__,
        description=(
            "A policy-enforcing SQL proxy for PostgreSQL. Every statement is parsed with PostgreSQL's "
            "own grammar, decided by per-user policies (allow, block, mask, row filters), classified "
            "for PII and audited in a tamper-evident log. "
            "Authenticate with `Authorization: Bearer <api key>`."
        ),
    )
    app.state.runtime = runtime

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(_: HttpRequest, exc: StarletteHTTPException) -> Response:
        return _json({"error": {"code": "http_error", "message": str(exc.detail)}}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_exc(_: HttpRequest, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return _json({"error": {"code": "bad_request", "message": f"{loc}: {first.get('msg')}"}}, 400)

    async def _run(request: HttpRequest, dry_run: bool) -> Response:
        cfg = runtime.config.current
        client = request.client
        req = Request(
            door="http",
            sql=None,
            source_ip=client.host if client else "unknown",
            source_port=client.port if client else None,
            api_key=bearer_token(request),
            dry_run=dry_run,
        )
        try:
            body = _parse_query_body(await _read_body(request, cfg.server.max_request_bytes))
            req.sql, req.database, req.params, req.max_rows = (
                body.sql,
                body.database,
                body.params,
                body.max_rows,
            )
        except ProxyError as e:
            req.preflight_error = e
        try:
            await runtime.handle(req)
        except Denied as e:
            if dry_run and req.decision is not None:
                # A dry run's answer is the decision itself, deny included.
                return _json(_dry_run_body(req))
            return _error_response(e, req.id)
        except ProxyError as e:
            return _error_response(e, req.id)
        return _json(_dry_run_body(req) if dry_run else _result_body(req))

    @app.post(
        "/api/v1/query",
        summary="Run SQL through policy, masking, classification and audit",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": QueryBody.model_json_schema()}},
            }
        },
        responses={
            400: {"model": ErrorBody},
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            413: {"model": ErrorBody},
            429: {"model": ErrorBody},
            503: {"model": ErrorBody},
            504: {"model": ErrorBody},
        },
    )
    async def query(request: HttpRequest) -> Response:
        return await _run(request, dry_run=False)

    @app.post(
        "/api/v1/query/dry-run",
        summary="Analyse and decide without executing",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": QueryBody.model_json_schema()}},
            }
        },
        responses={400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
    )
    async def dry_run(request: HttpRequest) -> Response:
        return await _run(request, dry_run=True)

    async def _admin_identity(request: HttpRequest, action: str, need_admin: bool = True) -> Any:
        """Authenticate an API call that runs no SQL; it is audited like any other request."""
        client = request.client
        req = Request(
            door="http",
            sql=None,
            source_ip=client.host if client else "unknown",
            source_port=client.port if client else None,
            extra={"action": action},
        )
        token = bearer_token(request)
        try:
            if not token:
                raise Unauthenticated("missing credentials: send Authorization: Bearer <api key>")
            result = runtime.users.authenticate_api_key(token, req.source_ip)
            if result.identity is None:
                raise Unauthenticated("invalid credentials")
            req.identity = result.identity
            if need_admin and not result.identity.admin:
                raise Denied(f"{action} needs an admin role", rule="admin-only")
        except ProxyError as e:
            req.error = e
            await runtime.audit_request(req)
            raise
        return req

    @app.post(
        "/api/v1/admin/reload", summary="Re-read the configuration file (atomic; a bad file is refused)"
    )
    async def admin_reload(request: HttpRequest) -> Response:
        try:
            req = await _admin_identity(request, "reload")
        except ProxyError as e:
            return _error_response(e, None)
        try:
            runtime.reload()
        except ConfigError as e:
            req.error = BadRequest("configuration refused; the running configuration is unchanged")
            await runtime.audit_request(req)
            return _json(
                {
                    "error": {
                        "code": "config_invalid",
                        "message": str(req.error.message),
                        "problems": [{"path": p.path, "reason": p.reason} for p in e.problems],
                    }
                },
                400,
            )
        await runtime.audit_request(req)
        return _json({"reloaded": True, "generation": runtime.config.generation})

    @app.get("/api/v1/admin/users", summary="Users, their roles and attributes (no secrets)")
    async def admin_users(request: HttpRequest) -> Response:
        try:
            req = await _admin_identity(request, "list_users")
        except ProxyError as e:
            return _error_response(e, None)
        await runtime.audit_request(req)
        cfg = runtime.config.current
        return _json(
            {
                "users": [
                    {
                        "name": n,
                        "roles": list(u.roles),
                        "attributes": u.attributes,
                        "disabled": u.disabled,
                        "has_api_key": bool(u.api_key_sha256 or u.api_key_env),
                        "has_password": u.password is not None,
                        "allowed_cidrs": list(u.allowed_cidrs),
                    }
                    for n, u in cfg.users.items()
                ]
            }
        )

    @app.get("/api/v1/admin/policies", summary="Policy rules and row filters in force")
    async def admin_policies(request: HttpRequest) -> Response:
        try:
            req = await _admin_identity(request, "list_policies")
        except ProxyError as e:
            return _error_response(e, None)
        await runtime.audit_request(req)
        cfg = runtime.config.current
        return _json(
            {
                "policies": [p.model_dump(mode="json", by_alias=True) for p in cfg.policies],
                "row_filters": [f.model_dump(mode="json", by_alias=True) for f in cfg.row_filters],
            }
        )

    @app.get(
        "/api/v1/rate-limits",
        summary="Rate limits: levels, budgets, this node's buckets and, when distributed, usage per node",
    )
    async def rate_limits(request: HttpRequest) -> Response:
        try:
            req = await _admin_identity(request, "rate_limits")
        except ProxyError as e:
            return _error_response(e, None)
        await runtime.audit_request(req)
        return _json(await runtime.rate_limiter.snapshot())

    @app.get("/api/v1/audit", summary="Audit records, newest last; non-admins see only their own")
    async def audit(
        request: HttpRequest,
        user: str | None = None,
        decision: str | None = None,
        table: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after_seq: int | None = Query(default=None, ge=0),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> Response:
        try:
            req = await _admin_identity(request, "read_audit", need_admin=False)
        except ProxyError as e:
            return _error_response(e, None)
        ident = req.identity
        if not runtime.can_read_all_audit(ident.roles, ident.admin):
            if user is not None and user != ident.name:
                req.error = Denied("you may only read your own audit records", rule="audit-own-only")
                await runtime.audit_request(req)
                return _error_response(req.error, req.id)
            user = ident.name
        try:
            records = await runtime.audit.store.query(
                user=user,
                decision=decision,
                table=table,
                kind=kind,
                since=since,
                until=until,
                after_seq=after_seq,
                limit=limit,
            )
        except ValueError as e:
            req.error = BadRequest(f"invalid filter: {e}")
            await runtime.audit_request(req)
            return _error_response(req.error, req.id)
        await runtime.audit_request(req)
        return _json({"records": [r.to_dict() for r in records]})

    @app.get("/health", summary="Liveness, and readiness of every upstream")
    async def health() -> Response:
        ups = {}
        ready = True
        for name, up in runtime.upstreams.items():
            ok = await up.check()
            runtime.metrics.upstream_up.labels(name).set(1 if ok else 0)
            ready = ready and ok
            ups[name] = {
                "ready": ok,
                **({"error": up.last_error} if not ok and up.last_error else {}),
                "pool": up.pool_stats(),
            }
        return _json(
            {
                "status": "ok",
                "ready": ready,
                "version": __version__,
                "upstreams": ups,
                "audit": {"queue_depth": runtime.audit.queue_depth},
                **({"wire": runtime.wire_status()} if runtime.wire_status is not None else {}),
            }
        )

    @app.get("/health/ready", summary="200 when every upstream answers, 503 otherwise")
    async def ready() -> Response:
        results = {name: await up.check() for name, up in runtime.upstreams.items()}
        ok = all(results.values())
        return _json({"ready": ok, "upstreams": results}, 200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        m = runtime.metrics
        runtime.refresh_gauges()
        m.audit_queue.set(runtime.audit.queue_depth)
        m.audit_written.set(runtime.audit.written)
        m.audit_failures.set(runtime.audit.failures)
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    from sqlproxy.http.stream_routes import install_stream_routes

    install_stream_routes(app, runtime)

    from sqlproxy.http.copy_routes import install_copy_routes

    install_copy_routes(app, runtime)
    return app


def _result_body(req: Request) -> dict[str, Any]:
    assert req.analysis is not None
    results = []
    for i, (st, res) in enumerate(zip(req.analysis.statements, req.results, strict=False)):
        cls = req.classifications[i] if i < len(req.classifications) else {}
        results.append(
            {
                "statement": i,
                "kind": str(st.kind),
                "command": res.command,
                "columns": [
                    {"name": c.name, "type": c.type, "classifications": cls.get(c.name, [])}
                    for c in res.columns
                ],
                "rows": [[to_jsonable(v) for v in row] for row in res.rows],
                "row_count": res.row_count,
                "truncated": res.truncated,
            }
        )
    merged: dict[str, list[str]] = {}
    for per in req.classifications:
        for col, labels in per.items():
            if labels:
                merged[col] = sorted(set(merged.get(col, [])) | set(labels))
    d = req.decision
    return {
        "id": req.id,
        "database": req.database,
        "results": results,
        "classifications": merged,
        "decision": {
            "allowed": True,
            "rule": d.rule if d else None,
            "rules": list(d.rules_used) if d else [],
        },
        "rewritten": req.rewritten,
        "duration_ms": round(req.elapsed_ms, 3),
    }


def _dry_run_body(req: Request) -> dict[str, Any]:
    a = req.analysis
    d = req.decision
    assert a is not None and d is not None
    return {
        "id": req.id,
        "database": req.database,
        "allowed": d.allowed,
        "decision": {"allowed": d.allowed, "rule": d.rule, "reason": d.reason, "rules": list(d.rules_used)},
        "fingerprint": a.fingerprint,
        "statements": [
            {
                "kind": str(st.kind),
                "category": st.category,
                "relations": [
                    {"table": r.table.qualified, "access": str(r.access), "columns": sorted(r.columns)}
                    for r in st.relations
                ],
                "outputs": [
                    {"name": o.name, "sources": sorted(str(s) for s in o.sources), "direct": o.direct}
                    for o in st.outputs
                ],
                "functions": sorted(st.functions),
                "dangers": sorted(st.dangers),
            }
            for st in a.statements
        ],
        "masks": {str(k): str(v) for k, v in d.masks.items()},
        "row_filters": {str(k): v for k, v in d.row_filters.items()},
        "rewritten_sql": req.statements if req.rewritten else None,
    }
