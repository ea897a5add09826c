"""Row filters and column masks enforced by rewriting the statement itself, literals included.

Every read of a directed table, wherever it appears (FROM, JOIN, subqueries in any clause, CTE
bodies, INSERT ... SELECT, MERGE sources, CTAS, EXPLAIN, PREPARE, COPY t TO), is replaced by

    (SELECT c1, <mask(c2)> AS c2, ... FROM schema.t WHERE (<row filter>)) AS <alias or t>

so nothing outside the subquery can see unfiltered rows or unmasked values: ``WHERE true OR
1=1``, joins and set operations all operate on the subquery. Column names and order are kept, so
``*``, ``t.col`` and whole-row ``t`` still work; ``schema.t.col`` references are shortened to
``t.col`` because a subquery alias has no schema.

UPDATE / DELETE of a directed table AND the row filter into WHERE (grafted as an AST, so it
cannot change precedence), and replace references to the target's masked columns in WHERE, SET
expressions and RETURNING by the mask expression (a predicate on a masked column sees the masked
value, as it does for SELECT). A whole-row reference to such a target is refused.

Refused with ``RewriteError`` (the caller denies the statement):

- MERGE into a directed table, INSERT ... ON CONFLICT DO UPDATE on one (both update rows the
  filter does not govern);
- a directed table the catalog does not describe (its column list is needed);
- a row filter that is not exactly one expression.

Not handled here, by design: a directed table read through a view or inside a function body is
invisible to a rewrite; the policy layer must decide on the view or function itself. The output
relies on standard_conforming_strings (PostgreSQL's default since 9.1). All functions and
operators in mask expressions are pg_catalog-qualified so a search_path change cannot replace them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pglast import ast
from pglast.enums import BoolExprType, OnConflictAction, SetOperation
from pglast.parser import ParseError, parse_sql
from pglast.stream import RawStream

from sqlproxy.config.models import MaskKind
from sqlproxy.sql.analyzer import analyze_statement
from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import SqlSyntaxError, TableName
from sqlproxy.sql.walker import Accumulator, QueryWalker, fallback_schema

_N = TypeVar("_N", bound=ast.Node)

QUERY_NODES = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


class RewriteError(ValueError):
    """The statement cannot be rewritten safely; the caller must deny it."""


@dataclass(frozen=True, slots=True)
class RelationRewrite:
    row_filter: str | None = None
    masks: Mapping[str, MaskKind] = field(default_factory=dict)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def mask_sql(kind: MaskKind, column_sql: str, salt: str) -> str:
    """The SQL expression masking ``column_sql``; always text or NULL."""
    text = f"CAST({column_sql} AS pg_catalog.text)"
    if kind is MaskKind.NULL:
        return "CAST(NULL AS pg_catalog.text)"
    if kind is MaskKind.REDACT:
        return f"CASE WHEN {column_sql} IS NULL THEN NULL ELSE CAST('***' AS pg_catalog.text) END"
    if kind is MaskKind.HASH:
        return (
            f"CASE WHEN {column_sql} IS NULL THEN NULL ELSE pg_catalog.encode(pg_catalog.sha256("
            f"pg_catalog.convert_to(pg_catalog.concat({quote_literal(salt)}, {text}), 'UTF8')), 'hex') END"
        )
    if kind is MaskKind.PARTIAL:
        return (
            f"CASE WHEN {column_sql} IS NULL THEN NULL"
            f" WHEN pg_catalog.strpos({text}, '@') OPERATOR(pg_catalog.>) 0"
            f" THEN pg_catalog.concat(pg_catalog.\"left\"({text}, 1), '***@',"
            f" pg_catalog.split_part({text}, '@', -1))"
            f" ELSE pg_catalog.concat(pg_catalog.repeat('*', GREATEST("
            f'pg_catalog.length({text}) OPERATOR(pg_catalog.-) 4, 0)), pg_catalog."right"({text}, 4)) END'
        )
    raise RewriteError(f"unknown mask kind {kind!r}")


def parse_row_filter(text: str) -> Any:
    """Parse a row filter as exactly one boolean expression, or refuse it."""
    try:
        stmts = parse_sql(f"SELECT 1 WHERE {text}")
    except ParseError as e:
        raise RewriteError(f"row filter does not parse: {e}") from None
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
        raise RewriteError("row filter must be a single expression")
    stmt = stmts[0].stmt
    extra = [
        a
        for a in stmt
        if a not in ("targetList", "whereClause", "op", "all", "groupDistinct", "limitOption")
        and getattr(stmt, a) not in (None, (), False)
    ]
    if extra or stmt.whereClause is None or (stmt.op is not None and stmt.op != SetOperation.SETOP_NONE):
        raise RewriteError("row filter must be a single expression")
    return stmt.whereClause


def _parse_select(sql: str) -> Any:
    """The SelectStmt of SQL this module generated (so known to be one SELECT)."""
    return parse_sql(sql)[0].stmt


def _parse_expr(sql: str) -> Any:
    return _parse_select(f"SELECT {sql}").targetList[0].val


def rewrite(
    sql: str,
    directives: Mapping[TableName, RelationRewrite],
    catalog: Catalog,
    search_path: Sequence[str],
    mask_salt: str,
) -> str:
    """``sql`` with every read of a directed relation filtered and masked; unchanged if none is read."""
    try:
        raws = parse_sql(sql)
    except ParseError as e:
        index = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], int) else None
        raise SqlSyntaxError(str(e.args[0]), None if index is None else index + 1) from None
    filters = {t: parse_row_filter(d.row_filter) for t, d in directives.items() if d.row_filter is not None}
    path = tuple(search_path)
    changed = False
    for raw in raws:
        new_path = analyze_statement(0, raw.stmt, catalog, path).search_path
        rewriter = _Rewriter(directives, filters, catalog, path, mask_salt)
        raw.stmt = rewriter.visit(raw.stmt, frozenset())
        changed = changed or rewriter.changed
        if new_path is not None:
            path = new_path
    # Untouched text keeps its comments; otherwise every statement is deparsed, since splicing
    # original slices next to generated text could let a trailing `--` comment swallow the rest.
    return RawStream()(raws) if changed else sql


class _Rewriter:
    def __init__(
        self,
        directives: Mapping[TableName, RelationRewrite],
        filters: Mapping[TableName, Any],
        catalog: Catalog,
        search_path: tuple[str, ...],
        salt: str,
    ) -> None:
        self.directives = directives
        self.filters = filters
        self.catalog = catalog
        self.search_path = search_path
        self.salt = salt
        self.changed = False
        # (schema, table) of rewritten relations without an alias: schema.t.col must become t.col.
        self.dequalify: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ generic

    def visit(self, node: Any, ctes: frozenset[str]) -> Any:
        if isinstance(node, tuple):
            return tuple(self.visit(n, ctes) for n in node)
        if not isinstance(node, ast.Node):
            return node
        if isinstance(node, ast.SelectStmt):
            return self.select(node, ctes)
        if isinstance(node, (ast.UpdateStmt, ast.DeleteStmt)):
            return self.update_or_delete(node, ctes)
        if isinstance(node, ast.InsertStmt):
            return self.insert(node, ctes)
        if isinstance(node, ast.MergeStmt):
            return self.merge(node, ctes)
        if isinstance(node, ast.CopyStmt):
            return self.copy_stmt(node, ctes)
        if isinstance(node, ast.ColumnRef):
            return self.column_ref(node)
        return self.children(node, ctes)

    def children(self, node: _N, ctes: frozenset[str], skip: frozenset[str] = frozenset()) -> _N:
        for attr in node:
            if attr not in skip and attr != "location":
                value = getattr(node, attr)
                new = self.visit(value, ctes)
                if new is not value:
                    setattr(node, attr, new)
        return node

    def column_ref(self, node: ast.ColumnRef) -> ast.ColumnRef:
        fields = node.fields or ()
        names = [f.sval if isinstance(f, ast.String) else None for f in fields]
        for start in (0, 1):
            if len(fields) >= start + 3 and (names[start], names[start + 1]) in self.dequalify:
                node.fields = tuple(fields[start + 1 :])
                self.changed = True
                break
        return node

    def with_clause(self, wc: ast.WithClause | None, ctes: frozenset[str]) -> frozenset[str]:
        if wc is None:
            return ctes
        names = [c.ctename for c in wc.ctes or ()]
        seen: set[str] = set()
        for cte in wc.ctes or ():
            # A non-recursive CTE sees only the CTEs before it: `WITH t AS (SELECT * FROM t)`
            # reads the real table t.
            visible = ctes | (frozenset(names) if wc.recursive else frozenset(seen))
            cte.ctequery = self.visit(cte.ctequery, visible)
            seen.add(cte.ctename)
        return ctes | frozenset(names)

    # ------------------------------------------------------------------ queries

    def select(self, node: ast.SelectStmt, ctes: frozenset[str]) -> ast.SelectStmt:
        ctes = self.with_clause(node.withClause, ctes)
        if node.fromClause:
            node.fromClause = tuple(self.from_item(item, ctes) for item in node.fromClause)
        return self.children(node, ctes, skip=frozenset({"withClause", "fromClause"}))

    def from_item(self, node: Any, ctes: frozenset[str]) -> Any:
        if isinstance(node, ast.RangeVar):
            return self.range_var(node, ctes, None)
        if isinstance(node, ast.RangeTableSample) and isinstance(node.relation, ast.RangeVar):
            replaced = self.range_var(node.relation, ctes, node)
            if isinstance(replaced, ast.RangeSubselect):
                return replaced
            node.args = self.visit(node.args, ctes)
            node.repeatable = self.visit(node.repeatable, ctes)
            return node
        if isinstance(node, ast.JoinExpr):
            node.larg = self.from_item(node.larg, ctes)
            node.rarg = self.from_item(node.rarg, ctes)
            node.quals = self.visit(node.quals, ctes)
            return node
        return self.visit(node, ctes)

    def directed(self, rv: ast.RangeVar | None, ctes: frozenset[str]) -> TableName | None:
        if rv is None:
            return None
        relname = rv.relname or ""
        if not rv.schemaname and relname in ctes:
            return None
        if rv.schemaname:
            tn = TableName(rv.schemaname, relname)
        else:
            found = self.catalog.resolve(relname, self.search_path)
            # A relation missing from the snapshot is read as the analyser reads it, so a directed
            # table created after the snapshot is refused rather than left unfiltered.
            tn = found if found is not None else TableName(fallback_schema(self.search_path), relname)
        return tn if tn in self.directives else None

    def range_var(self, rv: ast.RangeVar, ctes: frozenset[str], sample: ast.RangeTableSample | None) -> Any:
        directed = self.directed(rv, ctes)
        if directed is None:
            view = self.directed_view(rv, ctes)
            if view is None:
                return sample if sample is not None else rv
            if sample is not None:
                raise RewriteError(f"TABLESAMPLE on view {view} over filtered or masked tables")
            tn, sub = view, self.inlined_view(view)
        else:
            tn, sub = directed, self.filtered_select(directed, rv.inh, sample)
        if rv.alias is None:
            self.dequalify.add((tn.schema, tn.name))
            if rv.schemaname:
                self.dequalify.add((rv.schemaname, rv.relname or ""))
        alias = rv.alias if rv.alias is not None else ast.Alias(aliasname=rv.relname)
        self.changed = True
        return ast.RangeSubselect(lateral=False, subquery=sub, alias=alias)

    def directed_view(self, rv: ast.RangeVar, ctes: frozenset[str]) -> TableName | None:
        """A view whose definition reads a directed relation: it must be inlined so the filter and
        masks apply inside it."""
        relname = rv.relname or ""
        if not rv.schemaname and relname in ctes:
            return None
        if rv.schemaname:
            tn: TableName | None = TableName(rv.schemaname, relname)
        else:
            tn = self.catalog.resolve(relname, self.search_path)
        if tn is None:
            return None
        kind = self.catalog.kind(tn)
        if kind not in ("view", "matview"):
            return None
        # Make sure the view's base reads are known (the analyser memoizes them on the catalog).
        QueryWalker(self.catalog, self.search_path, Accumulator()).view_lineage(tn)
        reads = self.catalog._view_memo.get(("reads", tn), ())
        if not any(r.table in self.directives for r in reads):
            return None
        if kind == "matview":
            # A materialized view holds its own copy of the data: there is no definition to
            # filter at read time, so refuse rather than return unmasked rows.
            raise RewriteError(f"materialized view {tn} holds rows of a filtered or masked table")
        return tn

    def inlined_view(self, tn: TableName) -> Any:
        rel = self.catalog.lookup(tn.schema, tn.name)
        if rel is None or not rel.definition:
            raise RewriteError(f"no definition for view {tn}")
        try:
            stmts = parse_sql(rel.definition)
        except ParseError as e:
            raise RewriteError(f"cannot parse the definition of view {tn}: {e}") from None
        if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
            raise RewriteError(f"unexpected definition for view {tn}")
        # View definitions from pg_get_viewdef are written for the default search path.
        inner = _Rewriter(self.directives, self.filters, self.catalog, ("public",), self.salt)
        body = inner.visit(stmts[0].stmt, frozenset())
        return body

    def filtered_select(self, tn: TableName, inh: bool | None, sample: ast.RangeTableSample | None) -> Any:
        columns = self.catalog.columns(tn)
        if not columns:
            raise RewriteError(f"no column list for {tn}: cannot apply its row filter or masks")
        masks = self.directives[tn].masks
        items = [
            f"{mask_sql(masks[c], quote_ident(c), self.salt)} AS {quote_ident(c)}"
            if c in masks
            else quote_ident(c)
            for c in columns
        ]
        stmt = _parse_select(
            f"SELECT {', '.join(items)} FROM {quote_ident(tn.schema)}.{quote_ident(tn.name)}"
        )
        inner = stmt.fromClause[0]
        inner.inh = inh
        if sample is not None:
            sample.relation = inner
            stmt.fromClause = (sample,)
        if tn in self.filters:
            stmt.whereClause = copy.deepcopy(self.filters[tn])
        return stmt

    # ------------------------------------------------------------------ writes

    def insert(self, node: ast.InsertStmt, ctes: frozenset[str]) -> ast.InsertStmt:
        ctes = self.with_clause(node.withClause, ctes)
        node.selectStmt = self.visit(node.selectStmt, ctes)
        tn = self.directed(node.relation, frozenset())
        if tn is not None:
            occ = node.onConflictClause
            if occ is not None and occ.action == OnConflictAction.ONCONFLICT_UPDATE:
                raise RewriteError(f"INSERT ... ON CONFLICT DO UPDATE on {tn} cannot honour its row filter")
            node.returningClause = self.mask_target_refs(
                node.returningClause, node.relation, tn, returning=True
            )
        node.onConflictClause = self.visit(node.onConflictClause, ctes)
        node.returningClause = self.visit(node.returningClause, ctes)
        return node

    def merge(self, node: ast.MergeStmt, ctes: frozenset[str]) -> ast.MergeStmt:
        ctes = self.with_clause(node.withClause, ctes)
        tn = self.directed(node.relation, frozenset())
        if tn is not None:
            raise RewriteError(f"MERGE into {tn} cannot be rewritten under its row filter or masks")
        node.sourceRelation = self.from_item(node.sourceRelation, ctes)
        return self.children(node, ctes, skip=frozenset({"withClause", "relation", "sourceRelation"}))

    def update_or_delete(self, node: Any, ctes: frozenset[str]) -> Any:
        ctes = self.with_clause(node.withClause, ctes)
        extra = "fromClause" if isinstance(node, ast.UpdateStmt) else "usingClause"
        if getattr(node, extra):
            setattr(node, extra, tuple(self.from_item(i, ctes) for i in getattr(node, extra)))
        tn = self.directed(node.relation, frozenset())
        if tn is not None:
            rv = node.relation
            if isinstance(node, ast.UpdateStmt):
                for rt in node.targetList or ():
                    rt.val = self.mask_target_refs(rt.val, rv, tn)
            node.whereClause = self.mask_target_refs(node.whereClause, rv, tn)
            node.returningClause = self.mask_target_refs(
                node.returningClause, rv, tn, returning=True, others=bool(getattr(node, extra))
            )
            if tn in self.filters:
                predicate = _qualify(copy.deepcopy(self.filters[tn]), _refname(rv))
                node.whereClause = (
                    predicate
                    if node.whereClause is None
                    else ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(predicate, node.whereClause))
                )
                self.changed = True
        return self.children(node, ctes, skip=frozenset({"withClause", "relation", extra}))

    def mask_target_refs(
        self, node: Any, rv: ast.RangeVar | None, tn: TableName, returning: bool = False, others: bool = False
    ) -> Any:
        masks = self.directives[tn].masks
        if node is None or not masks:
            return node
        if rv is None:
            return node
        refname = _refname(rv)
        columns = self.catalog.columns(tn) or ()
        qualifiers = {refname} | ({"old", "new"} if returning else set())
        if rv.alias is None:
            qualifiers.add(f"{tn.schema}.{tn.name}")
        refs = _MaskRefs(self, masks, columns, refname, qualifiers, tn)
        if returning and isinstance(node, ast.ReturningClause):
            return refs.returning(node, others)
        return refs.visit(node)

    def copy_stmt(self, node: ast.CopyStmt, ctes: frozenset[str]) -> ast.CopyStmt:
        if node.relation is not None and not node.is_from and self.directed(node.relation, ctes) is not None:
            cols = node.attlist or ()
            targets = (
                tuple(ast.ResTarget(val=ast.ColumnRef(fields=(c,))) for c in cols)
                if cols
                else (ast.ResTarget(val=ast.ColumnRef(fields=(ast.A_Star(),))),)
            )
            query = ast.SelectStmt(targetList=targets, fromClause=(node.relation,))
            node.query = self.select(query, ctes)
            node.relation = None
            node.attlist = None
            self.changed = True
            return node
        node.query = self.visit(node.query, ctes)
        return node


class _MaskRefs:
    """Replaces references to a write target's masked columns by their mask expressions."""

    def __init__(
        self,
        owner: _Rewriter,
        masks: Mapping[str, MaskKind],
        columns: Sequence[str],
        refname: str,
        qualifiers: set[str],
        tn: TableName,
    ) -> None:
        self.owner = owner
        self.masks = masks
        self.columns = columns
        self.refname = refname
        self.qualifiers = qualifiers
        self.tn = tn

    def masked(self, column: str | None, qualifier: str) -> Any:
        assert column is not None
        ref = f"{quote_ident(qualifier)}.{quote_ident(column)}"
        self.owner.changed = True
        return _parse_expr(mask_sql(self.masks[column], ref, self.owner.salt))

    def classify(self, ref: ast.ColumnRef) -> tuple[str | None, str | None]:
        """(qualifier, column) when ``ref`` names the target; column is "*" for a star.

        Raises on a whole-row reference, which would carry the unmasked values.
        """
        fields = ref.fields or ()
        parts = [f.sval if isinstance(f, ast.String) else "*" for f in fields]
        if len(parts) == 1:
            if parts[0] == "*":
                return None, "*"
            if parts[0] in self.columns:
                return self.refname, parts[0]
            if parts[0] == self.refname:
                raise RewriteError(f"whole-row reference to masked {self.tn} cannot be rewritten")
            return None, None
        qualifier = ".".join(p or "" for p in parts[:-1])
        if qualifier not in self.qualifiers:
            return None, None
        return (parts[-2] if qualifier in ("old", "new") else self.refname), parts[-1]

    def visit(self, node: Any) -> Any:
        if isinstance(node, tuple):
            return tuple(self.visit(n) for n in node)
        if isinstance(node, ast.ColumnRef):
            qualifier, column = self.classify(node)
            if qualifier is not None and column in self.masks:
                return self.masked(column, qualifier)
            return node
        if isinstance(node, ast.Node):
            for attr in node:
                if attr != "location":
                    value = getattr(node, attr)
                    new = self.visit(value)
                    if new is not value:
                        setattr(node, attr, new)
        return node

    def returning(self, clause: ast.ReturningClause, other_relations: bool) -> ast.ReturningClause:
        items: list[Any] = []
        for item in clause.exprs or ():
            ref = item.val if isinstance(item, ast.ResTarget) else None
            if not isinstance(ref, ast.ColumnRef):
                items.append(self.visit(item))
                continue
            qualifier, column = self.classify(ref)
            if column == "*":
                if qualifier is None and other_relations:
                    raise RewriteError(f"RETURNING * with other relations beside masked {self.tn}")
                # Expand * so masked columns can be replaced one by one, keeping names and order.
                q = qualifier or self.refname
                self.owner.changed = True
                items.extend(
                    ast.ResTarget(name=c, val=self.masked(c, q))
                    if c in self.masks
                    else ast.ResTarget(val=ast.ColumnRef(fields=(ast.String(sval=q), ast.String(sval=c))))
                    for c in self.columns
                )
            elif qualifier is not None and column in self.masks:
                items.append(ast.ResTarget(name=item.name or column, val=self.masked(column, qualifier)))
            else:
                items.append(item)
        clause.exprs = tuple(items)
        return clause


def _refname(rv: ast.RangeVar) -> str:
    if rv.alias is not None and rv.alias.aliasname:
        return rv.alias.aliasname
    return rv.relname or ""


def _qualify(predicate: Any, refname: str) -> Any:
    """Qualify the filter's bare column names with the target, outside its own subqueries."""
    if isinstance(predicate, tuple):
        return tuple(_qualify(p, refname) for p in predicate)
    if isinstance(predicate, ast.ColumnRef):
        fields = predicate.fields or ()
        if len(fields) == 1 and isinstance(fields[0], ast.String):
            predicate.fields = (ast.String(sval=refname), fields[0])
        return predicate
    if isinstance(predicate, ast.SubLink):
        predicate.testexpr = _qualify(predicate.testexpr, refname)
        return predicate
    if isinstance(predicate, ast.Node):
        for attr in predicate:
            if attr != "location":
                value = getattr(predicate, attr)
                new = _qualify(value, refname)
                if new is not value:
                    setattr(predicate, attr, new)
    return predicate
