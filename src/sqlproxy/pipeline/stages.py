"""The standard stages, outermost first. Each reads the runtime's current services at call time, so
a reload takes effect on the next request without rebuilding the pipeline."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pglast import parser as pg_parser

from sqlproxy.memo import IdMemo
from sqlproxy.pipeline.errors import (
    BadRequest,
    Denied,
    ProxyError,
    SourceNotAllowed,
    SqlSyntax,
    TooLarge,
    Unauthenticated,
    UnknownDatabase,
    UpstreamError,
)
from sqlproxy.pipeline.pipeline import Next
from sqlproxy.pipeline.request import Request
from sqlproxy.policy.principal import Principal
from sqlproxy.ratelimit.stage import RateLimitStage
from sqlproxy.sql.model import Analysis, SqlSyntaxError, StatementAnalysis, StatementKind

if TYPE_CHECKING:
    from sqlproxy.auth.users import Identity
    from sqlproxy.runtime import Runtime
    from sqlproxy.sql.model import TableName
    from sqlproxy.sql.rewrite import RelationRewrite

log = logging.getLogger(__name__)

# How long a catalog snapshot is trusted before an unknown relation triggers a refresh.
_CATALOG_REFRESH_MIN_S = 2.0


class AuditStage:
    """Outermost: every request leaves exactly one record, whatever happened inside."""

    name = "audit"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        try:
            await call_next(req)
        except ProxyError as e:
            req.error = e
            raise
        except Exception as e:
            raise internal_error(req, e) from e
        finally:
            await audit(self.rt, req)


def internal_error(req: Request, e: Exception) -> ProxyError:
    """What ``req`` ends with when an unexpected ``e`` escaped it: an internal error, logged
    with the request id (the client sees only the exception's type)."""
    log.exception("internal error in request %s", req.id)
    req.error = ProxyError(f"internal error: {type(e).__name__}")
    return req.error


async def audit(rt: Runtime, req: Request) -> None:
    """Leave ``req``'s audit record. Queued at once when the audit queue has room (nearly
    always: no task, no await); else wait for room, shielded so that cancellation (the client
    gone) still leaves it."""
    record = rt.audit_record(req)
    if not rt.audit_queue.try_enqueue(record):
        await asyncio.shield(rt.audit_queue.enqueue(record))


class MetricsStage:
    name = "metrics"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        try:
            await call_next(req)
        except ProxyError as e:
            req.error = e  # the audit stage outside sets it too, but only after this stage returns
            raise
        finally:
            self.rt.metrics.observe_request(req)


class AuthenticateStage:
    name = "authenticate"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        t = time.perf_counter()
        if req.identity is None:
            if not req.api_key:
                raise Unauthenticated("missing credentials: send Authorization: Bearer <api key>")
            result = self.rt.users.authenticate_api_key(req.api_key, req.source_ip)
            if result.identity is None:
                if result.reason == "ip_not_allowed":
                    raise SourceNotAllowed("this source address is not allowed for this user")
                # One message for unknown key, wrong key, locked and disabled: the client must not
                # learn which keys exist.
                raise Unauthenticated("invalid credentials")
            req.identity = result.identity
        req.stage_seconds[self.name] = time.perf_counter() - t
        if req.preflight_error is not None:
            raise req.preflight_error
        await call_next(req)


class AnalyzeStage:
    name = "analyze"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        t = time.perf_counter()
        cfg = self.rt.config.current
        sql = req.sql
        if sql is None or not sql or sql.isspace():
            raise BadRequest("empty SQL", sqlstate="42601")
        limit = cfg.server.max_sql_bytes
        # A code point is at most 4 bytes in UTF-8: short texts need no encoding to be measured.
        if len(sql) * 4 > limit and (len(sql) > limit or len(sql.encode("utf-8", "surrogatepass")) > limit):
            raise TooLarge(f"SQL text is larger than the limit of {limit} bytes")
        if "\x00" in sql:
            raise BadRequest("SQL text contains a NUL character", sqlstate="22021")
        db_name = cfg.resolve_database(req.database)
        if db_name is None:
            raise UnknownDatabase(f"unknown database {req.database!r}")
        req.database = db_name
        upstream = self.rt.upstreams[db_name]
        req.upstream = upstream
        catalog = upstream.catalog or await upstream.ensure_catalog()
        search_path = req.search_path or upstream.config.search_path
        try:
            analysis = self.rt.analysis_cache.get_or_analyze(sql, catalog, search_path)
            if not analysis.all_known and upstream.catalog_age() > _CATALOG_REFRESH_MIN_S:
                # The snapshot may predate a table created since; look once more before deciding.
                catalog = await upstream.ensure_catalog(refresh=True)
                analysis = self.rt.analysis_cache.get_or_analyze(sql, catalog, search_path)
        except SqlSyntaxError as e:
            raise SqlSyntax(f"syntax error: {e.message}", position=e.position) from None
        req.analysis = analysis
        if req.door != "wire":
            # Over HTTP a request is one transaction managed by the proxy; letting the client
            # commit midway would break the all-or-nothing promise.
            for st in analysis.statements:
                if st.kind is StatementKind.TRANSACTION:
                    raise BadRequest(
                        "transaction control is not accepted here: "
                        "each request already runs in one transaction",
                        sqlstate="25000",
                    )
                if (
                    st.kind is StatementKind.COPY
                    and st.copy is not None
                    and st.copy.target == "stdio"
                    and not req.extra.get("copy_stream")  # the HTTP bulk import/export routes
                ):
                    raise BadRequest(
                        "COPY FROM STDIN / TO STDOUT needs the wire protocol "
                        "(or /api/v1/import and /api/v1/export)",
                        sqlstate="0A000",
                    )
            if req.params and len(analysis.statements) != 1:
                raise BadRequest("params are only accepted with a single statement", sqlstate="42P02")
        req.stage_seconds[self.name] = time.perf_counter() - t
        await call_next(req)


class PolicyStage:
    name = "policy"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        # The principal of each identity, made once: identities are rebuilt on reload, so an
        # entry keeps its identity object and is only used for that same object.
        self._principals: IdMemo[Identity, Principal] = IdMemo()

    def _principal(self, ident: Identity) -> Principal:
        hit = self._principals.get(ident)
        if hit is not None:
            return hit
        principal = Principal(
            name=ident.name, roles=ident.roles, attributes=ident.attributes, admin=ident.admin
        )
        return self._principals.put(ident, principal)

    async def __call__(self, req: Request, call_next: Next) -> None:
        t = time.perf_counter()
        assert req.identity is not None and req.analysis is not None and req.database is not None
        decision = self.rt.policy.decide(self._principal(req.identity), req.database, req.analysis)
        req.decision = decision
        req.stage_seconds[self.name] = time.perf_counter() - t
        if not decision.allowed:
            raise Denied(
                f"permission denied by rule {decision.rule!r}: {decision.reason}", rule=decision.rule
            )
        await call_next(req)


class RewriteStage:
    """Row filters and column masks are enforced by rewriting the real statement (with its
    literals) before it is sent, identically for every door. The rewrite is done once per
    statement shape (sql/rewrite_cache.py) and the statement's constants spliced back in."""

    name = "rewrite"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        t = time.perf_counter()
        assert req.sql is not None and req.decision is not None and req.analysis is not None
        texts = list(pg_parser.split(req.sql)) if len(req.analysis.statements) > 1 else [req.sql]
        directives = self.rt.rewrite_directives(req.decision)
        if directives:
            texts = rewrite_statements(self.rt, req, texts, directives)
        req.statements = texts
        req.stage_seconds[self.name] = time.perf_counter() - t
        await call_next(req)


def rewrite_statements(
    rt: Runtime, req: Request, texts: list[str], directives: dict[TableName, RelationRewrite]
) -> list[str]:
    """``texts`` (the request's statements, in order) with the row filters and masks of
    ``directives`` applied to the statements that touch their tables; sets ``req.rewritten``
    when any was. Raises Denied when a statement cannot be rewritten safely."""
    from sqlproxy.sql.rewrite import RewriteError
    from sqlproxy.sql.rewrite_cache import SHARED as rewrite_cache

    assert req.analysis is not None and req.upstream is not None and req.decision is not None
    catalog = req.upstream.catalog
    assert catalog is not None
    path = list(req.search_path or req.upstream.config.search_path)
    out: list[str] = []
    for st, text in zip(req.analysis.statements, texts, strict=True):
        touched = {r.table for r in st.relations}
        mine = {tn: d for tn, d in directives.items() if tn in touched}
        if mine:
            try:
                text = rewrite_cache.rewrite(text, mine, catalog, path, rt.mask_salt)
            except RewriteError as e:
                raise Denied(f"cannot apply row filter or mask: {e}", rule=req.decision.rule) from None
            req.rewritten = True
        if st.search_path is not None:
            path = list(st.search_path)
        out.append(text)
    return out


class ExecuteStage:
    name = "execute"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        if req.dry_run:
            await call_next(req)
            return
        t = time.perf_counter()
        assert req.upstream is not None and req.identity is not None and req.analysis is not None
        try:
            if req.executor is not None:
                await req.executor(req)
            else:
                req.results = await req.upstream.run(
                    req.statements,
                    user=req.identity.name,
                    max_rows=req.max_rows,
                    params=req.params,
                    session_state=may_change_session(req.analysis),
                )
        finally:
            req.stage_seconds[self.name] = time.perf_counter() - t
        if any(st.kind in _CATALOG_CHANGING for st in req.analysis.statements):
            # DDL changes what `*` expands to and which tables exist; refresh before the next request.
            try:
                await req.upstream.ensure_catalog(refresh=True)
            except UpstreamError:
                log.warning("catalog refresh after DDL failed for %s", req.database)
        await call_next(req)


_CATALOG_CHANGING = frozenset({StatementKind.DDL, StatementKind.GRANT})

# Statements that leave nothing on the server session once their transaction ends.
_SESSION_NEUTRAL = frozenset(
    {
        StatementKind.SELECT,
        StatementKind.INSERT,
        StatementKind.UPDATE,
        StatementKind.DELETE,
        StatementKind.MERGE,
        StatementKind.EXPLAIN,
        StatementKind.SHOW,
    }
)
# Functions whose effect outlives the transaction.
_SESSION_FUNCTIONS = (
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "dblink_connect",
    "lo_open",
)


def may_change_session(analysis: Analysis) -> bool:
    return any(st.kind not in _SESSION_NEUTRAL or calls_change_session(st) for st in analysis.statements)


def calls_change_session(st: StatementAnalysis) -> bool:
    """What a statement calls may leave state on the session whatever its kind: a set_config of
    a setting, a session advisory lock, a dangerous marker."""
    if st.dangers or st.settings:
        return True
    return any(fn.rsplit(".", 1)[-1].startswith(_SESSION_FUNCTIONS) for fn in st.functions)


class ClassifyStage:
    name = "classify"

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, req: Request, call_next: Next) -> None:
        t = time.perf_counter()
        assert req.analysis is not None
        out: list[dict[str, list[str]]] = []
        for i, st in enumerate(req.analysis.statements):
            rows = req.results[i].rows if i < len(req.results) else None
            outputs = st.outputs
            if not outputs and st.cursor_op == "fetch" and req.cursors is not None and st.cursor is not None:
                outputs = req.cursors.get(st.cursor, ())
            out.append(self.rt.classifier.classify(outputs, rows) if outputs else {})
        req.classifications = out
        req.stage_seconds[self.name] = time.perf_counter() - t
        await call_next(req)


def standard_stages(runtime: Runtime) -> list[object]:
    return [
        AuditStage(runtime),
        MetricsStage(runtime),
        AuthenticateStage(runtime),
        RateLimitStage(runtime),
        AnalyzeStage(runtime),
        PolicyStage(runtime),
        RewriteStage(runtime),
        ExecuteStage(runtime),
        ClassifyStage(runtime),
    ]
