"""Analysis of a SQL string on PostgreSQL's own grammar: one ``StatementAnalysis`` per statement.

Choices made where PostgreSQL's behaviour is not a plain read or write (the policy layer relies
on them; stricter readings are preferred wherever the two differ):

- ``LOCK t IN ACCESS SHARE MODE`` is READ on t; any stronger mode is READ plus UPDATE (columns
  empty), as PostgreSQL asks for UPDATE/DELETE/TRUNCATE privilege for those modes.
- ``SELECT ... FOR UPDATE/SHARE`` adds UPDATE (columns empty) on the locked relations (all read
  relations when none are named), as PostgreSQL asks for UPDATE privilege too.
- VACUUM / ANALYZE / CLUSTER / REINDEX / REFRESH MATERIALIZED VIEW are DDL access on each named
  relation (they need ownership or MAINTAIN).
- In DDL, every relation named anywhere (the subject, REFERENCES, LIKE, INHERITS, PARTITION OF)
  is DDL access; queries inside DDL (view bodies, CTAS, rules, SQL-standard function bodies) are
  analysed as queries, so their reads and writes are reported as such.
- A view is reported as READ of the view itself; the base tables it reads are the view owner's
  business and appear only as ``outputs`` lineage (followed through the view definition).
- SELECT ... INTO is DDL (it creates a table) with ``inner_kind`` SELECT.
- DECLARE CURSOR is CURSOR with the query's relations and output lineage (the rows its FETCHes
  will return), ``inner_kind`` SELECT, ``executes_inner`` and ``holds_cursor`` for WITH HOLD;
  FETCH, MOVE and CLOSE are CURSOR without relations, and FETCH's rows are not described.
- RESET ALL and DISCARD ALL reset search_path to ``default_search_path`` and are marked
  ``set_role`` (they also reset the role).
- Statement types the analyser does not know are OTHER, with every relation named inside them as
  DDL access and the danger marker ``unanalyzed``.

Danger markers are listed in ``sqlproxy.sql.kinds``. Temp tables are not in the catalog: a name
shadowed by a temp table resolves as if the temp table did not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pglast import ast
from pglast.enums import (
    CURSOR_OPT_HOLD,
    DiscardMode,
    DropBehavior,
    ObjectType,
    ReindexObjectType,
    VariableSetKind,
)
from pglast.parser import ParseError, fingerprint, normalize, parse_sql

from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.kinds import DEFINE_CODE_KINDS, STATEMENT_DANGERS, statement_kind
from sqlproxy.sql.model import (
    Access,
    Analysis,
    CopyInfo,
    OutputColumn,
    SqlSyntaxError,
    StatementAnalysis,
    StatementKind,
    TableName,
)
from sqlproxy.sql.naming import string_fields
from sqlproxy.sql.scope import Col, Entry, Scope
from sqlproxy.sql.walker import QUERY_NODES, Accumulator, QueryWalker

# PostgreSQL's built-in default; "$user" never matches a catalog schema (see Catalog.resolve).
DEFAULT_SEARCH_PATH: tuple[str, ...] = ("$user", "public")

_RELATION_OBJECTS = frozenset(
    {
        ObjectType.OBJECT_TABLE,
        ObjectType.OBJECT_VIEW,
        ObjectType.OBJECT_MATVIEW,
        ObjectType.OBJECT_FOREIGN_TABLE,
        ObjectType.OBJECT_INDEX,
        ObjectType.OBJECT_SEQUENCE,
    }
)
# Objects named "<relation parts>.<object name>": the relation is all but the last part.
_ON_RELATION_OBJECTS = frozenset(
    {
        ObjectType.OBJECT_COLUMN,
        ObjectType.OBJECT_TRIGGER,
        ObjectType.OBJECT_POLICY,
        ObjectType.OBJECT_RULE,
        ObjectType.OBJECT_TABCONSTRAINT,
    }
)
_FALSE_WORDS = frozenset({"false", "off", "0", "no"})


def analyze(
    sql: str,
    catalog: Catalog,
    search_path: Sequence[str],
    *,
    default_search_path: Sequence[str] = DEFAULT_SEARCH_PATH,
) -> Analysis:
    """Analyse every statement of ``sql``; raise ``SqlSyntaxError`` if PostgreSQL would not parse it."""
    try:
        raw = parse_sql(sql)
    except ParseError as e:
        raise _syntax_error(e) from None
    path = tuple(search_path)
    statements = []
    declared: dict[str, tuple[OutputColumn, ...]] = {}
    for index, stmt in enumerate(raw):
        result = analyze_statement(index, stmt.stmt, catalog, path, tuple(default_search_path))
        if result.search_path is not None:
            path = result.search_path
        if result.cursor_op == "declare" and result.cursor is not None:
            declared[result.cursor] = result.outputs
        elif result.cursor_op == "fetch" and result.cursor in declared:
            result = replace(result, outputs=declared[result.cursor])
        statements.append(result)
    return Analysis(tuple(statements), fingerprint(sql), normalize(sql), path)


def _syntax_error(e: ParseError) -> SqlSyntaxError:
    message = str(e.args[0]) if e.args else "syntax error"
    index = e.args[1] if len(e.args) > 1 else None
    return SqlSyntaxError(message, index + 1 if isinstance(index, int) and index >= 0 else None)


def analyze_statement(
    index: int,
    node: Any,
    catalog: Catalog,
    search_path: tuple[str, ...],
    default_search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH,
) -> StatementAnalysis:
    return _Statement(index, node, catalog, search_path, default_search_path).run()


@dataclass
class _Statement:
    index: int
    node: Any
    catalog: Catalog
    search_path: tuple[str, ...]
    default_search_path: tuple[str, ...]
    acc: Accumulator = field(default_factory=Accumulator)
    kind: StatementKind = StatementKind.OTHER
    outputs: list[Col] = field(default_factory=list)
    copy: CopyInfo | None = None
    new_path: tuple[str, ...] | None = None
    inner_kind: StatementKind | None = None
    executes_inner: bool = False
    holds_cursor: bool = False
    cursor_op: str | None = None
    cursor: str | None = None
    deallocates: str | None = None

    def __post_init__(self) -> None:
        self.walker = QueryWalker(self.catalog, self.search_path, self.acc)

    def run(self) -> StatementAnalysis:
        name = type(self.node).__name__
        kind = statement_kind(name)
        if kind is None:
            self.kind = StatementKind.OTHER
            self.acc.dangers.add("unanalyzed")
            self.generic(self.node)
        else:
            self.kind = kind
            handler = getattr(self, f"on_{name}", None)
            if handler is not None:
                handler(self.node)
            else:
                self.generic(self.node)
        return StatementAnalysis(
            index=self.index,
            kind=self.kind,
            relations=self.acc.relations(),
            outputs=tuple(OutputColumn(c.name, c.sources, c.direct) for c in self.outputs),
            functions=frozenset(self.acc.functions),
            dangers=frozenset(self.acc.dangers),
            copy=self.copy,
            search_path=self.new_path,
            inner_kind=self.inner_kind,
            executes_inner=self.executes_inner,
            holds_cursor=self.holds_cursor,
            cursor_op=self.cursor_op,
            cursor=self.cursor,
            deallocates=self.deallocates,
            settings=frozenset(self.acc.settings),
            literal_bound=self.acc.literal_bound,
        )

    # ------------------------------------------------------------------ helpers

    def generic(self, node: Any) -> None:
        """Walk a utility statement: relations are DDL, queries are analysed as queries."""
        if node is None or isinstance(node, (str, int, float, bool)):
            return
        if isinstance(node, tuple | list):
            for item in node:
                self.generic(item)
            return
        if isinstance(node, QUERY_NODES):
            self.walker.query(node, None)
            return
        if not isinstance(node, ast.Node):
            return
        danger = STATEMENT_DANGERS.get(type(node).__name__)
        if danger is not None:
            self.acc.dangers.add(danger)
        if isinstance(node, ast.DefineStmt) and node.kind is not None and node.kind.name in DEFINE_CODE_KINDS:
            self.acc.dangers.add("create_function")
        if isinstance(node, ast.RangeVar):
            self.relation(node, Access.DDL)
        elif isinstance(node, (ast.FuncCall, ast.CreateTrigStmt, ast.CreateEventTrigStmt)):
            self.walker.function(node.funcname)
        for attr in node:
            if attr != "location":
                self.generic(getattr(node, attr))

    def relation(self, rv: ast.RangeVar | None, access: Access, columns: Sequence[str] = ()) -> None:
        if rv is None:
            return
        tn, known = self.walker.resolve(rv)
        self.acc.access(tn, access, columns, known=known)

    def named_relation(self, parts: Sequence[str], access: Access) -> None:
        if not parts:
            return
        rv = ast.RangeVar(relname=parts[-1], schemaname=parts[-2] if len(parts) >= 2 else None, inh=True)
        self.relation(rv, access)

    def inner(self, node: Any) -> StatementAnalysis:
        """Analyse a wrapped statement and fold its uses into this one."""
        inner = analyze_statement(self.index, node, self.catalog, self.search_path, self.default_search_path)
        for rel in inner.relations:
            self.acc.access(rel.table, rel.access, rel.columns, known=rel.known)
        self.acc.functions |= inner.functions
        self.acc.dangers |= inner.dangers
        self.acc.settings |= inner.settings
        self.acc.literal_bound = self.acc.literal_bound or inner.literal_bound
        self.inner_kind = inner.kind
        return inner

    # ------------------------------------------------------------------ DML and queries

    def on_SelectStmt(self, node: ast.SelectStmt) -> None:
        self.outputs = self.walker.query(node, None)
        if node.intoClause is not None:
            self.kind = StatementKind.DDL
            self.inner_kind = StatementKind.SELECT
            self.executes_inner = True
            self.outputs = []
            self.relation(node.intoClause.rel, Access.DDL)

    def on_InsertStmt(self, node: Any) -> None:
        self.outputs = self.walker.query(node, None)

    on_UpdateStmt = on_InsertStmt
    on_DeleteStmt = on_InsertStmt
    on_MergeStmt = on_InsertStmt

    def on_CopyStmt(self, node: ast.CopyStmt) -> None:
        direction = "from" if node.is_from else "to"
        target = "program" if node.is_program else ("file" if node.filename is not None else "stdio")
        if target == "program":
            self.acc.dangers.add("copy_program")
        elif target == "file":
            self.acc.dangers.add("copy_file")
        fmt = "text"
        for opt in node.options or ():
            if isinstance(opt, ast.DefElem) and opt.defname == "format" and isinstance(opt.arg, ast.String):
                fmt = (opt.arg.sval or "text").lower()
        listed = string_fields(node.attlist)
        table: TableName | None = None
        if node.relation is not None:
            table, known = self.walker.resolve(node.relation)
            cols = self.walker.relation_cols(table) or []
            chosen = listed or tuple(c.name for c in cols)
            self.acc.access(table, Access.INSERT if node.is_from else Access.READ, chosen, known=known)
            if not node.is_from:
                by_name = {c.name: c for c in cols}
                self.outputs = [by_name.get(n, Col(n)) for n in chosen]
                self.outputs = [Col(c.name, c.sources, c.direct) for c in self.outputs]
            if node.whereClause is not None:
                # COPY FROM ... WHERE filters incoming rows: it reads no stored data.
                rows = Entry(table.name, [Col(c.name) for c in cols], complete=bool(cols))
                self.walker.expr(node.whereClause, Scope(entries=[rows]))
        elif node.query is not None:
            self.outputs = self.walker.query(node.query, None)
        self.copy = CopyInfo(direction, table, listed, target, fmt)

    # ------------------------------------------------------------------ wrappers

    def on_ExplainStmt(self, node: ast.ExplainStmt) -> None:
        self.inner(node.query)
        self.executes_inner = any(
            isinstance(o, ast.DefElem) and o.defname == "analyze" and _truthy(o.arg)
            for o in node.options or ()
        )
        self.outputs = [Col("QUERY PLAN")]

    def on_PrepareStmt(self, node: ast.PrepareStmt) -> None:
        self.inner(node.query)
        self.generic(node.argtypes)

    def on_DeclareCursorStmt(self, node: ast.DeclareCursorStmt) -> None:
        inner = self.inner(node.query)
        self.outputs = [Col(o.name, o.sources, o.direct) for o in inner.outputs]
        self.executes_inner = True
        self.holds_cursor = bool((node.options or 0) & CURSOR_OPT_HOLD)
        self.cursor_op, self.cursor = "declare", node.portalname

    def on_FetchStmt(self, node: ast.FetchStmt) -> None:
        self.cursor_op, self.cursor = ("move" if node.ismove else "fetch"), node.portalname

    def on_ClosePortalStmt(self, node: ast.ClosePortalStmt) -> None:
        self.cursor_op, self.cursor = "close", node.portalname or "*"

    def on_CreateTableAsStmt(self, node: ast.CreateTableAsStmt) -> None:
        if node.into is not None:
            self.relation(node.into.rel, Access.DDL)
        self.inner(node.query)
        self.executes_inner = not (node.into is not None and node.into.skipData)

    def on_ViewStmt(self, node: ast.ViewStmt) -> None:
        self.relation(node.view, Access.DDL)
        self.inner(node.query)

    def on_ExecuteStmt(self, node: ast.ExecuteStmt) -> None:
        self.walker.expr(node.params, Scope())

    def on_CallStmt(self, node: ast.CallStmt) -> None:
        self.walker.expr(node.funccall, Scope())

    # ------------------------------------------------------------------ session state

    def on_VariableSetStmt(self, node: ast.VariableSetStmt) -> None:
        name = (node.name or "").lower()
        if node.kind == VariableSetKind.VAR_RESET_ALL:
            self.new_path = self.default_search_path
            self.acc.dangers.add("set_role")
            return
        # sqlproxy.* settings carry the end user's identity into the database (sqlproxy.user):
        # changing one is an identity change like SET ROLE.
        if name in ("role", "session_authorization") or name.startswith("sqlproxy."):
            self.acc.dangers.add("set_role")
        if name != "search_path":
            self.walker.expr(node.args, Scope())
            return
        if node.kind == VariableSetKind.VAR_SET_VALUE:
            self.new_path = tuple(_setting_text(a) for a in node.args or ())
        elif node.kind in (VariableSetKind.VAR_SET_DEFAULT, VariableSetKind.VAR_RESET):
            self.new_path = self.default_search_path

    def on_VariableShowStmt(self, node: ast.VariableShowStmt) -> None:
        name = str(node.name or "").lower()
        if name == "all":
            self.outputs = [Col("name"), Col("setting"), Col("description")]
        else:
            self.outputs = [Col(name)]

    def on_DiscardStmt(self, node: ast.DiscardStmt) -> None:
        if node.target == DiscardMode.DISCARD_ALL:
            self.new_path = self.default_search_path
            self.acc.dangers.add("set_role")
            self.deallocates = "*"

    def on_DeallocateStmt(self, node: ast.DeallocateStmt) -> None:
        self.deallocates = "*" if node.isall or node.name is None else node.name

    # ------------------------------------------------------------------ table-level utility

    def on_TruncateStmt(self, node: ast.TruncateStmt) -> None:
        for rv in node.relations or ():
            self.relation(rv, Access.TRUNCATE)
        if node.behavior == DropBehavior.DROP_CASCADE:
            self.acc.dangers.add("truncate_cascade")

    def on_LockStmt(self, node: ast.LockStmt) -> None:
        for rv in node.relations or ():
            self.relation(rv, Access.READ)
            if node.mode != 1:  # AccessShareLock
                self.relation(rv, Access.UPDATE)

    def on_VacuumStmt(self, node: ast.VacuumStmt) -> None:
        if any(
            isinstance(o, ast.DefElem) and o.defname == "full" and _truthy(o.arg) for o in node.options or ()
        ):
            self.acc.dangers.add("vacuum_full")
        if not node.rels:
            self.acc.dangers.add("database_wide")
        for vr in node.rels or ():
            if isinstance(vr, ast.VacuumRelation) and vr.relation is not None:
                self.relation(vr.relation, Access.DDL, string_fields(vr.va_cols))

    def on_ClusterStmt(self, node: ast.ClusterStmt) -> None:
        if node.relation is None:
            self.acc.dangers.add("database_wide")
        else:
            self.relation(node.relation, Access.DDL)

    def on_ReindexStmt(self, node: ast.ReindexStmt) -> None:
        if node.relation is not None and node.kind in (
            ReindexObjectType.REINDEX_OBJECT_INDEX,
            ReindexObjectType.REINDEX_OBJECT_TABLE,
        ):
            self.relation(node.relation, Access.DDL)
        else:
            self.acc.dangers.add("database_wide")

    def on_RefreshMatViewStmt(self, node: ast.RefreshMatViewStmt) -> None:
        self.relation(node.relation, Access.DDL)

    # ------------------------------------------------------------------ DDL naming objects by parts

    def on_DropStmt(self, node: ast.DropStmt) -> None:
        for obj in node.objects or ():
            parts = string_fields(obj) if isinstance(obj, tuple) else ()
            if node.removeType in _RELATION_OBJECTS:
                self.named_relation(parts, Access.DDL)
            elif node.removeType in _ON_RELATION_OBJECTS:
                self.named_relation(parts[:-1], Access.DDL)
        self.generic(node)

    def on_CommentStmt(self, node: Any) -> None:
        obj = node.object
        parts = string_fields(obj) if isinstance(obj, tuple) else ()
        if node.objtype in _RELATION_OBJECTS:
            self.named_relation(parts, Access.DDL)
        elif node.objtype in _ON_RELATION_OBJECTS:
            self.named_relation(parts[:-1], Access.DDL)
        self.generic(node)

    on_SecLabelStmt = on_CommentStmt


def _setting_text(node: Any) -> str:
    if isinstance(node, ast.A_Const):
        val = node.val
        if isinstance(val, ast.String):
            return val.sval or ""
        if isinstance(val, ast.Integer):
            return str(val.ival)
        if isinstance(val, ast.Float):
            return str(val.fval)
    return str(node)


def _truthy(arg: Any) -> bool:
    """A boolean option's value: no argument means true, as in EXPLAIN ANALYZE."""
    if arg is None:
        return True
    if isinstance(arg, ast.String):
        return (arg.sval or "").lower() not in _FALSE_WORDS
    if isinstance(arg, ast.Integer):
        return arg.ival != 0
    if isinstance(arg, ast.Boolean):
        return bool(arg.boolval)
    return True
