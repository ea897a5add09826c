"""The running proxy: configuration, the services built from it, and the one pipeline every door
calls. Derived services (users, policy, classifier) are rebuilt on reload and swapped together;
a reload that fails leaves everything as it was."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlproxy.audit.chain import load_or_create_key
from sqlproxy.audit.configured import store_from_config
from sqlproxy.audit.record import AuditRecord, Shared, shared_list, shared_strs
from sqlproxy.audit.sink_process import SinkProcess
from sqlproxy.audit.sinks import JsonlSink
from sqlproxy.audit.writer import AuditQueue, AuditWriter
from sqlproxy.auth.lockout import Lockout
from sqlproxy.auth.users import UserDirectory
from sqlproxy.classify.classifier import Classifier
from sqlproxy.config.loader import Commit, ConfigHolder
from sqlproxy.config.models import MaskKind, ProxyConfig
from sqlproxy.execute.upstream import Upstream
from sqlproxy.memo import IdMemo
from sqlproxy.metrics import Metrics
from sqlproxy.pipeline.pipeline import Pipeline, Stage
from sqlproxy.pipeline.request import Request
from sqlproxy.pipeline.shortcut import Plans
from sqlproxy.pipeline.stages import standard_stages
from sqlproxy.policy.engine import Decision, PolicyEngine
from sqlproxy.ratelimit.service import RateLimiter
from sqlproxy.sql.cache import AnalysisCache
from sqlproxy.sql.model import Analysis, TableName
from sqlproxy.sql.rewrite import RelationRewrite
from sqlproxy.stream.hub import StreamHub
from sqlproxy.tcp import TcpOptions

log = logging.getLogger(__name__)

# statement_kinds, relations and columns of an audit record, made once per analysis.
_AuditParts = tuple[Shared, Shared, Shared]
_NO_PARTS: _AuditParts = (shared_strs(()), shared_list(()), shared_strs(()))
_AUDIT_PARTS_MAX = 4096
# The roles of an audit record, per set of roles.
_NO_ROLES = shared_strs(())
_AUDIT_ROLES_MAX = 1024


@dataclass(frozen=True, slots=True)
class Services:
    """Everything derived from one configuration, swapped as a unit."""

    config: ProxyConfig
    users: UserDirectory
    policy: PolicyEngine
    classifier: Classifier


def build_services(
    config: ProxyConfig,
    env: Mapping[str, str],
    previous: Services | None = None,
    new_lockout: Callable[[ProxyConfig], Lockout | None] | None = None,
) -> Services:
    # Lockout state survives a reload when its settings did not change: a reload must not be a
    # way to reset an attacker's failure count.
    lockout = None
    if previous is not None and previous.config.auth == config.auth:
        lockout = previous.users.lockout
    elif new_lockout is not None:
        lockout = new_lockout(config)
    return Services(
        config=config,
        users=UserDirectory(config, env, lockout=lockout),
        policy=PolicyEngine(config.policies, config.row_filters),
        classifier=Classifier(config.classification),
    )


class Runtime:
    def __init__(
        self,
        holder: ConfigHolder,
        env: Mapping[str, str] | None = None,
        *,
        audit_queue: AuditQueue | None = None,
    ) -> None:
        self.config = holder
        self.env: Mapping[str, str] = env if env is not None else os.environ
        cfg = holder.current
        self.state_dir = Path(cfg.server.state_dir)
        self.metrics = Metrics()
        self.analysis_cache = AnalysisCache(maxsize=20_000)
        self._services = build_services(cfg, self.env, new_lockout=self._new_lockout)
        self.upstreams: dict[str, Upstream] = {
            n: Upstream(n, d, TcpOptions.from_config(cfg.wire)) for n, d in cfg.databases.items()
        }
        # One limiter for the life of the process: bucket state must survive reloads.
        self.rate_limiter = RateLimiter(cfg.rate_limits, cfg.distributed_rate_limiting)
        self.rate_limiter.register_metrics(self.metrics.registry)
        holder.on_change(self._on_config_change)
        # A wire worker process hands its records to the proxy's writer (audit_queue) and has
        # no writer, chain key or store of its own.
        self._writer = self._make_audit_writer(cfg) if audit_queue is None else None
        self.audit_queue: AuditQueue = audit_queue if audit_queue is not None else self.audit
        self.mask_salt = self._load_mask_salt()
        self.pipeline = Pipeline(self._stages())
        self.plans = Plans(self)
        self.stream = StreamHub(self)
        self._retired: list[Upstream] = []
        # What the wire door reports on /health (set by whoever starts it).
        self.wire_status: Callable[[], dict[str, Any]] | None = None
        # What an audit record takes from an analysis (kinds, relations, output columns), built
        # once per analysis object: the analysis cache hands the same object to every statement
        # of one shape. Keyed by id(); each entry holds its analysis, so the id stays its own.
        self._audit_parts: IdMemo[Analysis, _AuditParts] = IdMemo(_AUDIT_PARTS_MAX)
        self._audit_roles: dict[frozenset[str], Shared] = {}

    def _new_lockout(self, config: ProxyConfig) -> Lockout | None:
        """The lockout table for a new user directory; None: the directory makes its own."""
        return None

    def _stages(self) -> list[Stage]:
        return standard_stages(self)  # type: ignore[return-value]

    @property
    def audit(self) -> AuditWriter:
        if self._writer is None:
            raise RuntimeError("this process forwards its audit records and has no audit writer")
        return self._writer

    # -- services -------------------------------------------------------------------------------
    @property
    def services(self) -> Services:
        return self._services

    @property
    def users(self) -> UserDirectory:
        return self._services.users

    @property
    def policy(self) -> PolicyEngine:
        return self._services.policy

    @property
    def classifier(self) -> Classifier:
        return self._services.classifier

    def _on_config_change(self, old: ProxyConfig, new: ProxyConfig) -> Commit:
        # raises on a bad config: no swap
        services = build_services(new, self.env, self._services, self._new_lockout)

        def commit() -> None:
            self._services = services
            self.rate_limiter.apply(new.rate_limits, new.distributed_rate_limiting)
            tcp = TcpOptions.from_config(new.wire)
            for name, db in new.databases.items():
                cur = self.upstreams.get(name)
                if cur is None or cur.config != db:
                    if cur is not None:
                        self._retired.append(cur)
                    self.upstreams[name] = Upstream(name, db, tcp)
                else:
                    cur.tcp = tcp  # for the connections its pool opens from now on
            for name in list(self.upstreams):
                if name not in new.databases:
                    self._retired.append(self.upstreams.pop(name))

        return commit

    def reload(self) -> ProxyConfig:
        """Re-read the config file; raises ConfigError and keeps the running config if invalid."""
        try:
            cfg = self.config.reload()
        except Exception:
            self.metrics.reloads.labels("refused").inc()
            raise
        self.metrics.reloads.labels("applied").inc()
        self._close_retired_soon()
        return cfg

    def replace_config(self, new: ProxyConfig) -> None:
        """Apply a configuration checked elsewhere (a wire worker gets its reloads from the
        proxy's process); raises and keeps the running one if it cannot be applied."""
        self.config.replace(new)
        self._close_retired_soon()

    def _close_retired_soon(self) -> None:
        retired, self._retired = self._retired, []
        for up in retired:
            # Pool.close waits for connections in use to come back, so in-flight requests finish.
            asyncio.get_running_loop().create_task(up.close())

    def refresh_gauges(self) -> None:
        """Set the gauges read from state (pools, analysis cache) before a scrape or snapshot."""
        m = self.metrics
        for name, up in self.upstreams.items():
            st = up.pool_stats()
            m.pool_size.labels(name, "open").set(st["size"])
            m.pool_size.labels(name, "idle").set(st["idle"])
        m.cache_hits.set(self.analysis_cache.hits)
        m.cache_misses.set(self.analysis_cache.misses)

    def rewrite_directives(self, decision: Decision) -> dict[TableName, RelationRewrite]:
        out: dict[TableName, RelationRewrite] = {}
        masks: dict[TableName, dict[str, MaskKind]] = {}
        for src, kind in decision.masks.items():
            masks.setdefault(src.table, {})[src.column] = kind
        for table in set(masks) | set(decision.row_filters):
            out[table] = RelationRewrite(
                row_filter=decision.row_filters.get(table), masks=masks.get(table, {})
            )
        return out

    def can_read_all_audit(self, roles: frozenset[str], admin: bool) -> bool:
        cfg = self.config.current
        return admin or any(cfg.roles[r].audit_all for r in roles if r in cfg.roles)

    # -- lifecycle ------------------------------------------------------------------------------
    def _state_path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.state_dir / p

    def _make_audit_writer(self, cfg: ProxyConfig) -> AuditWriter:
        a = cfg.audit
        key = load_or_create_key(
            env_var=a.hmac_key_env,
            key_file=self._state_path(a.hmac_key_file) if a.hmac_key_file else None,
            default_path=self._state_path("audit/chain.key"),
            env=self.env,
        )
        sinks: list[Any] = []
        if a.jsonl_path:
            sinks.append(JsonlSink(self._state_path(a.jsonl_path), a.rotate_bytes, a.keep_files))
        # sqlite:///PATH or postgresql://...; state_dir is the config's, as self._state_path uses.
        store = store_from_config(cfg)
        return AuditWriter(
            sinks=sinks,
            store=store,
            key=key,
            queue_size=a.queue_size,
            batch_size=a.batch_size,
            sink_process=SinkProcess() if a.writer_process else None,
        )

    def _load_mask_salt(self) -> str:
        path = self._state_path("mask.salt")
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        salt = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(salt)
        return salt

    async def start(self) -> None:
        # A process without an audit writer (a wire worker) has no stream door either: the
        # stream's audit channel is fed by the writer.
        if self._writer is not None:
            await self._writer.start()
            await self.stream.start()
        await self.rate_limiter.start()
        await asyncio.gather(*(u.start() for u in self.upstreams.values()))

    async def close(self) -> None:
        await self.rate_limiter.close()
        await asyncio.gather(*(u.close() for u in [*self.upstreams.values(), *self._retired]))
        if self._writer is not None:
            await self.stream.stop()
            await self._writer.close()

    # -- requests -------------------------------------------------------------------------------
    async def handle(self, req: Request) -> Request:
        """Run ``req`` through the pipeline, or through its shape's plan when one was learnt
        (see :mod:`sqlproxy.pipeline.shortcut`). Raises ProxyError when it did not succeed."""
        plan = self.plans.lookup(req)
        if plan is not None:
            self.analysis_cache.hits += 1  # the analysis was reused, as a cache hit would
            await self.plans.run(req, plan)
            return req
        await self.pipeline.run(req)
        self.plans.learn(req)
        return req

    def _analysis_audit_parts(self, a: Analysis) -> _AuditParts:
        # Shared between records, with their JSON text: no one may change them.
        hit = self._audit_parts.get(a)
        if hit is not None:
            return hit
        parts: _AuditParts = (
            shared_strs(a.kinds),
            shared_list(
                {"table": r.table.qualified, "access": str(r.access), "columns": sorted(r.columns)}
                for r in a.relations
            ),
            shared_strs(o.name for st in a.statements for o in st.outputs),
        )
        return self._audit_parts.put(a, parts)

    def _audit_roles_of(self, roles: frozenset[str]) -> Shared:
        hit = self._audit_roles.get(roles)
        if hit is None:
            if len(self._audit_roles) >= _AUDIT_ROLES_MAX:
                self._audit_roles.clear()
            hit = self._audit_roles[roles] = shared_strs(sorted(roles))
        return hit

    async def audit_request(self, req: Request) -> None:
        """Queue the audit record of ``req`` (waiting only while the audit queue is full)."""
        record = self.audit_record(req)
        if not self.audit_queue.try_enqueue(record):
            await self.audit_queue.enqueue(record)

    def audit_record(self, req: Request) -> AuditRecord:
        """The audit record of ``req`` as it stands."""
        ident = req.identity
        a = req.analysis
        err = req.error
        decision = req.decision
        rows: int | None = None
        results = req.results
        if results:
            rows = results[0].row_count if len(results) == 1 else sum(r.row_count for r in results)
        classifications: dict[str, list[str]] = {}
        for per_stmt in req.classifications:
            for col, labels in per_stmt.items():
                if labels:
                    classifications[col] = sorted(set(classifications.get(col, [])) | set(labels))
        sql_text = req.sql
        if sql_text is not None and self.config.current.audit.redact_literals:
            sql_text = a.normalized if a is not None else "<unparsed: redacted>"
        extra = req.extra
        if req.dry_run or req.rewritten:
            extra = dict(extra)
            if req.dry_run:
                extra["dry_run"] = True
            if req.rewritten:
                extra["rewritten"] = True
        parts = self._analysis_audit_parts(a) if a is not None else _NO_PARTS
        if err is None:
            outcome = "allow"
            rule = decision.rule if decision is not None else None
            reason = decision.reason if decision is not None else None
            sqlstate = message = None
        else:
            outcome = err.decision
            rule = err.rule if err.rule else (decision.rule if decision is not None else None)
            reason = message = err.message
            sqlstate = err.sqlstate
        # Sealed into the chain by the writer's drain task, off the request's path. build makes
        # the record AuditRecord.new would make (and copies extra and classifications).
        return AuditRecord.build(
            req.id,
            None,
            ident.name if ident is not None else None,
            (self._audit_roles.get(ident.roles) or self._audit_roles_of(ident.roles))
            if ident is not None
            else _NO_ROLES,
            req.source,
            req.door,
            req.database,
            sql_text,
            a.fingerprint if a is not None else None,
            parts[0],
            parts[1],
            parts[2],
            outcome,
            rule,
            reason,
            rows,
            round(req.elapsed_ms, 3),
            classifications,
            sqlstate,
            message,
            extra,
        )
