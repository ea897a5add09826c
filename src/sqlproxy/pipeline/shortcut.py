"""Statement plans: the pipeline's shape-determined work, done once per statement shape.

A door that authenticates its client itself and executes by itself (the wire door) sends one
statement after another that differ only in their literals (pgbench, an ORM's point lookups).
For such a statement everything but the execution is decided by its *shape*: the analysis (cached
by normalized text), the policy decision (a function of who, where and the analysis), which row
filters and masks apply (the rewrite itself is redone for each statement, with its constants,
through the rewrite cache) and the classification by lineage. The full pipeline runs for the
first statement of a shape; when it succeeded, what it decided is kept as a :class:`Plan`. Later
statements of the same shape, from the same identity, in the same database and search_path,
under the same configuration, policy and catalog snapshot, skip straight to what must happen per
statement, in the pipeline's order and with its guarantees:

- audit outermost: exactly one record per statement, whatever happens (the same record the
  pipeline would write: the same fields from the same request);
- metrics;
- the rate limiter: every statement spends its token (and a refusal is audited as such);
- the rewrite for row filters and masks, when the decision has any;
- the door's executor;
- the lineage classification.

Transaction control (BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT x, ...) gets a plan too, but only
for a text without literals (its normalized text is the text itself), so the plan stands for
exactly that statement: ``PREPARE TRANSACTION 'gid'`` never gets one.

What never gets a plan: anything that failed or was denied; other statements that are not plain
SELECT/INSERT/UPDATE/DELETE/MERGE (their literals can matter: ``SET``, ``COPY``, utility
statements); statements naming a relation the catalog snapshot does not know; dry runs;
requests whose results carry rows to classify by value. Anything unusual about a request (no
identity, a preflight error, an empty or oversized or NUL-containing text, parameters) sends it
through the full pipeline, which reports it as always.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pglast.parser import ParseError, normalize

from sqlproxy.pipeline.errors import ProxyError
from sqlproxy.pipeline.request import Request
from sqlproxy.pipeline.stages import audit, internal_error, rewrite_statements
from sqlproxy.sql.cache import shape_cacheable
from sqlproxy.sql.model import StatementKind

if TYPE_CHECKING:
    from sqlproxy.execute.upstream import Upstream
    from sqlproxy.policy.engine import Decision
    from sqlproxy.runtime import Runtime
    from sqlproxy.sql.model import Analysis, TableName
    from sqlproxy.sql.rewrite import RelationRewrite


_MAX_PLANS = 10_000
_MAX_TEXTS = 4_096
_MAX_TEXT_CHARS = 2_048
# Doors whose results never carry rows to classify by value (the wire door forwards rows without
# reading them), so a shape's classification is its lineage's.
PLANNED_DOORS = frozenset({"wire"})


def _literal_free_transaction_control(a: Analysis, sql: str | None) -> bool:
    """Transaction control whose text has no literal to normalize away: its plan's key (the
    normalized text) is then this exact statement and nothing else. (PostgreSQL's transaction
    statements carry their gids and savepoint names as identifiers or plain strings, which the
    normalizer keeps; this holds the line should one ever be normalized to a placeholder.)"""
    return (
        bool(a.statements)
        and all(st.kind is StatementKind.TRANSACTION for st in a.statements)
        and a.normalized == sql
    )


@dataclass(frozen=True, slots=True)
class Plan:
    analysis: Analysis
    decision: Decision
    # Row filters and masks to apply (the statement is rewritten on every execution, with its
    # own constants, through the rewrite cache); empty when the statement runs as sent.
    directives: dict[TableName, RelationRewrite]
    classifications: list[dict[str, list[str]]]
    database: str
    upstream: Upstream
    # What the key's objects were, kept so that an id() in the key is never reused for another.
    holds: tuple[object, ...]


class Plans:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._plans: dict[tuple[object, ...], Plan] = {}
        self._generations: dict[str, tuple[object, ...]] = {}
        self._normalized: dict[str, str] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._plans)

    def _key(self, req: Request, normalized: str) -> tuple[tuple[object, ...], tuple[object, ...]] | None:
        rt = self.rt
        upstream = rt.upstreams.get(req.database) if req.database is not None else None
        catalog = upstream.catalog if upstream is not None else None
        if catalog is None:
            return None
        # Objects that a reload or a new catalog snapshot replaces: an older plan is unreachable.
        cfg = rt.config.current
        services = rt.services
        holds = (req.identity, cfg, services, catalog, upstream)
        key = (
            req.door,
            req.database,
            req.search_path,
            normalized,
            id(req.identity),
            id(cfg),
            id(services),
            id(catalog),
            id(upstream),
        )
        return key, holds

    def lookup(self, req: Request) -> Plan | None:
        """The plan for this request, or None: then it goes through the whole pipeline. No side
        effects (nothing is spent or recorded) either way."""
        sql = req.sql
        if (
            req.door not in PLANNED_DOORS
            or req.identity is None
            or req.executor is None
            or req.preflight_error is not None
            or req.dry_run
            or req.params
            or not sql
            or sql.isspace()
            or len(sql) * 4 > self.rt.config.current.server.max_sql_bytes
            or "\x00" in sql
        ):
            return None
        normalized = self._normalized.get(sql)
        if normalized is None:
            try:
                normalized = normalize(sql)
            except ParseError:
                return None
            # Texts that recur verbatim (BEGIN, COMMIT, a query without literals) skip the
            # normalizer next time; texts with a new literal each time just pass through.
            if len(sql) <= _MAX_TEXT_CHARS:
                if len(self._normalized) >= _MAX_TEXTS:
                    self._normalized.clear()
                self._normalized[sql] = normalized
        found = self._key(req, normalized)
        if found is None:
            return None
        key, holds = found
        plan = self._plans.get(key)
        if plan is None or plan.holds != holds:
            return None
        return plan

    def learn(self, req: Request) -> None:
        """Keep what the pipeline decided for ``req`` if its shape decides all of it."""
        a = req.analysis
        decision = req.decision
        upstream = req.upstream
        if (
            req.door not in PLANNED_DOORS
            or req.error is not None
            or a is None
            or decision is None
            or not decision.allowed
            or upstream is None
            or req.database is None
            or req.executor is None
            or req.identity is None
            or req.dry_run
            or req.params
            or not (shape_cacheable(a) or _literal_free_transaction_control(a, req.sql))
            or not a.all_known
            or len(a.statements) != 1
            or any(r.rows for r in req.results)
        ):
            return
        # The plan is kept under the normalized text its analysis was made from: a lookup finds
        # it only for statements of that very shape, whatever text this request had.
        found = self._key(req, a.normalized)
        if found is None:
            return
        key, holds = found
        # holds = (identity, config, services, catalog, upstream). When a reload or a new
        # catalog snapshot is first seen, the plans made under the old ones can never be used
        # again: drop them now rather than keep old catalogs alive until the cache fills up.
        generation = holds[1:]
        if self._generations.get(req.database) != generation:
            self._generations[req.database] = generation
            db = req.database
            kept = {k: p for k, p in self._plans.items() if p.database != db or p.holds[1:] == generation}
            self._plans = kept
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = Plan(
            analysis=a,
            decision=decision,
            directives=self.rt.rewrite_directives(decision),
            classifications=list(req.classifications),
            database=req.database,
            upstream=upstream,
            holds=holds,
        )

    async def run(self, req: Request, plan: Plan) -> None:
        """What the pipeline does for a statement whose shape is decided: audit, metrics, the
        rate limiter, execution. Raises ProxyError as the pipeline does."""
        rt = self.rt
        self.hits += 1
        try:
            try:
                ident = req.identity
                assert ident is not None and req.executor is not None
                rl = rt.rate_limiter
                if rl.active:
                    pending = rl.admit(ident.name, ident.roles, plan.database)
                    if pending is not None:
                        await pending
                req.database = plan.database
                req.upstream = plan.upstream
                req.analysis = plan.analysis
                req.decision = plan.decision
                texts = [req.sql or ""]
                if plan.directives:
                    texts = rewrite_statements(rt, req, texts, plan.directives)
                req.statements = texts
                t = time.perf_counter()
                try:
                    await req.executor(req)
                finally:
                    req.stage_seconds["execute"] = time.perf_counter() - t
                req.classifications = plan.classifications
            except ProxyError as e:
                req.error = e
                raise
            except Exception as e:
                raise internal_error(req, e) from e
            finally:
                rt.metrics.observe_request(req)
        finally:
            await audit(rt, req)
