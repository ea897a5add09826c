"""The result of analysing a SQL string: what the policy engine, classifier, rewriter and audit read.

Everything here is immutable and free of literal values, because one analysis is shared by every
request whose statement has the same shape (see ``sql.cache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Access(StrEnum):
    """How a statement touches a relation. A request needs a policy allowing every one it uses."""

    READ = "read"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"
    DDL = "ddl"


class StatementKind(StrEnum):
    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    MERGE = "merge"
    COPY = "copy"
    DDL = "ddl"  # CREATE / ALTER / DROP / COMMENT / ... of schema objects
    TRUNCATE = "truncate"
    GRANT = "grant"  # GRANT / REVOKE / role management
    SET = "set"  # SET / RESET
    SHOW = "show"
    TRANSACTION = "transaction"  # BEGIN / COMMIT / ROLLBACK / SAVEPOINT / PREPARE TRANSACTION ...
    EXPLAIN = "explain"
    PREPARE = "prepare"
    EXECUTE = "execute"
    DEALLOCATE = "deallocate"
    DO = "do"
    CALL = "call"
    LISTEN = "listen"  # LISTEN / UNLISTEN
    NOTIFY = "notify"
    LOCK = "lock"
    MAINTENANCE = (
        "maintenance"  # VACUUM / ANALYZE / CLUSTER / REINDEX / CHECKPOINT / REFRESH MATERIALIZED VIEW
    )
    DISCARD = "discard"
    CURSOR = "cursor"  # DECLARE ... CURSOR FOR <query> / FETCH / MOVE / CLOSE
    OTHER = "other"


# Categories let a policy say "dml" instead of listing kinds.
CATEGORY: dict[StatementKind, str] = {
    StatementKind.SELECT: "read",
    StatementKind.INSERT: "dml",
    StatementKind.UPDATE: "dml",
    StatementKind.DELETE: "dml",
    StatementKind.MERGE: "dml",
    StatementKind.COPY: "dml",
    StatementKind.DDL: "ddl",
    StatementKind.TRUNCATE: "ddl",
    StatementKind.GRANT: "ddl",
    # A cursor reads: DECLARE runs its query, FETCH/MOVE/CLOSE only step through what it found.
    StatementKind.CURSOR: "read",
}


def category(kind: StatementKind) -> str:
    return CATEGORY.get(kind, "utility")


@dataclass(frozen=True, slots=True, order=True)
class TableName:
    """A relation resolved to its schema. ``schema`` is lower-cased unless it was quoted."""

    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def __str__(self) -> str:
        return self.qualified


@dataclass(frozen=True, slots=True)
class RelationAccess:
    """One (relation, access mode) pair used by a statement.

    ``columns`` are the columns this access touches: for READ every column referenced anywhere
    (projection, WHERE, JOIN, ORDER BY, ``*`` expanded from the catalog); for INSERT the target
    columns (all columns when the statement lists none); for UPDATE the SET targets; empty for
    DELETE, TRUNCATE and DDL, which act on whole rows or the whole relation.
    """

    table: TableName
    access: Access
    columns: frozenset[str] = frozenset()
    # False when the catalog did not know the relation (the name is resolved against search_path
    # as written, to its first schema).
    known: bool = True


@dataclass(frozen=True, slots=True, order=True)
class ColumnSource:
    table: TableName
    column: str

    def __str__(self) -> str:
        return f"{self.table.qualified}.{self.column}"


@dataclass(frozen=True, slots=True)
class OutputColumn:
    """A column of the statement's result, and the base-table columns its value derives from.

    ``direct`` is True when the output is exactly one source column, unchanged (possibly renamed).
    """

    name: str
    sources: frozenset[ColumnSource] = frozenset()
    direct: bool = False


@dataclass(frozen=True, slots=True)
class CopyInfo:
    direction: str  # "from" (into the table) or "to" (out of it)
    table: TableName | None  # None for COPY (query) TO
    columns: tuple[str, ...]  # listed columns, empty when none were listed
    target: str  # "stdio", "file" or "program"
    format: str  # "text", "csv" or "binary"


@dataclass(frozen=True, slots=True)
class StatementAnalysis:
    index: int  # position in the request string, from 0
    kind: StatementKind
    relations: tuple[RelationAccess, ...] = ()
    outputs: tuple[OutputColumn, ...] = ()  # for row-returning statements (SELECT, RETURNING, ...)
    functions: frozenset[str] = frozenset()  # called functions, lower-case, schema-qualified if written so
    # Markers for things that are dangerous whatever the tables: "alter_system", "create_function",
    # "do", "copy_program", "copy_file", "load", "create_extension", ... (see policy.dangerous).
    dangers: frozenset[str] = frozenset()
    copy: CopyInfo | None = None
    # For SET/RESET of search_path, the new path; the analyser applies it to later statements.
    search_path: tuple[str, ...] | None = None
    # For statements that wrap another (EXPLAIN, PREPARE, CREATE VIEW AS, ...), the inner kind.
    inner_kind: StatementKind | None = None
    # True for EXPLAIN ANALYZE and other wrappers that really run the inner statement.
    executes_inner: bool = False
    # DECLARE ... WITH HOLD: the cursor outlives its transaction, in the server session.
    holds_cursor: bool = False
    # Settings changed by set_config('name', value, is_local) with the name as a literal: each
    # is decided as `SET name` would be (see sqlproxy.sql.walker.plain_setting).
    settings: frozenset[str] = frozenset()
    # DECLARE / FETCH / MOVE / CLOSE: "declare", "fetch", "move" or "close", and the cursor's
    # name ("*" for CLOSE ALL). A FETCH of a cursor declared earlier in the same string has the
    # DECLARE's outputs (lineage), so its rows are classified as the cursor's query's would be.
    cursor_op: str | None = None
    cursor: str | None = None
    # DEALLOCATE name: the name; DEALLOCATE ALL and DISCARD ALL: "*" (every prepared statement
    # of the session goes, protocol-level ones included).
    deallocates: str | None = None
    # Something in this analysis was read off a literal (a set_config call's setting name): a
    # statement of the same shape with other literals may be analysed differently.
    literal_bound: bool = False

    @property
    def category(self) -> str:
        return category(self.kind)

    @property
    def returns_rows(self) -> bool:
        return bool(self.outputs)


@dataclass(frozen=True, slots=True)
class Analysis:
    """A whole request string: one entry per statement, in order."""

    statements: tuple[StatementAnalysis, ...]
    fingerprint: str  # pglast fingerprint of the whole string (literal- and alias-insensitive)
    normalized: str  # the SQL with every literal replaced by $n: safe to log when literals are redacted
    # The search_path in force after the last statement, so a wire session can carry it on.
    final_search_path: tuple[str, ...] = field(default=())
    # Derived once: an analysis is shared by every statement of its shape, and these are read on
    # each one's path.
    kinds: tuple[StatementKind, ...] = field(init=False, repr=False, compare=False)
    relations: tuple[RelationAccess, ...] = field(init=False, repr=False, compare=False)
    # Every relation named is in the catalog snapshot the analysis was made with.
    all_known: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        relations = tuple(r for s in self.statements for r in s.relations)
        object.__setattr__(self, "kinds", tuple(s.kind for s in self.statements))
        object.__setattr__(self, "relations", relations)
        object.__setattr__(self, "all_known", all(r.known for r in relations))


class SqlSyntaxError(ValueError):
    """The SQL does not parse. ``position`` is the 1-based character offset PostgreSQL reports."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
