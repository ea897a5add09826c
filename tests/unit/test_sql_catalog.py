from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from sqlproxy.config.models import MaskKind
from sqlproxy.sql.analyzer import analyze
from sqlproxy.sql.catalog import Catalog, load_catalog
from sqlproxy.sql.model import TableName
from sqlproxy.sql.rewrite import RelationRewrite, rewrite

from .sql_demo_catalog import demo_catalog, t


def test_from_dict_lookup_columns_and_kinds() -> None:
    cat = demo_catalog()
    rel = cat.lookup("public", "customer_emails")
    assert rel is not None
    assert rel.kind == "view"
    assert cat.columns(t("public.orders")) == ("id", "customer_id", "total", "created_at")
    assert cat.columns(t("public.nope")) is None
    assert cat.lookup("public", "customers") != cat.lookup("private", "customers")


def test_resolve_follows_search_path_and_pg_catalog_first() -> None:
    cat = demo_catalog()
    assert cat.resolve("customers", ["private", "public"]) == t("private.customers")
    assert cat.resolve("customers", ["public", "private"]) == t("public.customers")
    assert cat.resolve("customers", ["$user", "nowhere"]) is None
    assert cat.resolve("pg_class", []) == t("pg_catalog.pg_class")


def test_from_dict_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match="schema-qualified"):
        Catalog.from_dict({"customers": {"columns": ["id"]}})
    with pytest.raises(ValueError, match="kind"):
        Catalog.from_dict({"public.x": {"kind": "sequence"}})


def test_each_snapshot_has_its_own_version() -> None:
    assert demo_catalog().version != demo_catalog().version


# ---------------------------------------------------------------- against a real PostgreSQL


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[tuple[Any, str]]:
    schema = f"sqlt_{uuid.uuid4().hex[:8]}"
    c = await asyncpg.connect(pg_dsn)
    await c.execute(
        f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.people
            (id int, gone text, email text, "Region" varchar(8), salary numeric(10,2));
        ALTER TABLE {schema}.people DROP COLUMN gone;
        CREATE VIEW {schema}.contacts AS SELECT id, email AS contact FROM {schema}.people;
        INSERT INTO {schema}.people VALUES (1, 'ann@example.com', 'EU', 10), (2, '5551234567', 'US', 20),
                                           (3, NULL, 'EU', 30);
        """
    )
    try:
        yield c, schema
    finally:
        await c.execute(f"DROP SCHEMA {schema} CASCADE")
        await c.close()


async def test_load_catalog_reads_relations_columns_and_views(conn: tuple[Any, str]) -> None:
    c, schema = conn
    cat = await load_catalog(c)
    people = cat.lookup(schema, "people")
    assert people is not None
    assert people.kind == "table"
    assert [(col.name, col.type) for col in people.columns] == [
        ("id", "integer"),
        ("email", "text"),
        ("Region", "character varying(8)"),
        ("salary", "numeric(10,2)"),
    ]
    view = cat.lookup(schema, "contacts")
    assert view is not None and view.kind == "view" and view.definition
    assert cat.lookup("pg_catalog", "pg_class") is not None
    assert cat.lookup("information_schema", "tables") is not None
    # The view definition is schema-qualified, so lineage resolves to the base table.
    (stmt,) = analyze(f"SELECT contact FROM {schema}.contacts", cat, ["public"]).statements
    assert {str(s) for s in stmt.outputs[0].sources} == {f"{schema}.people.email"}


async def test_rewritten_sql_runs_and_filters_and_masks(conn: tuple[Any, str]) -> None:
    c, schema = conn
    cat = await load_catalog(c)
    directives = {
        TableName(schema, "people"): RelationRewrite(
            "\"Region\" = 'EU'", {"email": MaskKind.PARTIAL, "salary": MaskKind.REDACT}
        )
    }
    sql = rewrite(
        f"SELECT * FROM {schema}.people WHERE true OR 1 = 1 ORDER BY id", directives, cat, [schema], "k"
    )
    rows = await c.fetch(sql)
    assert [tuple(r) for r in rows] == [(1, "a***@example.com", "EU", "***"), (3, None, "EU", "***")]
    partial = rewrite(
        f"SELECT email FROM {schema}.people WHERE id = 2",
        {TableName(schema, "people"): RelationRewrite(None, {"email": MaskKind.PARTIAL})},
        cat,
        [schema],
        "k",
    )
    assert await c.fetchval(partial) == "******4567"
    hashed = rewrite(
        f"SELECT email FROM {schema}.people WHERE id = 1",
        {TableName(schema, "people"): RelationRewrite(None, {"email": MaskKind.HASH})},
        cat,
        [schema],
        "k",
    )
    expected = await c.fetchval("SELECT encode(sha256(convert_to('k' || 'ann@example.com', 'UTF8')), 'hex')")
    assert await c.fetchval(hashed) == expected
    deleted = await c.fetch(
        rewrite(
            f"DELETE FROM {schema}.people WHERE id > 0 RETURNING id, email", directives, cat, [schema], "k"
        )
    )
    assert sorted(tuple(r) for r in deleted) == [(1, "a***@example.com"), (3, None)]
    assert await c.fetchval(f"SELECT count(*) FROM {schema}.people") == 1


DEMO_HOSTILE = [
    "SELECT * FROM customers WHERE true OR 1 = 1",
    "SELECT c.email FROM orders o JOIN customers c ON true",
    "SELECT * FROM orders WHERE customer_id IN (SELECT id FROM customers) OR true",
    "SELECT (SELECT email FROM customers LIMIT 1)",
    "WITH customers AS (SELECT * FROM customers) SELECT * FROM customers",
    "SELECT id::text FROM orders UNION ALL SELECT email FROM public.customers",
    "SELECT * FROM orders o, LATERAL (SELECT * FROM customers c WHERE c.id = o.customer_id) x",
    "SELECT public.customers.email, customers.* FROM public.customers",
    "SELECT row_to_json(c) FROM customers c TABLESAMPLE SYSTEM (50)",
    "UPDATE orders SET total = total FROM customers WHERE customers.id = orders.customer_id",
    "UPDATE customers SET name = name WHERE email LIKE '%' RETURNING *",
    "DELETE FROM customers c WHERE c.email = 'nobody' RETURNING c.email, phone",
    "CREATE TEMP TABLE leak AS SELECT * FROM customers",
    "EXPLAIN ANALYZE SELECT * FROM customers",
    "DECLARE cur CURSOR FOR SELECT * FROM customers",
]


@pytest.mark.parametrize("sql", DEMO_HOSTILE)
async def test_rewritten_hostile_statements_run_on_the_demo_schema(demo_dsn: str, sql: str) -> None:
    c = await asyncpg.connect(demo_dsn)
    try:
        cat = await load_catalog(c)
        directives = {
            TableName("public", "customers"): RelationRewrite(
                "region = 'eu'", {"email": MaskKind.PARTIAL, "phone": MaskKind.HASH}
            )
        }
        tr = c.transaction()
        await tr.start()
        try:
            await c.execute(rewrite(sql, directives, cat, ["public"], "salt"))
        finally:
            await tr.rollback()
    finally:
        await c.close()


async def test_rewritten_select_on_demo_sees_only_filtered_masked_rows(demo_dsn: str) -> None:
    c = await asyncpg.connect(demo_dsn)
    try:
        cat = await load_catalog(c)
        directives = {
            TableName("public", "customers"): RelationRewrite("region = 'eu'", {"email": MaskKind.PARTIAL})
        }
        sql = rewrite(
            "SELECT region, email FROM customers WHERE true OR 1 = 1", directives, cat, ["public"], "s"
        )
        rows = await c.fetch(sql)
        total_eu = await c.fetchval("SELECT count(*) FROM customers WHERE region = 'eu'")
        assert len(rows) == total_eu > 0
        assert {r["region"] for r in rows} == {"eu"}
        assert all("***@" in r["email"] for r in rows)
    finally:
        await c.close()
