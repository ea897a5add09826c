"""Deciding extended-protocol statements: a Parse runs the pipeline's decision stages
(authenticate, analyze, policy, rewrite: the same stage classes as every door, minus execution
and audit) once per SQL text per session; Bind and Execute then cost a dictionary lookup.

Server-side statement names are global: every client statement with the same upstream text,
parameter types and search_path maps to one name, so a server connection that prepared it for
one client serves it to the next (PgBouncer 1.21's approach to prepared statements in
transaction pooling).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from sqlproxy.pipeline.errors import BadRequest, ProxyError
from sqlproxy.pipeline.pipeline import Pipeline
from sqlproxy.pipeline.request import Request
from sqlproxy.pipeline.stages import AnalyzeStage, AuthenticateStage, PolicyStage, RewriteStage
from sqlproxy.policy.engine import Decision
from sqlproxy.runtime import Runtime
from sqlproxy.sql.model import Analysis, StatementKind

# Statements that leave state in the server session which the proxy cannot carry over to
# another connection: in transaction pool mode the client keeps its connection from then on.
PIN_KINDS = frozenset(
    {
        StatementKind.LISTEN,
        StatementKind.PREPARE,
        StatementKind.EXECUTE,
        StatementKind.DDL,
        StatementKind.DO,
        StatementKind.CALL,
        StatementKind.OTHER,
        StatementKind.GRANT,
    }
)
_PIN_FUNCTIONS = ("set_config", "pg_advisory_lock", "pg_try_advisory_lock", "dblink_connect")

_names: dict[tuple[bytes, bytes, tuple[str, ...] | None], str] = {}
_counter = itertools.count(1)


def server_name(upstream_sql: bytes, types: bytes, search_path: tuple[str, ...] | None) -> str:
    key = (upstream_sql, types, search_path)
    name = _names.get(key)
    if name is None:
        name = f"sqlproxy_{next(_counter)}"
        _names[key] = name
    return name


def pins(analysis: Analysis | None) -> bool:
    if analysis is None:
        return False
    for st in analysis.statements:
        # A WITH HOLD cursor lives on in the server session after its transaction; any other
        # cursor ends with the transaction, during which the client keeps its connection. A
        # set_config of a plain setting (st.settings) may be a session-level one.
        if st.kind in PIN_KINDS or st.holds_cursor or st.settings:
            return True
        for fn in st.functions:
            if fn.rsplit(".", 1)[-1].startswith(_PIN_FUNCTIONS):
                return True
    return False


@dataclass(slots=True, eq=False)
class Prepared:
    """A client statement as decided: what to send upstream and what to audit with."""

    sql: str
    upstream_sql: bytes  # rewritten when masks or row filters apply
    types: bytes  # Parse's parameter-type section, verbatim
    server_name: str
    search_path: tuple[str, ...] | None
    analysis: Analysis | None = None
    decision: Decision | None = None
    statements: list[str] = field(default_factory=list)
    rewritten: bool = False
    pin: bool = False
    sets: bool = False
    # By lineage, per statement (the wire door forwards rows without reading them): what the
    # audit record of each Execute carries, as the simple protocol's records do.
    classifications: list[dict[str, list[str]]] = field(default_factory=list)
    # FETCH of a cursor declared by an earlier statement: its name (the session knows its lineage).
    fetch_cursor: str | None = None
    # The policy it was decided under: after a reload, the session decides it again at its next
    # Bind (a client keeps its named statements across reloads).
    policy: object = None
    # The Parse message that prepares it as the unnamed statement, made once.
    unnamed_parse: bytes = b""


class Decider:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.pipeline = Pipeline(
            [
                AuthenticateStage(runtime),
                AnalyzeStage(runtime),
                PolicyStage(runtime),
                RewriteStage(runtime),
            ]
        )

    async def decide(self, req: Request, types: bytes) -> Prepared:
        """Raises ProxyError (req.error set) when the statement may not be prepared."""
        sql = req.sql or ""
        policy = self.rt.policy  # before deciding: a reload meanwhile makes it stale, not wrong
        if not sql.strip():
            # An empty statement runs nothing; the server answers EmptyQueryResponse.
            return Prepared(sql, b"", types, server_name(b"", types, req.search_path), req.search_path)
        try:
            await self.pipeline.run(req)
            assert req.analysis is not None
            if len(req.analysis.statements) > 1:
                raise BadRequest(
                    "cannot insert multiple commands into a prepared statement", sqlstate="42601"
                )
        except Exception as e:
            req.error = e if isinstance(e, ProxyError) else ProxyError(f"internal error: {type(e).__name__}")
            raise req.error from None
        a = req.analysis
        classify = self.rt.classifier.classify
        upstream = (req.statements[0] if req.rewritten else sql).encode("utf-8")
        return Prepared(
            sql=sql,
            upstream_sql=upstream,
            types=types,
            server_name=server_name(upstream, types, req.search_path),
            search_path=req.search_path,
            analysis=a,
            decision=req.decision,
            statements=list(req.statements),
            rewritten=req.rewritten,
            pin=pins(a),
            sets=any(st.kind is StatementKind.SET for st in a.statements),
            classifications=[classify(st.outputs) if st.outputs else {} for st in a.statements],
            fetch_cursor=next((st.cursor for st in a.statements if st.cursor_op == "fetch"), None),
            policy=policy,
        )
