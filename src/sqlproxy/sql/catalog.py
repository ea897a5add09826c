"""An immutable snapshot of an upstream database's relations, as the analyser needs them.

The analyser resolves names with it (schema via search_path, column lists for ``*`` and for
unqualified columns) and follows view definitions for column lineage. A new snapshot is a new
object with a new ``version``, which is what invalidates cached analyses.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlproxy.sql.model import TableName

RELATION_KINDS = frozenset({"table", "view", "matview", "partitioned", "foreign"})

_RELKIND = {"r": "table", "v": "view", "m": "matview", "p": "partitioned", "f": "foreign"}

# Each snapshot gets a process-unique number: cache keys use it instead of id(), which can be
# reused once a snapshot is garbage-collected.
_versions = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Relation:
    name: TableName
    kind: str
    columns: tuple[Column, ...]
    # pg_get_viewdef() text for views and materialized views, None otherwise.
    definition: str | None = None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, eq=False)
class Catalog:
    relations: Mapping[TableName, Relation]
    version: int = field(default_factory=lambda: next(_versions))
    # Analyses of view definitions, filled lazily by the analyser; never part of equality.
    # Keys: a view's TableName (its column lineage) and ("reads", view) (its base reads).
    _view_memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Mapping[str, Any]]) -> Catalog:
        """Build a catalog from plain data, for tests and fixtures.

        ``spec`` maps ``"schema.name"`` to ``{"kind": ..., "columns": [...], "definition": ...}``;
        columns are ``"name"`` (type ``text``), ``("name", "type")`` or ``{"name":, "type":}``.
        """
        rels: dict[TableName, Relation] = {}
        for qualified, body in spec.items():
            schema, _, name = qualified.partition(".")
            if not name:
                raise ValueError(f"{qualified!r}: relation names must be schema-qualified")
            kind = str(body.get("kind", "table"))
            if kind not in RELATION_KINDS:
                raise ValueError(f"{qualified!r}: unknown relation kind {kind!r}")
            cols = tuple(_column(c) for c in body.get("columns", ()))
            definition = body.get("definition")
            tn = TableName(schema, name)
            rels[tn] = Relation(tn, kind, cols, None if definition is None else str(definition))
        return cls(rels)

    @classmethod
    def from_relations(cls, relations: Iterable[Relation]) -> Catalog:
        return cls({r.name: r for r in relations})

    @property
    def schemas(self) -> frozenset[str]:
        return frozenset(t.schema for t in self.relations)

    def lookup(self, schema: str, name: str) -> Relation | None:
        return self.relations.get(TableName(schema, name))

    def resolve(self, name: str, search_path: Sequence[str]) -> TableName | None:
        """The relation an unqualified ``name`` means under ``search_path``, as PostgreSQL finds it.

        pg_catalog is searched first unless the path names it explicitly. ``$user`` and pg_temp
        entries never match: the snapshot holds neither per-user schemas' owner nor temp tables.
        """
        for schema in effective_search_path(search_path):
            if TableName(schema, name) in self.relations:
                return TableName(schema, name)
        return None

    def columns(self, table: TableName) -> tuple[str, ...] | None:
        rel = self.relations.get(table)
        return None if rel is None else rel.column_names

    def kind(self, table: TableName) -> str | None:
        rel = self.relations.get(table)
        return None if rel is None else rel.kind


def effective_search_path(search_path: Sequence[str]) -> tuple[str, ...]:
    path = tuple(search_path)
    if "pg_catalog" not in path:
        path = ("pg_catalog", *path)
    return path


def _column(spec: Any) -> Column:
    if isinstance(spec, str):
        return Column(spec, "text")
    if isinstance(spec, Mapping):
        return Column(str(spec["name"]), str(spec.get("type", "text")))
    name, typ = spec
    return Column(str(name), str(typ))


# Schemas whose relations matter to analysis: every user schema, plus the two system schemas a
# query can read from. pg_toast and other temp schemas are left out.
_CATALOG_QUERY = """
SELECT n.nspname AS schema,
       c.relname AS name,
       c.relkind::text AS relkind,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END AS definition,
       coalesce(
           (SELECT array_agg(a.attname::text ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
           '{}') AS column_names,
       coalesce(
           (SELECT array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
           '{}') AS column_types
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
   AND n.nspname !~ '^pg_toast'
   AND n.nspname !~ '^pg_temp_'
"""


async def load_catalog(conn: Any) -> Catalog:
    """Read a snapshot through an asyncpg connection.

    View definitions are fetched with only pg_catalog on the search_path, so pg_get_viewdef
    schema-qualifies every other relation and the analyser can resolve them unambiguously.
    """
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL search_path = pg_catalog")
        rows = await conn.fetch(_CATALOG_QUERY)
    rels = []
    for row in rows:
        tn = TableName(row["schema"], row["name"])
        cols = tuple(Column(n, t) for n, t in zip(row["column_names"], row["column_types"], strict=True))
        rels.append(Relation(tn, _RELKIND[row["relkind"]], cols, row["definition"]))
    return Catalog.from_relations(rels)
