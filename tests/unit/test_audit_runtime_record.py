"""``Runtime.audit_record`` (shared per-shape values, ``AuditRecord.build``) makes the record the
generic path made from the same request: ``AuditRecord.new`` with the arguments as the runtime
computed them before the fast path, field for field and byte for byte once sealed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sqlproxy.audit import record as record_mod
from sqlproxy.audit.chain import Chain, ChainState
from sqlproxy.audit.record import AuditRecord
from sqlproxy.auth.users import Identity
from sqlproxy.config.loader import ConfigHolder, parse_config
from sqlproxy.execute.upstream import StatementResult
from sqlproxy.pipeline.errors import Denied, ProxyError, UpstreamError
from sqlproxy.pipeline.request import Request
from sqlproxy.policy.engine import Decision
from sqlproxy.runtime import Runtime
from sqlproxy.sql.catalog import Catalog

KEY = bytes.fromhex("44" * 32)
CATALOG = Catalog.from_dict(
    {
        "public.accounts": {"columns": ["aid", "abalance", "owner"]},
        "hr.people": {"columns": ["id", "email"]},
    }
)
TS = "2024-05-06T07:08:09.123456Z"
DURATION = 3.1415926


def generic_record(rt: Runtime, req: Request) -> AuditRecord:
    """The runtime's record before the fast path (its code, with AuditRecord.new)."""
    cfg = rt.config.current
    ident, a, err = req.identity, req.analysis, req.error
    rows = sum(r.row_count for r in req.results) if req.results else None
    classifications: dict[str, list[str]] = {}
    for per_stmt in req.classifications:
        for col, labels in per_stmt.items():
            if labels:
                classifications[col] = sorted(set(classifications.get(col, [])) | set(labels))
    if req.sql is None:
        sql_text = None
    elif cfg.audit.redact_literals and a is not None:
        sql_text = a.normalized
    elif cfg.audit.redact_literals:
        sql_text = "<unparsed: redacted>"
    else:
        sql_text = req.sql
    decision = req.decision
    extra = dict(req.extra)
    if req.dry_run:
        extra["dry_run"] = True
    if req.rewritten:
        extra["rewritten"] = True
    parts: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    if a is not None:
        parts = (
            [str(k) for k in a.kinds],
            [
                {"table": r.table.qualified, "access": str(r.access), "columns": sorted(r.columns)}
                for r in a.relations
            ],
            [o.name for st in a.statements for o in st.outputs],
        )
    rule = err.rule if err is not None and err.rule else (decision.rule if decision is not None else None)
    return AuditRecord.new(
        id=req.id,
        ts=TS,
        user=ident.name if ident is not None else None,
        roles=sorted(ident.roles) if ident is not None else [],
        source=req.source,
        door=req.door,
        database=req.database,
        sql=sql_text,
        fingerprint=a.fingerprint if a is not None else None,
        statement_kinds=parts[0],
        relations=parts[1],
        columns=parts[2],
        decision="allow" if err is None else err.decision,
        rule=rule,
        reason=(err.message if err is not None else (decision.reason if decision is not None else None)),
        rows=rows,
        duration_ms=round(DURATION, 3),
        classifications=classifications,
        sqlstate=err.sqlstate if err is not None else None,
        error=err.message if err is not None else None,
        extra=extra,
    )


def make_runtime(tmp_path: Path, *, redact: bool = False) -> Runtime:
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "databases": {"main": {"dsn": "postgresql://u@127.0.0.1:1/main"}},
            "audit": {"hmac_key_env": "AUDIT_KEY", "redact_literals": redact},
        }
    )
    return Runtime(ConfigHolder(cfg), env={"AUDIT_KEY": KEY.hex()})


def request(rt: Runtime, sql: str | None, **kw: Any) -> Request:
    req = Request(
        door=kw.pop("door", "wire"), sql=sql, source_ip="10.1.2.3", source_port=kw.pop("port", 5432)
    )
    if sql is not None and kw.pop("analyse", True):
        req.analysis = rt.analysis_cache.get_or_analyze(sql, CATALOG, ("public",))
    for k, v in kw.items():
        setattr(req, k, v)
    return req


ALICE = Identity("alice", frozenset({"writer", "analyst"}))
ALLOW = Decision(True, "read-all, mask", "allowed by rules 'read-all', 'mask'", ("read-all", "mask"))


def cases(rt: Runtime) -> list[Request]:
    return [
        request(
            rt,
            "SELECT abalance FROM accounts WHERE aid = 7",
            identity=ALICE,
            decision=ALLOW,
            results=[StatementResult("SELECT 1", row_count=1)],
        ),
        request(
            rt,
            "SELECT abalance FROM accounts WHERE aid = 8; "
            "UPDATE accounts SET owner = 'é\"\\\\' WHERE aid = 1",
            identity=ALICE,
            decision=ALLOW,
            results=[StatementResult("SELECT 1", row_count=1), StatementResult("UPDATE 3", row_count=3)],
            classifications=[{"owner": ["pii"], "email": []}, {"owner": ["name", "pii"]}],
            dry_run=True,
            rewritten=True,
            extra={"copy": {"bytes": 12, "api_key": "k"}, "password": "hunter2", "t": (1, 2)},
        ),
        request(
            rt,
            "SELECT email FROM hr.people",
            identity=ALICE,
            decision=Decision(False, "no-hr", "denied by rule 'no-hr'"),
            error=Denied("denied by rule 'no-hr'", rule="no-hr"),
        ),
        request(
            rt,
            "SELECT 1",
            identity=ALICE,
            decision=ALLOW,
            error=UpstreamError("server closed the connection", sqlstate="08006"),
        ),
        request(rt, None, door="http", port=None, error=ProxyError("no credentials")),
        request(rt, "SELEC broken", analyse=False, identity=Identity("bob", frozenset())),
    ]


@pytest.mark.parametrize("redact", [False, True])
async def test_runtime_record_is_the_generic_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redact: bool
) -> None:
    monkeypatch.setattr(record_mod, "utc_now_iso", lambda: TS)
    monkeypatch.setattr(Request, "elapsed_ms", property(lambda self: DURATION))
    rt = make_runtime(tmp_path, redact=redact)
    for n, req in enumerate(cases(rt) * 2):  # the second time from the runtime's caches
        fast = rt.audit_record(req)
        generic = generic_record(rt, req)
        assert fast == generic, n
        for name, v in fast.to_dict().items():
            assert type(v) is type(generic.to_dict()[name]), (n, name)
        assert "hunter2" not in repr(fast) and '"k"' not in repr(fast)
        s_fast = Chain(KEY, ChainState(n, "cd" * 32)).append(fast, in_place=True)
        s_generic = Chain(KEY, ChainState(n, "cd" * 32)).append(generic)
        assert s_fast.hash == s_generic.hash
        assert s_fast.jsonl_line() == s_generic.jsonl_line()
        assert _same_row(s_fast, s_generic)


def _same_row(a: AuditRecord, b: AuditRecord) -> bool:
    # NaN (None) != NaN: compare what SQLite would store.
    def norm(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(None if isinstance(v, float) and v != v else v for v in row)

    return norm(a.store_row()) == norm(b.store_row())
