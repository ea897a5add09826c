"""Name scopes for one query level, as PostgreSQL's parse analysis builds them.

A ``Col`` carries two things: the base-table columns its value derives from (lineage, for
``outputs``) and the relation columns that referencing it reads (for READ ``columns``). A column
of a base table or view reads itself; a column of a subquery or CTE reads nothing more, because
the subquery's own references were recorded when it was analysed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlproxy.sql.model import ColumnSource, TableName

Read = tuple[TableName, str]


@dataclass(frozen=True, slots=True)
class Col:
    name: str
    sources: frozenset[ColumnSource] = frozenset()
    direct: bool = False
    reads: tuple[Read, ...] = ()

    def renamed(self, name: str) -> Col:
        return Col(name, self.sources, self.direct, self.reads)


@dataclass(slots=True)
class Entry:
    """One range-table entry: what ``alias.column`` and unqualified names can reach."""

    refname: str | None
    cols: list[Col]
    # The relation behind the entry, for ``schema.table.column`` references.
    table: TableName | None = None
    # False when the column list is unknown (relation missing from the catalog, function
    # returning a record): any name may be one of its columns.
    complete: bool = True
    # For an incomplete relation entry, where a read of an unknown column is recorded.
    unknown_read: TableName | None = None
    # An unqualified name matches an entry's columns unless the entry is only reachable by its
    # alias (JOIN ... USING (...) AS alias).
    unqualified: bool = True


@dataclass(slots=True)
class CteDef:
    name: str
    cols: list[Col] | None  # None while a recursive CTE's first branch is being analysed


@dataclass(slots=True)
class Scope:
    parent: Scope | None = None
    entries: list[Entry] = field(default_factory=list)
    star: list[Col] = field(default_factory=list)
    merged: dict[str, Col] = field(default_factory=dict)
    ctes: dict[str, CteDef] = field(default_factory=dict)
    # The level's output columns, once known, so ORDER BY / GROUP BY can name them.
    outputs: list[Col] | None = None

    def find_cte(self, name: str) -> CteDef | None:
        scope: Scope | None = self
        while scope is not None:
            cte = scope.ctes.get(name)
            if cte is not None:
                return cte
            scope = scope.parent
        return None

    def levels(self) -> list[Scope]:
        out: list[Scope] = []
        scope: Scope | None = self
        while scope is not None:
            out.append(scope)
            scope = scope.parent
        return out
