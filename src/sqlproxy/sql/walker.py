"""Relation, column and lineage analysis of queries and DML, following PostgreSQL's name rules.

``QueryWalker`` records into an ``Accumulator`` every (relation, access, columns) a query uses and
returns the query's output columns with their lineage. Expressions are walked generically, node
field by node field, so that a subquery or function call hidden in any clause is found even in
node types this module does not name. Wherever PostgreSQL's choice cannot be known from the
catalog snapshot (unknown relations, ambiguous names), the walker records every candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pglast import ast
from pglast.enums import CmdType, LockClauseStrength, OnConflictAction, SetOperation, SubLinkType
from pglast.parser import ParseError, parse_sql

from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.kinds import CATALOG_SECRETS, SERVER_FILE_FUNCTIONS
from sqlproxy.sql.model import Access, ColumnSource, RelationAccess, TableName
from sqlproxy.sql.naming import figure_colname, string_fields
from sqlproxy.sql.scope import Col, CteDef, Entry, Scope

MAX_VIEW_DEPTH = 32
VIEW_KINDS = frozenset({"view", "matview"})
QUERY_NODES = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


# SET of these is an identity change (``set_role``) or a search_path change: never a plain SET.
_GUARDED_SETTINGS = frozenset({"role", "session_authorization", "search_path"})


def plain_setting(arg: Any) -> str | None:
    """The setting a set_config call names, when its first argument is a string literal (cast
    to text or not) naming one that a plain SET may change; otherwise None."""
    if isinstance(arg, ast.TypeCast):
        arg = arg.arg
    if not isinstance(arg, ast.A_Const) or not isinstance(arg.val, ast.String):
        return None
    name = (arg.val.sval or "").lower()
    if not name or name in _GUARDED_SETTINGS or name.startswith("sqlproxy."):
        return None
    return name


@dataclass
class Accumulator:
    """What one statement uses, merged over all its parts."""

    accesses: dict[tuple[TableName, Access], set[str]] = field(default_factory=dict)
    unknown: set[TableName] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    dangers: set[str] = field(default_factory=set)
    # Settings changed by set_config('name', ...) calls that amount to a plain SET (see
    # ``QueryWalker.function``), and whether any part of the analysis was read off a literal.
    settings: set[str] = field(default_factory=set)
    literal_bound: bool = False

    def access(
        self,
        table: TableName,
        access: Access,
        columns: Iterable[str] = (),
        known: bool = True,
        *,
        through_view: bool = False,
    ) -> None:
        cols = self.accesses.setdefault((table, access), set())
        cols.update(columns)
        if not known:
            self.unknown.add(table)
        # Secrets count where the statement names them: a view's base columns are those of its
        # whole definition (pg_roles reads pg_authid, but not rolpassword to show it).
        if table.schema == "pg_catalog" and access is Access.READ and not through_view:
            secret = CATALOG_SECRETS.get(table.name)
            if secret is not None and not secret.isdisjoint(cols):
                self.dangers.add("catalog_secrets")

    def read(self, table: TableName, column: str) -> None:
        self.access(table, Access.READ, (column,))

    def tables_with(self, access: Access) -> list[TableName]:
        return [t for (t, a) in self.accesses if a is access]

    def relations(self) -> tuple[RelationAccess, ...]:
        return tuple(
            RelationAccess(t, a, frozenset(cols), t not in self.unknown)
            for (t, a), cols in sorted(
                self.accesses.items(), key=lambda kv: (kv[0][0], list(Access).index(kv[0][1]))
            )
        )


@dataclass(frozen=True, slots=True)
class Lineage:
    sources: frozenset[ColumnSource] = frozenset()
    # Set when the expression is exactly one column reference.
    col: Col | None = None

    def __or__(self, other: Lineage) -> Lineage:
        return Lineage(self.sources | other.sources)


NO_LINEAGE = Lineage()


def combine(cols: Sequence[Col], name: str) -> Col:
    """One column standing for several (set-operation branches, USING merges, ambiguity)."""
    sources = frozenset().union(*(c.sources for c in cols)) if cols else frozenset()
    direct = bool(cols) and all(c.direct for c in cols) and len(sources) == 1
    reads = tuple(r for c in cols for r in c.reads)
    return Col(name, sources, direct, reads)


class QueryWalker:
    def __init__(
        self,
        catalog: Catalog,
        search_path: Sequence[str],
        acc: Accumulator,
        views_in_progress: frozenset[TableName] = frozenset(),
    ) -> None:
        self.catalog = catalog
        self.search_path = tuple(search_path)
        self.acc = acc
        self.views_in_progress = views_in_progress

    # ------------------------------------------------------------------ relations

    def resolve(self, rv: ast.RangeVar | None) -> tuple[TableName, bool]:
        """The relation a RangeVar names, and whether the catalog knows it."""
        if rv is None:
            raise ValueError("statement without its relation")
        relname = rv.relname or ""
        if rv.schemaname:
            tn = TableName(rv.schemaname, relname)
            return tn, self.catalog.lookup(tn.schema, tn.name) is not None
        found = self.catalog.resolve(relname, self.search_path)
        if found is not None:
            return found, True
        return TableName(self.default_schema(), relname), False

    def default_schema(self) -> str:
        return fallback_schema(self.search_path)

    def relation_cols(self, tn: TableName) -> list[Col] | None:
        rel = self.catalog.relations.get(tn)
        if rel is None:
            return None
        if rel.kind in VIEW_KINDS:
            lineage = self.view_lineage(tn)
            # Reading a view reads its base relations: their policies, masks and row filters
            # apply through the view (a view must not be a way around them). Over-reports the
            # columns of the view's definition, never under-reports.
            for base in self.catalog._view_memo.get(("reads", tn), ()):
                self.acc.access(base.table, base.access, base.columns, known=base.known, through_view=True)
            return [
                Col(name, sources, direct, ((tn, name),))
                for name, (sources, direct) in zip(rel.column_names, lineage, strict=True)
            ]
        return [Col(c, frozenset({ColumnSource(tn, c)}), True, ((tn, c),)) for c in rel.column_names]

    def view_lineage(self, tn: TableName) -> list[tuple[frozenset[ColumnSource], bool]]:
        rel = self.catalog.relations[tn]
        own = [(frozenset({ColumnSource(tn, c)}), True) for c in rel.column_names]
        memo = self.catalog._view_memo
        if tn in memo:
            return list(memo[tn])
        if tn in self.views_in_progress or len(self.views_in_progress) >= MAX_VIEW_DEPTH:
            # A cycle cannot exist in PostgreSQL; if the snapshot has one, stop at the view itself.
            return own
        result = own
        reads: tuple[RelationAccess, ...] = ()
        if rel.definition:
            try:
                stmts = parse_sql(rel.definition)
            except ParseError:
                stmts = ()
            if len(stmts) == 1 and isinstance(stmts[0].stmt, ast.SelectStmt):
                # The view's own reads belong to its owner, not to the statement: keep them apart.
                inner = QueryWalker(self.catalog, ("public",), Accumulator(), self.views_in_progress | {tn})
                outs = inner.query(stmts[0].stmt, None)
                result = [
                    (outs[i].sources, outs[i].direct) if i < len(outs) else own[i]
                    for i in range(len(rel.columns))
                ]
                reads = inner.acc.relations()
        memo[tn] = tuple(result)
        memo[("reads", tn)] = reads
        return result

    # ------------------------------------------------------------------ queries

    def query(self, node: Any, parent: Scope | None) -> list[Col]:
        """Analyse any row-producing node; returns its output columns."""
        if isinstance(node, ast.SelectStmt):
            return self.select(node, parent)
        if isinstance(node, ast.InsertStmt):
            return self.insert(node, parent)
        if isinstance(node, ast.UpdateStmt):
            return self.update(node, parent)
        if isinstance(node, ast.DeleteStmt):
            return self.delete(node, parent)
        if isinstance(node, ast.MergeStmt):
            return self.merge(node, parent)
        self.expr(node, parent or Scope())
        return []

    def with_clause(self, wc: ast.WithClause | None, scope: Scope) -> None:
        if wc is None:
            return
        for cte in wc.ctes or ():
            name = cte.ctename
            aliases = string_fields(cte.aliascolnames)
            body = cte.ctequery
            if (
                wc.recursive
                and isinstance(body, ast.SelectStmt)
                and body.op != SetOperation.SETOP_NONE
                and body.larg is not None
            ):
                cols = _rename(self.select(body.larg, scope), aliases)
                scope.ctes[name] = CteDef(name, cols)
                # Iterate so lineage flowing through the recursive term reaches a fixed point.
                for _ in range(8):
                    new = _rename(self.select(body, scope), aliases)
                    merged = [combine([a, b], a.name) for a, b in zip(cols, new, strict=False)]
                    if [c.sources for c in merged] == [c.sources for c in cols]:
                        break
                    cols = merged
                    scope.ctes[name] = CteDef(name, cols)
                scope.ctes[name] = CteDef(name, [c.renamed(c.name) for c in cols])
            else:
                cols = _rename(self.query(body, scope), aliases)
                scope.ctes[name] = CteDef(name, cols)

    def select(self, stmt: ast.SelectStmt, parent: Scope | None) -> list[Col]:
        scope = Scope(parent)
        self.with_clause(stmt.withClause, scope)
        if stmt.op is not None and stmt.op != SetOperation.SETOP_NONE:
            left = self.select(stmt.larg, scope) if stmt.larg is not None else []
            right = self.select(stmt.rarg, scope) if stmt.rarg is not None else []
            outputs = [combine([a, b], a.name) for a, b in zip(left, right, strict=False)]
            outputs = [Col(c.name, c.sources, c.direct) for c in outputs]
            scope.outputs = outputs
            self.clauses(stmt, scope)
            return outputs
        if stmt.valuesLists:
            return self.values(stmt.valuesLists, scope)
        for item in stmt.fromClause or ():
            result = self.from_item(item, scope)
            scope.star.extend(result.star)
            scope.merged.update(result.merged)
        outputs = self.projection(stmt.targetList or (), scope)
        scope.outputs = outputs
        self.expr(stmt.whereClause, scope)
        self.expr(stmt.havingClause, scope)
        self.expr(stmt.groupClause, scope)
        self.expr(stmt.windowClause, scope)
        self.expr(stmt.distinctClause, scope)
        self.clauses(stmt, scope)
        if stmt.lockingClause:
            self.locking(stmt.lockingClause)
        return outputs

    def clauses(self, stmt: ast.SelectStmt, scope: Scope) -> None:
        self.expr(stmt.sortClause, scope)
        self.expr(stmt.limitCount, scope)
        self.expr(stmt.limitOffset, scope)

    def locking(self, clauses: Sequence[Any]) -> None:
        # FOR UPDATE / SHARE locks rows and needs UPDATE privilege as well as SELECT.
        for lc in clauses:
            if not isinstance(lc, ast.LockingClause) or lc.strength == LockClauseStrength.LCS_NONE:
                continue
            named = [self.resolve(rv) for rv in lc.lockedRels or () if isinstance(rv, ast.RangeVar)]
            targets = named or [(t, t not in self.acc.unknown) for t in self.acc.tables_with(Access.READ)]
            for tn, known in targets:
                self.acc.access(tn, Access.UPDATE, known=known)

    def values(self, rows: Sequence[Any], scope: Scope) -> list[Col]:
        per_pos: dict[int, frozenset[ColumnSource]] = {}
        for row in rows:
            for i, item in enumerate(row):
                per_pos[i] = per_pos.get(i, frozenset()) | self.expr(item, scope).sources
        return [Col(f"column{i + 1}", per_pos[i]) for i in sorted(per_pos)]

    def projection(self, targets: Sequence[Any], scope: Scope) -> list[Col]:
        outputs: list[Col] = []
        for rt in targets:
            val = rt.val if isinstance(rt, ast.ResTarget) else rt
            if isinstance(val, ast.ColumnRef) and val.fields and isinstance(val.fields[-1], ast.A_Star):
                outputs.extend(Col(c.name, c.sources, c.direct) for c in self.column_ref(val.fields, scope))
                continue
            lin = self.expr(val, scope)
            name = rt.name if isinstance(rt, ast.ResTarget) and rt.name else figure_colname(val)
            if lin.col is not None:
                outputs.append(Col(name, lin.col.sources, lin.col.direct))
            else:
                outputs.append(Col(name, lin.sources))
        return outputs

    # ------------------------------------------------------------------ FROM

    @dataclass
    class FromResult:
        star: list[Col]
        merged: dict[str, Col] = field(default_factory=dict)

    def from_item(self, node: Any, scope: Scope) -> QueryWalker.FromResult:
        if isinstance(node, ast.RangeVar):
            entry = self.range_var(node, scope)
            scope.entries.append(entry)
            return self.FromResult(list(entry.cols))
        if isinstance(node, ast.RangeSubselect):
            cols = self.query(node.subquery, scope)
            cols = [Col(c.name, c.sources, c.direct) for c in cols]
            return self.add_entry(scope, node.alias, cols, None)
        if isinstance(node, ast.RangeFunction):
            return self.range_function(node, scope)
        if isinstance(node, ast.JoinExpr):
            return self.join(node, scope)
        if isinstance(node, ast.RangeTableSample):
            result = self.from_item(node.relation, scope)
            self.expr(node.args, scope)
            self.expr(node.repeatable, scope)
            return result
        if isinstance(node, ast.RangeTableFunc):
            self.expr(node.docexpr, scope)
            self.expr(node.rowexpr, scope)
            self.expr(node.namespaces, scope)
            lin = self.expr(node.columns, scope)
            cols = [
                Col(c.colname or "", lin.sources)
                for c in node.columns or ()
                if isinstance(c, ast.RangeTableFuncCol)
            ]
            return self.add_entry(scope, node.alias, cols, "xmltable")
        if isinstance(node, ast.JsonTable):
            lin = self.expr(node.context_item, scope) | self.expr(node.passing, scope)
            cols = [Col(n, lin.sources) for n in _json_table_columns(node.columns)]
            return self.add_entry(scope, node.alias, cols, "json_table")
        # An unknown FROM item: read whatever it holds, and say the statement was not understood.
        self.acc.dangers.add("unanalyzed")
        self.expr(node, scope)
        entry = Entry(None, [], complete=False)
        scope.entries.append(entry)
        return self.FromResult([])

    def add_entry(
        self,
        scope: Scope,
        alias: ast.Alias | None,
        cols: list[Col],
        default: str | None,
        complete: bool = True,
    ) -> QueryWalker.FromResult:
        refname = alias.aliasname if alias is not None else default
        cols = _rename(cols, string_fields(alias.colnames) if alias is not None else ())
        scope.entries.append(Entry(refname, cols, complete=complete))
        return self.FromResult(list(cols))

    def range_var(self, rv: ast.RangeVar, scope: Scope) -> Entry:
        alias = rv.alias
        refname = alias.aliasname if alias is not None else rv.relname
        aliases = string_fields(alias.colnames) if alias is not None else ()
        if not rv.schemaname:
            cte = scope.find_cte(rv.relname or "")
            if cte is not None and cte.cols is not None:
                return Entry(refname, _rename([Col(c.name, c.sources, c.direct) for c in cte.cols], aliases))
        tn, known = self.resolve(rv)
        self.acc.access(tn, Access.READ, known=known)
        cols = self.relation_cols(tn)
        if cols is None:
            return Entry(refname, [], table=tn, complete=False, unknown_read=tn)
        return Entry(refname, _rename(cols, aliases), table=tn)

    def range_function(self, node: ast.RangeFunction, scope: Scope) -> QueryWalker.FromResult:
        cols: list[Col] = []
        complete = True
        default: str | None = None
        for item in node.functions or ():
            func, coldefs = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
            lin = self.expr(func, scope)
            fname = figure_colname(func)
            default = default or fname
            defs = coldefs or (node.coldeflist if len(node.functions or ()) == 1 else None)
            if defs:
                cols.extend(Col(d.colname or "", lin.sources) for d in defs if isinstance(d, ast.ColumnDef))
            else:
                # A scalar function gives one column; a record-returning one gives columns the
                # catalog snapshot does not describe.
                cols.append(Col(fname, lin.sources))
                complete = False
        if node.ordinality:
            cols.append(Col("ordinality"))
        if node.alias is not None and node.alias.colnames:
            complete = True
        elif node.alias is not None and len(cols) == 1 and not node.coldeflist:
            cols = [cols[0].renamed(node.alias.aliasname or cols[0].name)]
        return self.add_entry(scope, node.alias, cols, default, complete)

    def join(self, node: ast.JoinExpr, scope: Scope) -> QueryWalker.FromResult:
        first = len(scope.entries)
        left = self.from_item(node.larg, scope)
        right = self.from_item(node.rarg, scope)
        using = list(string_fields(node.usingClause))
        if node.isNatural:
            right_names = {c.name for c in right.star}
            using = [c.name for c in left.star if c.name in right_names]
        merged: dict[str, Col] = {}
        for name in using:
            sides = [c for c in left.star if c.name == name][:1] + [c for c in right.star if c.name == name][
                :1
            ]
            merged[name] = combine(sides, name) if sides else Col(name)
            for c in sides:
                for tn, col in c.reads:
                    self.acc.read(tn, col)
            if not sides:
                self.unknown_column(name, scope.entries[first:])
        star = list(merged.values())
        star += [c for c in left.star if c.name not in merged]
        star += [c for c in right.star if c.name not in merged]
        scope.merged.update(merged)
        self.expr(node.quals, scope)
        if node.join_using_alias is not None:
            scope.entries.append(
                Entry(node.join_using_alias.aliasname, list(merged.values()), unqualified=False)
            )
        if node.alias is not None:
            # An aliased join hides the names inside it.
            inner = scope.entries[first:]
            del scope.entries[first:]
            cols = _rename(star, string_fields(node.alias.colnames))
            complete = all(e.complete for e in inner)
            scope.entries.append(Entry(node.alias.aliasname, cols, complete=complete))
            for e in inner:
                if not e.complete:
                    scope.entries.append(
                        Entry(None, [], complete=False, unknown_read=e.unknown_read, unqualified=False)
                    )
            return self.FromResult(cols)
        return self.FromResult(star, merged)

    # ------------------------------------------------------------------ columns

    def unknown_column(self, name: str, entries: Iterable[Entry]) -> None:
        for e in entries:
            if not e.complete and e.unknown_read is not None:
                self.acc.read(e.unknown_read, name)

    def record(self, cols: Iterable[Col]) -> list[Col]:
        out = list(cols)
        for c in out:
            for tn, col in c.reads:
                self.acc.read(tn, col)
        return out

    def column_ref(self, fields: Sequence[Any], scope: Scope) -> list[Col]:
        names = [f.sval if isinstance(f, ast.String) else None for f in fields]
        star = isinstance(fields[-1], ast.A_Star)
        if len(fields) == 1:
            if star:
                return self.record(scope.star)
            return self.unqualified(names[0] or "", scope)
        # Try the longest relation prefix first, as PostgreSQL does for a.b.c.
        for rel_len in range(min(len(fields) - 1, 3), 0, -1):
            rel_parts = names[:rel_len]
            if any(p is None for p in rel_parts):
                continue
            entry = self.find_entry([p for p in rel_parts if p is not None], scope)
            if entry is None:
                continue
            rest = fields[rel_len:]
            if isinstance(rest[0], ast.A_Star):
                if not entry.complete and entry.unknown_read is not None:
                    self.acc.access(entry.unknown_read, Access.READ, ("*",), known=False)
                return self.record(entry.cols)
            col_name = names[rel_len] or ""
            matches = [c for c in entry.cols if c.name == col_name]
            if matches:
                # Further fields are composite field selections: same lineage, not direct.
                cols = self.record(matches[:1])
                return cols if len(rest) == 1 else [Col(col_name, cols[0].sources)]
            if not entry.complete:
                if entry.unknown_read is not None:
                    self.acc.read(entry.unknown_read, col_name)
                return [Col(col_name)]
            return []
        # No relation of that name: a composite column with field selection, (col).field.
        head = self.unqualified(names[0] or "", scope)
        return [Col(names[-1] or "?column?", frozenset().union(*(c.sources for c in head)))] if head else []

    def find_entry(self, parts: Sequence[str], scope: Scope) -> Entry | None:
        for level in scope.levels():
            for entry in reversed(level.entries):
                if len(parts) == 1 and entry.refname == parts[0]:
                    return entry
                if (
                    len(parts) >= 2
                    and entry.table == TableName(parts[-2], parts[-1])
                    and entry.refname == parts[-1]
                ):
                    return entry
        return None

    def unqualified(self, name: str, scope: Scope) -> list[Col]:
        found: list[Col] = []
        for level in scope.levels():
            if name in level.merged:
                return self.record([level.merged[name]]) + found
            matches = [c for e in level.entries if e.unqualified for c in e.cols if c.name == name]
            if matches:
                cols = self.record(matches)
                return [cols[0] if len(cols) == 1 and not found else combine(cols + found, name)]
            incomplete = [e for e in level.entries if not e.complete]
            if incomplete:
                # The column may belong to a relation the catalog does not describe, or to an
                # outer level: record both readings.
                self.unknown_column(name, incomplete)
                found.append(Col(name))
            rows = [e for e in level.entries if e.refname == name]
            if rows:
                # A whole-row reference reads every column of the entry.
                whole = self.record(rows[-1].cols)
                if not rows[-1].complete and rows[-1].unknown_read is not None:
                    self.acc.access(rows[-1].unknown_read, Access.READ, ("*",), known=False)
                return [combine(whole + found, name)] if whole else [Col(name)]
            if level.outputs is not None and level is scope:
                outs = [c for c in level.outputs if c.name == name]
                if outs:
                    return outs[:1]
        return [combine(found, name)] if found else []

    # ------------------------------------------------------------------ expressions

    def expr(self, node: Any, scope: Scope) -> Lineage:
        if node is None or isinstance(node, (str, int, float, bool)):
            return NO_LINEAGE
        if isinstance(node, tuple | list):
            out = NO_LINEAGE
            for item in node:
                out = out | self.expr(item, scope)
            return out
        if isinstance(node, ast.ColumnRef):
            fields = node.fields or ()
            if not fields:
                return NO_LINEAGE
            cols = self.column_ref(fields, scope)
            if len(cols) == 1 and not isinstance(fields[-1], ast.A_Star):
                return Lineage(cols[0].sources, cols[0])
            return Lineage(frozenset().union(*(c.sources for c in cols)) if cols else frozenset())
        if isinstance(node, ast.SubLink):
            test = self.expr(node.testexpr, scope)
            cols = self.query(node.subselect, scope)
            if node.subLinkType == SubLinkType.EXISTS_SUBLINK:
                return Lineage(test.sources)
            return Lineage(test.sources.union(*(c.sources for c in cols)))
        if isinstance(node, QUERY_NODES):
            cols = self.query(node, scope)
            return Lineage(frozenset().union(*(c.sources for c in cols)) if cols else frozenset())
        if isinstance(node, ast.FuncCall):
            self.function(node.funcname, node.args)
        elif isinstance(node, ast.RangeVar):
            # A relation in expression position is not expected; read it rather than ignore it.
            tn, known = self.resolve(node)
            self.acc.access(tn, Access.READ, known=known)
            return NO_LINEAGE
        if isinstance(node, ast.Node):
            out = NO_LINEAGE
            for attr in node:
                if attr != "location":
                    out = out | self.expr(getattr(node, attr), scope)
            return out
        return NO_LINEAGE

    def function(self, funcname: Sequence[Any] | None, args: Sequence[Any] | None = None) -> None:
        parts = [(p.sval or "").lower() for p in funcname or () if isinstance(p, ast.String)]
        if not parts:
            return
        if parts[-1] == "set_config" and parts[:-1] in ([], ["pg_catalog"]):
            # The function form of SET. Called with the setting's name as a literal, it is that
            # SET (asyncpg turns jit off this way before it introspects a type): recorded as a
            # setting, not as the dangerous function, unless SET of that name is an identity
            # change or a search_path the analyser would have to follow. What this decides rests
            # on a literal, so the analysis must never be shared by statements of its shape.
            self.acc.literal_bound = True
            name = plain_setting(args[0] if args else None)
            if name is not None:
                self.acc.settings.add(name)
                return
        self.acc.functions.add(".".join(parts))
        if parts[-1] in SERVER_FILE_FUNCTIONS:
            self.acc.dangers.add("server_file_function")

    # ------------------------------------------------------------------ DML

    def target(
        self, rv: ast.RangeVar | None, access: Access, columns: Iterable[str]
    ) -> tuple[TableName, Entry]:
        tn, known = self.resolve(rv)
        self.acc.access(tn, access, columns, known=known)
        cols = self.relation_cols(tn)
        refname = _refname(rv)
        if cols is None:
            return tn, Entry(refname, [], table=tn, complete=False, unknown_read=tn)
        return tn, Entry(refname, cols, table=tn)

    def returning(self, clause: Any, target: Entry, scope: Scope) -> list[Col]:
        if clause is None:
            return []
        exprs = clause.exprs if isinstance(clause, ast.ReturningClause) else clause
        if not exprs:
            return []
        level = Scope(scope, entries=list(scope.entries), star=list(target.cols), merged=dict(scope.merged))
        # RETURNING old.* / new.* (PostgreSQL 18) name the target's row before and after.
        taken = {e.refname for e in scope.entries}
        for name in ("old", "new"):
            if name not in taken:
                level.entries.append(
                    Entry(
                        name,
                        target.cols,
                        table=target.table,
                        complete=target.complete,
                        unknown_read=target.unknown_read,
                        unqualified=False,
                    )
                )
        return self.projection(exprs, level)

    def dml_scope(self, parent: Scope | None, with_clause: ast.WithClause | None) -> Scope:
        scope = Scope(parent)
        self.with_clause(with_clause, scope)
        return scope

    def insert(self, stmt: ast.InsertStmt, parent: Scope | None) -> list[Col]:
        scope = self.dml_scope(parent, stmt.withClause)
        listed = [rt.name for rt in stmt.cols or () if isinstance(rt, ast.ResTarget) and rt.name]
        tn, _ = self.resolve(stmt.relation)
        all_cols = self.catalog.columns(tn) or ()
        tn, entry = self.target(stmt.relation, Access.INSERT, listed or all_cols)
        if stmt.selectStmt is not None:
            self.query(stmt.selectStmt, scope)
        occ = stmt.onConflictClause
        if occ is not None:
            conflict = Scope(
                scope,
                entries=[
                    entry,
                    Entry("excluded", [c.renamed(c.name) for c in entry.cols], complete=entry.complete),
                ],
            )
            conflict.entries[1] = Entry(
                "excluded",
                [Col(c.name, c.sources, c.direct) for c in entry.cols],
                complete=entry.complete,
                unqualified=False,
            )
            if occ.infer is not None:
                for elem in occ.infer.indexElems or ():
                    if isinstance(elem, ast.IndexElem) and elem.name:
                        self.acc.read(tn, elem.name)
                    elif isinstance(elem, ast.IndexElem):
                        self.expr(elem.expr, conflict)
                self.expr(occ.infer.whereClause, conflict)
            if occ.action == OnConflictAction.ONCONFLICT_UPDATE:
                set_cols = [
                    rt.name for rt in occ.targetList or () if isinstance(rt, ast.ResTarget) and rt.name
                ]
                self.acc.access(tn, Access.UPDATE, set_cols, known=entry.complete)
                for rt in occ.targetList or ():
                    self.expr(rt.val if isinstance(rt, ast.ResTarget) else rt, conflict)
                self.expr(occ.whereClause, conflict)
        scope.entries.append(entry)
        return self.returning(stmt.returningClause, entry, scope)

    def update(self, stmt: ast.UpdateStmt, parent: Scope | None) -> list[Col]:
        scope = self.dml_scope(parent, stmt.withClause)
        set_cols = [rt.name for rt in stmt.targetList or () if isinstance(rt, ast.ResTarget) and rt.name]
        _, entry = self.target(stmt.relation, Access.UPDATE, set_cols)
        scope.entries.append(entry)
        scope.star.extend(entry.cols)
        for item in stmt.fromClause or ():
            result = self.from_item(item, scope)
            scope.star.extend(result.star)
            scope.merged.update(result.merged)
        seen_multi: set[int] = set()
        for rt in stmt.targetList or ():
            val = rt.val if isinstance(rt, ast.ResTarget) else rt
            self.expr(rt.indirection if isinstance(rt, ast.ResTarget) else None, scope)
            if isinstance(val, ast.MultiAssignRef):
                # (a, b) = (SELECT ...) repeats the same source once per target column.
                if id(val.source) in seen_multi:
                    continue
                seen_multi.add(id(val.source))
                self.expr(val.source, scope)
            else:
                self.expr(val, scope)
        self.expr(stmt.whereClause, scope)
        return self.returning(stmt.returningClause, entry, scope)

    def delete(self, stmt: ast.DeleteStmt, parent: Scope | None) -> list[Col]:
        scope = self.dml_scope(parent, stmt.withClause)
        _, entry = self.target(stmt.relation, Access.DELETE, ())
        scope.entries.append(entry)
        scope.star.extend(entry.cols)
        for item in stmt.usingClause or ():
            result = self.from_item(item, scope)
            scope.star.extend(result.star)
            scope.merged.update(result.merged)
        self.expr(stmt.whereClause, scope)
        return self.returning(stmt.returningClause, entry, scope)

    def merge(self, stmt: ast.MergeStmt, parent: Scope | None) -> list[Col]:
        scope = self.dml_scope(parent, stmt.withClause)
        tn, known = self.resolve(stmt.relation)
        all_cols = self.catalog.columns(tn) or ()
        # The target is read by the join condition; each WHEN clause adds its own write.
        _, entry = self.target(stmt.relation, Access.READ, ())
        scope.entries.append(entry)
        source = self.from_item(stmt.sourceRelation, scope)
        scope.star.extend(entry.cols + source.star)
        self.expr(stmt.joinCondition, scope)
        for when in stmt.mergeWhenClauses or ():
            if not isinstance(when, ast.MergeWhenClause):
                continue
            named = [rt.name for rt in when.targetList or () if isinstance(rt, ast.ResTarget) and rt.name]
            if when.commandType == CmdType.CMD_UPDATE:
                self.acc.access(tn, Access.UPDATE, named, known=known)
            elif when.commandType == CmdType.CMD_INSERT:
                self.acc.access(tn, Access.INSERT, named or all_cols, known=known)
            elif when.commandType == CmdType.CMD_DELETE:
                self.acc.access(tn, Access.DELETE, known=known)
            self.expr(when.condition, scope)
            for rt in when.targetList or ():
                self.expr(rt.val if isinstance(rt, ast.ResTarget) else rt, scope)
            self.expr(when.values, scope)
        return self.returning(stmt.returningClause, entry, scope)


def fallback_schema(search_path: Sequence[str]) -> str:
    """Where an unqualified name the catalog does not know is taken to live (its creation schema)."""
    for schema in search_path:
        if schema not in ("pg_catalog", "pg_temp", "$user") and not schema.startswith("pg_temp_"):
            return schema
    return "public"


def _refname(rv: ast.RangeVar | None) -> str:
    if rv is None:
        return ""
    if rv.alias is not None and rv.alias.aliasname:
        return rv.alias.aliasname
    return rv.relname or ""


def _rename(cols: list[Col], names: Sequence[str]) -> list[Col]:
    return [c.renamed(names[i]) if i < len(names) else c for i, c in enumerate(cols)]


def _json_table_columns(columns: Any) -> Iterator[str]:
    for col in columns or ():
        if isinstance(col, ast.JsonTableColumn):
            if col.name:
                yield col.name
            yield from _json_table_columns(col.columns)
