"""The policy engine: given who asks, on which database, and the analysis of what they sent,
decide allow or deny, and which columns to mask and which row filters to add. Pure logic, no I/O.

Semantics
=========

**Who.** A rule applies to a principal when ``users`` lists the principal's name or ``*``, or
``roles`` lists one of the principal's roles, or ``roles`` lists ``*`` and the principal holds at
least one role. Names are exact (no globs). ``Principal.admin`` is not read: SQL rights come only
from rules.

**Rule shapes.** Each rule is one of three shapes, fixed when the engine is built:

* *function rule*: ``functions`` is non-empty. It only allows or blocks function calls, never
  relations or statements (so ``functions = ["pg_sleep"]`` cannot grant table access by its
  default ``*`` scope). It must be database-level (schema, table ``*``, no columns).
* *statement gate*: database-level (schema and table ``*``, no columns) with an explicit
  ``statements`` list (no ``*``). It decides statement kinds, never grants tables: ``users=["*"],
  statements=["set", "show", "transaction", "select"]`` lets everyone run ``SET``, ``BEGIN`` or
  ``SELECT 1`` without opening any table. A gate that BLOCKs a kind denies every statement of that
  kind (``statements=["ddl"], action="block"``), whatever table rules say, unless a more specific
  gate allows it.
* *relation rule*: every other rule (a schema/table scope, or ``statements`` containing ``*``).
  A database-level relation rule (``admin-all``: database "demo", statements ``*``) also counts
  as a gate for statements that touch no relation.

**Matching a relation access.** For each statement and each (relation, access mode), candidates
are the relation rules applying to the principal whose database/schema/table patterns match
(exact, ``*``, or fnmatch globs, case-sensitive like quoted PostgreSQL identifiers), whose
``access`` contains the mode or ``*``, and whose ``statements`` contain ``*`` or the statement's
kind or category. For a *write* access (insert, update, delete, truncate, ddl) inside a statement
that does not naturally perform it (a data-modifying CTE inside SELECT, EXPLAIN ANALYZE DELETE),
the statement filter is matched against the access's own kind (``delete`` / ``dml``) instead: a
rule limited to ``select`` statements never authorizes a write hidden in one. Natural pairs: INSERT
does insert (and update, for ON CONFLICT DO UPDATE), UPDATE update, DELETE delete, MERGE insert,
update and delete, COPY insert, TRUNCATE truncate, DDL and GRANT ddl. ``COPY ... TO`` (table or
query, to the client) is a read: it matches rules for ``copy``, ``select`` or ``read``, its
natural access is read, and masks and row filters apply to it as to a SELECT. Cursors (kind
``cursor``) likewise: ``DECLARE c CURSOR FOR SELECT ...`` matches rules for ``cursor``,
``select`` or ``read`` and its query's accesses are decided as that SELECT's would be (a
``FOR UPDATE`` cursor still needs update); ``FETCH``, ``MOVE`` and ``CLOSE`` touch no relation
and pass a gate that allows ``select`` (or ``cursor``) statements, since they only step through
rows their DECLARE was allowed to read.

**Specificity.** The winner is the candidate with the highest key
``(column, table, schema, database, principal)`` compared in that order, where each scope level
scores 2 for an exact name, 1 for a glob and 0 for ``*`` (or no columns), and principal scores
3 for a named user, 2 for a role, 1 for ``*``. At equal specificity BLOCK beats MASK beats ALLOW.
No candidate means deny, rule ``default-deny``.

**Columns.** An access that touches columns is decided per column: the candidates are the table
level ones plus the column-scoped rules whose ``columns`` patterns match that column, and the
most specific wins per column. So a column ALLOW beats a table BLOCK for that column only (the
other columns still follow the table BLOCK), and a column BLOCK denies the request even when the
column was only reached through ``SELECT *`` (the reason names the column). An access that
touches no columns (DELETE, TRUNCATE, DDL, ``count(*)``) is decided by table-level rules only.
MASK applies to READ: the column is allowed and a mask recorded. For writes (INSERT/UPDATE
columns) MASK rules are not candidates: a masked column may be written only when another rule
(column- or table-level) allows the write. When one column receives different mask kinds in one
request the strongest is kept (null > redact > hash > partial).

**All or nothing.** Every statement and every access in the request must be allowed; the first
denial decides and names its rule. An allowed decision lists every rule (and row filter) it used.
A request with no statements is allowed with rule ``empty-request``.

**Statements without relations** (SET, SHOW, BEGIN, LISTEN, ``SELECT 1``, ``SELECT now()``)
need a database-level rule (a gate, or a database-level relation rule) whose ``statements``
match the kind or category and whose ``access`` is ``*`` or contains the kind's natural access
(select: read; insert/update/delete/truncate: themselves; ddl and grant: ddl; other kinds have
none, so only ``*`` matches). Transaction control is allowed like any kind: one rule
``statements = ["transaction"]``. Statements that do touch relations must not be blocked by a
gate, and need their relation accesses allowed.

**set_config** with the setting's name as a literal (``SELECT set_config('jit', 'off', false)``,
which asyncpg sends before it introspects a type) is decided as ``SET jit`` would be: it needs a
database-level rule whose ``statements`` match ``set`` (a BLOCK there blocks it), and the
function rules are not consulted. ``role``, ``session_authorization``, ``search_path``,
``sqlproxy.*`` and a name that is not a literal leave it the dangerous function it is.

**Unknown statements** (kind ``other``) are never matched by ``*``: a rule must name ``other``.

**Dangers.** ``*`` never matches a danger marker. Each marker of a statement needs a database-
level rule whose ``statements`` names it; the most specific such rule wins (BLOCK on ties) and
must allow. Any marker, even one not in ``policy.dangerous.DANGER_MARKERS``, is dangerous. The
statement's kind and relations still need their own rules.

**Functions.** A dangerous built-in (``policy.dangerous``; unqualified or ``pg_catalog.``
qualified, any case; ``myschema.pg_read_file`` is a user function) is allowed only when the most
specific matching function rule is an ALLOW whose pattern names it (globs count, a bare ``*`` does
not). Any function may be blocked by a BLOCK function rule. Function rule specificity is
``(pattern exact/glob/*, database, principal)``. A pattern without a schema matches the function in
any schema (so a block on ``secret`` also stops ``public.secret``); ``pg_catalog.`` in a pattern is
ignored.

**Row filters.** For each READ, UPDATE or DELETE access, the row filters applying to the principal
(users/roles as above) and matching the database/schema/table patterns are ANDed, each in
parentheses, in configuration order. ``{user.name}`` is the principal's name; ``{user.X}`` is
attribute X as a SQL literal (see ``policy.predicates``). A missing attribute denies the request
(rule = the filter's name). The substituted predicate is re-validated as a single expression.
A lone filter's predicate is returned as written: the rewriter must parenthesize what it splices.

**Memoization.** Decisions are memoized per (principal name, roles, database, analysis object)
in a bounded dict; a hit also requires the same attributes. The entry holds the analysis, so its
``id`` cannot be reused while the entry lives.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from sqlproxy.config.models import Action, MaskKind, PolicyRule, RowFilter
from sqlproxy.policy import predicates
from sqlproxy.policy.dangerous import DANGER_MARKERS, is_dangerous_function, split_function
from sqlproxy.policy.principal import AttributeValue, Principal
from sqlproxy.sql.model import (
    CATEGORY,
    Access,
    Analysis,
    ColumnSource,
    RelationAccess,
    StatementAnalysis,
    StatementKind,
    TableName,
    category,
)

DEFAULT_DENY: Final = "default-deny"

_EMPTY_MASKS: Mapping[ColumnSource, MaskKind] = MappingProxyType({})
_EMPTY_FILTERS: Mapping[TableName, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # the deciding deny rule, or for an allow the rules used joined by ", "
    reason: str
    rules_used: tuple[str, ...] = ()
    masks: Mapping[ColumnSource, MaskKind] = field(default_factory=lambda: _EMPTY_MASKS)
    row_filters: Mapping[TableName, str] = field(default_factory=lambda: _EMPTY_FILTERS)


def rewrite_directives(decision: Decision) -> dict[TableName, tuple[str | None, Mapping[str, MaskKind]]]:
    """Per table: (row filter or None, masks by column name). A plain structure, so this module does
    not depend on the rewriter; ``RelationRewrite(*pair)`` builds its input."""
    masks: dict[TableName, dict[str, MaskKind]] = {}
    for src, kind in decision.masks.items():
        masks.setdefault(src.table, {})[src.column] = kind
    out: dict[TableName, tuple[str | None, Mapping[str, MaskKind]]] = {}
    for table in sorted(set(masks) | set(decision.row_filters)):
        out[table] = (decision.row_filters.get(table), MappingProxyType(masks.get(table, {})))
    return out


# -- compiled patterns and rules ----------------------------------------------------------------

_EXACT, _GLOB, _ANY = 2, 1, 0


@dataclass(frozen=True, slots=True)
class _Pattern:
    text: str
    score: int
    regex: re.Pattern[str] | None

    @staticmethod
    def of(text: str) -> _Pattern:
        if text == "*":
            return _Pattern(text, _ANY, None)
        if any(c in text for c in "*?["):
            return _Pattern(text, _GLOB, re.compile(fnmatch.translate(text)))
        return _Pattern(text, _EXACT, None)

    def match(self, s: str) -> bool:
        if self.score == _EXACT:
            return s == self.text
        if self.regex is None:
            return True
        return self.regex.match(s) is not None


_RANK: Final = {Action.ALLOW: 0, Action.MASK: 1, Action.BLOCK: 2}
_MASK_STRENGTH: Final = {MaskKind.PARTIAL: 0, MaskKind.HASH: 1, MaskKind.REDACT: 2, MaskKind.NULL: 3}
_ACCESS_NAMES: Final = frozenset(a.value for a in Access)
_STATEMENT_NAMES: Final = (
    frozenset(k.value for k in StatementKind) | frozenset(CATEGORY.values()) | {"utility"} | DANGER_MARKERS
)


@dataclass(frozen=True, slots=True, eq=False)
class _Rule:
    name: str
    action: Action
    rank: int
    mask: MaskKind | None
    users: frozenset[str]
    any_user: bool
    roles: frozenset[str]
    any_role: bool
    database: _Pattern
    schema: _Pattern
    table: _Pattern
    columns: tuple[_Pattern, ...]
    access: frozenset[str] | None  # None: every access
    any_statement: bool
    statements: frozenset[str]  # explicit names (kinds, categories, danger markers)
    functions: tuple[_Pattern, ...]
    functions_any: bool  # a bare "*" among the patterns

    @property
    def db_level(self) -> bool:
        return self.schema.score == _ANY and self.table.score == _ANY and not self.columns

    def principal_score(self, p: Principal) -> int:
        if p.name in self.users:
            return 3
        if p.roles and (self.any_role or not self.roles.isdisjoint(p.roles)):
            return 2
        if self.any_user:
            return 1
        return 0

    def statements_match(self, keys: frozenset[str], wildcard_ok: bool) -> bool:
        return (self.any_statement and wildcard_ok) or not self.statements.isdisjoint(keys)

    def access_match(self, access: str | None) -> bool:
        if self.access is None:
            return True
        return access is not None and access in self.access


def _compile_rule(r: PolicyRule) -> _Rule:
    def fail(msg: str) -> ValueError:
        return ValueError(f"policy rule {r.name!r}: {msg}")

    access = frozenset(a.lower() for a in r.access)
    bad = access - _ACCESS_NAMES - {"*"}
    if bad:
        raise fail(f"unknown access mode(s) {sorted(bad)}; expected {sorted(_ACCESS_NAMES)} or '*'")
    statements = frozenset(s.lower() for s in r.statements)
    bad = statements - _STATEMENT_NAMES - {"*"}
    if bad:
        # A typo in a block rule would otherwise silently block nothing.
        raise fail(
            f"unknown statement kind(s) {sorted(bad)}: expected a kind, a category "
            "(read, dml, ddl, utility), a danger marker or '*'"
        )
    fpatterns = []
    for f in r.functions:
        low = f.lower()
        if low.startswith("pg_catalog."):
            low = low[len("pg_catalog.") :]
        fpatterns.append(_Pattern.of(low))
    rule = _Rule(
        name=r.name,
        action=r.action,
        rank=_RANK[r.action],
        mask=r.mask,
        users=frozenset(u for u in r.users if u != "*"),
        any_user="*" in r.users,
        roles=frozenset(x for x in r.roles if x != "*"),
        any_role="*" in r.roles,
        database=_Pattern.of(r.database),
        schema=_Pattern.of(r.schema_),
        table=_Pattern.of(r.table),
        columns=tuple(_Pattern.of(c) for c in r.columns),
        access=None if "*" in access else access,
        any_statement="*" in statements,
        statements=statements - {"*"},
        functions=tuple(fpatterns),
        functions_any=any(p.score == _ANY for p in fpatterns),
    )
    if rule.functions and not rule.db_level:
        raise fail("a rule with functions applies to whole databases: leave schema and table as '*'")
    return rule


@dataclass(frozen=True, slots=True, eq=False)
class _Filter:
    name: str
    users: frozenset[str]
    any_user: bool
    roles: frozenset[str]
    any_role: bool
    database: _Pattern
    schema: _Pattern
    table: _Pattern
    predicate: str

    def applies(self, p: Principal) -> bool:
        return (
            self.any_user
            or p.name in self.users
            or (bool(p.roles) and (self.any_role or not self.roles.isdisjoint(p.roles)))
        )


def _compile_filter(f: RowFilter) -> _Filter:
    try:
        predicates.check_template(f.predicate)
    except predicates.PredicateError as e:
        raise ValueError(f"row filter {f.name!r}: {e}") from None
    return _Filter(
        name=f.name,
        users=frozenset(u for u in f.users if u != "*"),
        any_user="*" in f.users,
        roles=frozenset(x for x in f.roles if x != "*"),
        any_role="*" in f.roles,
        database=_Pattern.of(f.database),
        schema=_Pattern.of(f.schema_),
        table=_Pattern.of(f.table),
        predicate=f.predicate,
    )


# -- statement keys -----------------------------------------------------------------------------

_ACCESS_KIND: Final = {
    Access.INSERT: StatementKind.INSERT,
    Access.UPDATE: StatementKind.UPDATE,
    Access.DELETE: StatementKind.DELETE,
    Access.TRUNCATE: StatementKind.TRUNCATE,
    Access.DDL: StatementKind.DDL,
}
_NATURAL_WRITES: Final[dict[StatementKind, frozenset[Access]]] = {
    StatementKind.INSERT: frozenset({Access.INSERT, Access.UPDATE}),
    StatementKind.UPDATE: frozenset({Access.UPDATE}),
    StatementKind.DELETE: frozenset({Access.DELETE}),
    StatementKind.MERGE: frozenset({Access.INSERT, Access.UPDATE, Access.DELETE}),
    StatementKind.COPY: frozenset({Access.INSERT}),
    StatementKind.TRUNCATE: frozenset({Access.TRUNCATE}),
    StatementKind.DDL: frozenset({Access.DDL}),
    StatementKind.GRANT: frozenset({Access.DDL}),
}
_KIND_ACCESS: Final[dict[StatementKind, str]] = {
    StatementKind.SELECT: Access.READ.value,
    StatementKind.CURSOR: Access.READ.value,
    StatementKind.INSERT: Access.INSERT.value,
    StatementKind.UPDATE: Access.UPDATE.value,
    StatementKind.DELETE: Access.DELETE.value,
    StatementKind.TRUNCATE: Access.TRUNCATE.value,
    StatementKind.DDL: Access.DDL.value,
    StatementKind.GRANT: Access.DDL.value,
}


def _kind_keys(kind: StatementKind) -> frozenset[str]:
    return frozenset({kind.value, category(kind)})


_KEYS: Final = {k: _kind_keys(k) for k in StatementKind}
_SET_KEYS: Final = _KEYS[StatementKind.SET]
# A cursor is read through as its query would be: a rule for "select" (or "read") statements
# covers DECLARE ... CURSOR FOR a SELECT it allows and the FETCH/MOVE/CLOSE that step through it,
# as PostgreSQL asks no privilege beyond the query's; a rule naming "cursor" matches them too (so
# `statements = ["cursor"], action = "block"` stops cursors).
_KEYS[StatementKind.CURSOR] = frozenset({StatementKind.CURSOR.value, StatementKind.SELECT.value, "read"})


def _access_keys(kind: StatementKind, access: Access) -> frozenset[str]:
    ak = _ACCESS_KIND.get(access)
    if ak is None:
        return _KEYS[kind]
    if access in _NATURAL_WRITES.get(kind, frozenset()):
        return _KEYS[kind] | _KEYS[ak]
    return _KEYS[ak]


_ACCESS_KEYS: Final = {(k, a): _access_keys(k, a) for k in StatementKind for a in Access}

# COPY ... TO (a table or a query, out to the client) reads like a SELECT: a rule granting reads
# to "select" statements covers it, masks and row filters apply to it (by rewrite), and a rule
# naming "copy" still matches it (so `statements = ["copy"], action = "block"` stops exports).
_COPY_TO_KEYS: Final = frozenset({StatementKind.COPY.value, StatementKind.SELECT.value, "read"})


def _is_copy_to(st: StatementAnalysis) -> bool:
    return st.kind is StatementKind.COPY and st.copy is not None and st.copy.direction == "to"


def _statement_keys(st: StatementAnalysis) -> frozenset[str]:
    return _COPY_TO_KEYS if _is_copy_to(st) else _KEYS[st.kind]


# -- per-principal view -------------------------------------------------------------------------

_Cand = tuple[_Rule, int]  # (rule, principal score)


class _View:
    """The rules that apply to one (name, roles), split by shape, with a cache of scope matches."""

    __slots__ = ("dbwide", "filters", "functions", "gates", "relation", "scope_cache")

    def __init__(self, rules: Sequence[_Rule], filters: Sequence[_Filter], p: Principal) -> None:
        self.relation: list[_Cand] = []
        self.gates: list[_Cand] = []
        self.dbwide: list[_Cand] = []
        self.functions: list[_Cand] = []
        for r in rules:
            ps = r.principal_score(p)
            if not ps:
                continue
            if r.functions:
                self.functions.append((r, ps))
            elif r.db_level and not r.any_statement:
                self.gates.append((r, ps))
            else:
                self.relation.append((r, ps))
                if r.db_level:
                    self.dbwide.append((r, ps))
        self.filters = [f for f in filters if f.applies(p)]
        self.scope_cache: dict[tuple[str, str, str], tuple[_Cand, ...]] = {}

    def scoped(self, database: str, table: TableName) -> tuple[_Cand, ...]:
        key = (database, table.schema, table.name)
        hit = self.scope_cache.get(key)
        if hit is None:
            hit = tuple(
                (r, ps)
                for r, ps in self.relation
                if r.database.match(database) and r.schema.match(table.schema) and r.table.match(table.name)
            )
            if len(self.scope_cache) >= 4096:
                self.scope_cache.clear()
            self.scope_cache[key] = hit
        return hit


class _Deny(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        self.rule = rule
        self.reason = reason


def _table_key(r: _Rule, ps: int) -> tuple[int, int, int, int, int, int]:
    return (0, r.table.score, r.schema.score, r.database.score, ps, r.rank)


def _column_score(r: _Rule, column: str) -> int:
    best = -1
    for pat in r.columns:
        if pat.score > best and pat.match(column):
            best = pat.score
    return best


def _where(st: StatementAnalysis) -> str:
    return f"statement {st.index + 1} ({st.kind.value})"


def _settle(
    best: _Rule | None, st: StatementAnalysis, ra: RelationAccess, column: str | None, used: dict[str, None]
) -> None:
    if best is not None and best.action is not Action.BLOCK:
        used[best.name] = None
        return
    if column is None:
        what, hint = f"{ra.access.value} on {ra.table.qualified}", ""
    else:
        what = f"{ra.access.value} of column {ra.table.qualified}.{column}"
        hint = (
            " (list only the columns you may read; SELECT * reads them all)"
            if ra.access is Access.READ
            else ""
        )
    if best is None:
        raise _Deny(DEFAULT_DENY, f"no rule allows {what} ({_where(st)}){hint}")
    raise _Deny(best.name, f"{what} is blocked ({_where(st)}){hint}")


class PolicyEngine:
    """Compiled rules and row filters; ``decide`` is the only entry point. Building it validates
    the rules (unknown access modes or statement names, misplaced function rules, bad predicates
    raise ValueError naming the rule)."""

    def __init__(
        self,
        rules: Sequence[PolicyRule],
        row_filters: Sequence[RowFilter],
        *,
        memo_size: int = 8192,
    ) -> None:
        self._rules = tuple(_compile_rule(r) for r in rules)
        self._filters = tuple(_compile_filter(f) for f in row_filters)
        self._views: dict[tuple[str, frozenset[str]], _View] = {}
        self._memo: dict[
            tuple[str, frozenset[str], str, int], tuple[Analysis, Mapping[str, AttributeValue], Decision]
        ] = {}
        self._memo_size = memo_size
        self._predicates_ok: dict[str, bool] = {}

    # -- public ---------------------------------------------------------------------------------
    def decide(self, principal: Principal, database: str, analysis: Analysis) -> Decision:
        key = (principal.name, principal.roles, database, id(analysis))
        hit = self._memo.get(key)
        if hit is not None and hit[0] is analysis and hit[1] == principal.attributes:
            return hit[2]
        decision = self._decide(principal, database, analysis)
        memo = self._memo
        if len(memo) >= self._memo_size:
            try:
                del memo[next(iter(memo))]
            except (StopIteration, RuntimeError, KeyError):
                memo.clear()
        memo[key] = (analysis, dict(principal.attributes), decision)
        return decision

    # -- internals ------------------------------------------------------------------------------
    def _view(self, p: Principal) -> _View:
        key = (p.name, p.roles)
        v = self._views.get(key)
        if v is None:
            v = _View(self._rules, self._filters, p)
            if len(self._views) >= 1024:
                self._views.clear()
            self._views[key] = v
        return v

    def _decide(self, p: Principal, database: str, analysis: Analysis) -> Decision:
        if not analysis.statements:
            return Decision(True, "empty-request", "no statements", ("empty-request",))
        view = self._view(p)
        used: dict[str, None] = {}
        masks: dict[ColumnSource, MaskKind] = {}
        try:
            for st in analysis.statements:
                self._statement(view, database, st, used, masks)
            filters = self._row_filters(view, p, database, analysis, used)
        except _Deny as d:
            return Decision(False, d.rule, d.reason)
        names = tuple(used)
        return Decision(
            allowed=True,
            rule=", ".join(names),
            reason="allowed",
            rules_used=names,
            masks=MappingProxyType(masks) if masks else _EMPTY_MASKS,
            row_filters=MappingProxyType(filters) if filters else _EMPTY_FILTERS,
        )

    def _statement(
        self,
        view: _View,
        database: str,
        st: StatementAnalysis,
        used: dict[str, None],
        masks: dict[ColumnSource, MaskKind],
    ) -> None:
        keys = _statement_keys(st)
        wildcard_ok = st.kind is not StatementKind.OTHER
        kind_access = Access.READ.value if _is_copy_to(st) else _KIND_ACCESS.get(st.kind)

        for marker in sorted(st.dangers):
            self._danger(view, database, marker, st, used)

        # The statement gate: for a statement without relations it must allow; otherwise it may
        # only block (relation rules grant).
        best: _Cand | None = None
        best_key: tuple[int, int, int] | None = None
        pool: Iterable[_Cand] = view.gates if st.relations else (*view.gates, *view.dbwide)
        for r, ps in pool:
            if (
                r.database.match(database)
                and r.statements_match(keys, wildcard_ok)
                and r.access_match(kind_access)
            ):
                k = (r.database.score, ps, r.rank)
                if best_key is None or k > best_key:
                    best, best_key = (r, ps), k
        if best is not None and best[0].action is Action.BLOCK:
            raise _Deny(best[0].name, f"{_where(st)} is blocked")
        if not st.relations:
            if best is None:
                raise _Deny(DEFAULT_DENY, f"no rule allows {_where(st)} on database {database!r}")
            used[best[0].name] = None

        if st.settings:
            self._settings(view, database, st, used)

        for fn in sorted(st.functions):
            self._function(view, database, fn, st, used)

        for ra in st.relations:
            self._relation(view, database, st, ra, used, masks)

    def _settings(self, view: _View, database: str, st: StatementAnalysis, used: dict[str, None]) -> None:
        """set_config('name', ...) of a plain setting is decided as ``SET name`` would be: by
        the database-level rules for "set" statements, most specific first, BLOCK on ties."""
        best: _Rule | None = None
        best_key: tuple[int, int, int] | None = None
        for r, ps in (*view.gates, *view.dbwide):
            if r.database.match(database) and r.statements_match(_SET_KEYS, True) and r.access_match(None):
                k = (r.database.score, ps, r.rank)
                if best_key is None or k > best_key:
                    best, best_key = r, k
        names = ", ".join(sorted(st.settings))
        if best is None:
            raise _Deny(
                DEFAULT_DENY,
                f"no rule allows set_config of {names} ({_where(st)}): it is decided as SET, "
                "which needs a rule naming 'set' in statements",
            )
        if best.action is not Action.ALLOW:
            raise _Deny(best.name, f"set_config of {names} ({_where(st)}) is blocked, as SET is")
        used[best.name] = None

    def _danger(
        self, view: _View, database: str, marker: str, st: StatementAnalysis, used: dict[str, None]
    ) -> None:
        best: _Rule | None = None
        best_key: tuple[int, int, int] | None = None
        for r, ps in (*view.gates, *view.dbwide):
            if marker in r.statements and r.database.match(database):
                k = (r.database.score, ps, r.rank)
                if best_key is None or k > best_key:
                    best, best_key = r, k
        if best is None:
            raise _Deny(
                DEFAULT_DENY,
                f"{_where(st)} is dangerous ({marker}): it needs a rule naming {marker!r} in statements",
            )
        if best.action is not Action.ALLOW:
            raise _Deny(best.name, f"{_where(st)} is dangerous ({marker}) and blocked")
        used[best.name] = None

    def _function(
        self, view: _View, database: str, fn: str, st: StatementAnalysis, used: dict[str, None]
    ) -> None:
        keys = _statement_keys(st)
        schema, bare = split_function(fn)
        dangerous = is_dangerous_function(fn)
        qualified = None if schema is None else f"{schema}.{bare}"
        best: _Rule | None = None
        best_key: tuple[int, int, int, int] | None = None
        for r, ps in view.functions:
            if not (r.database.match(database) and r.statements_match(keys, True)):
                continue
            score = -1
            for pat in r.functions:
                if dangerous and pat.score == _ANY:
                    continue
                if pat.score > score and (
                    pat.match(bare) or (qualified is not None and pat.match(qualified))
                ):
                    score = pat.score
            if score < 0:
                continue
            k = (score, r.database.score, ps, r.rank)
            if best_key is None or k > best_key:
                best, best_key = r, k
        if best is not None and best.action is Action.BLOCK:
            raise _Deny(best.name, f"function {fn} is blocked ({_where(st)})")
        if dangerous:
            if best is None:
                raise _Deny(
                    DEFAULT_DENY,
                    f"function {fn} is dangerous ({_where(st)}): it needs a rule naming it in functions",
                )
            used[best.name] = None

    def _relation(
        self,
        view: _View,
        database: str,
        st: StatementAnalysis,
        ra: RelationAccess,
        used: dict[str, None],
        masks: dict[ColumnSource, MaskKind],
    ) -> None:
        access = ra.access
        keys = _COPY_TO_KEYS if _is_copy_to(st) else _ACCESS_KEYS[(st.kind, access)]
        wildcard_ok = st.kind is not StatementKind.OTHER
        is_read = access is Access.READ
        table_best: _Rule | None = None
        table_key: tuple[int, int, int, int, int, int] | None = None
        column_cands: list[_Cand] = []
        for c in view.scoped(database, ra.table):
            r, ps = c
            if not (r.access_match(access.value) and r.statements_match(keys, wildcard_ok)):
                continue
            if r.action is Action.MASK and not is_read:
                continue
            if r.columns:
                column_cands.append(c)
                continue
            k = _table_key(r, ps)
            if table_key is None or k > table_key:
                table_best, table_key = r, k

        if not ra.columns:
            _settle(table_best, st, ra, None, used)
            return

        for col in sorted(ra.columns):
            best, best_key = table_best, table_key
            for r, ps in column_cands:
                cs = _column_score(r, col)
                if cs < 0:
                    continue
                k = (cs, r.table.score, r.schema.score, r.database.score, ps, r.rank)
                if best_key is None or k > best_key:
                    best, best_key = r, k
            if best is not None and best.action is Action.MASK:
                assert best.mask is not None  # PolicyRule validation guarantees it
                src = ColumnSource(ra.table, col)
                prev = masks.get(src)
                if prev is None or _MASK_STRENGTH[best.mask] > _MASK_STRENGTH[prev]:
                    masks[src] = best.mask
                used[best.name] = None
                continue
            _settle(best, st, ra, col, used)

    def _row_filters(
        self, view: _View, p: Principal, database: str, analysis: Analysis, used: dict[str, None]
    ) -> dict[TableName, str]:
        if not view.filters:
            return {}
        per_table: dict[TableName, list[_Filter]] = {}
        for st in analysis.statements:
            for ra in st.relations:
                if ra.access not in (Access.READ, Access.UPDATE, Access.DELETE) or ra.table in per_table:
                    continue
                t = ra.table
                per_table[t] = [
                    f
                    for f in view.filters
                    if f.database.match(database) and f.schema.match(t.schema) and f.table.match(t.name)
                ]
        out: dict[TableName, str] = {}
        for table, fs in per_table.items():
            parts: list[str] = []
            for f in fs:
                try:
                    pred = predicates.substitute(f.predicate, p.name, p.attributes)
                except predicates.MissingAttribute as e:
                    raise _Deny(
                        f.name, f"missing attribute {e.attribute!r} for row filter on {table.qualified}"
                    ) from None
                except predicates.PredicateError as e:
                    raise _Deny(f.name, f"row filter on {table.qualified}: {e}") from None
                self._check_predicate(f, table, pred)
                parts.append(pred)
                used[f.name] = None
            if parts:
                out[table] = parts[0] if len(parts) == 1 else " AND ".join(f"({x})" for x in parts)
        return out

    def _check_predicate(self, f: _Filter, table: TableName, pred: str) -> None:
        ok = self._predicates_ok.get(pred)
        if ok is None:
            try:
                predicates.validate(pred)
                ok = True
            except predicates.PredicateError:
                ok = False
            if len(self._predicates_ok) >= 4096:
                self._predicates_ok.clear()
            self._predicates_ok[pred] = ok
        if not ok:
            raise _Deny(f.name, f"row filter on {table.qualified} is not a valid expression once filled in")
