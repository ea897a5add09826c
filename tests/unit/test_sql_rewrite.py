from __future__ import annotations

from typing import Any

import pytest
from pglast import ast, parse_sql

from sqlproxy.config.models import MaskKind
from sqlproxy.sql.analyzer import analyze
from sqlproxy.sql.model import Access, StatementKind
from sqlproxy.sql.rewrite import RelationRewrite, RewriteError, mask_sql, rewrite

from .sql_demo_catalog import demo_catalog, t

CAT = demo_catalog()
PATH = ("public",)
CUSTOMERS = t("public.customers")
FILTER_ONLY = {CUSTOMERS: RelationRewrite("region = 'EU'")}
FILTERED = "(SELECT id, name, email, phone, region FROM public.customers WHERE region = 'EU') AS customers"


def _stmt(sql: str) -> Any:
    return parse_sql(sql)[0].stmt


def rw(sql: str, directives: Any = None, path: tuple[str, ...] = PATH) -> str:
    return rewrite(sql, FILTER_ONLY if directives is None else directives, CAT, path, "pepper")


def base_customer_scans(sql: str) -> list[tuple[bool, Any]]:
    """For each scan of public.customers in ``sql``: (inside a filtered subquery?, its WHERE)."""
    found: list[tuple[bool, Any]] = []

    def walk(node: Any, where: Any) -> None:
        if isinstance(node, tuple):
            for n in node:
                walk(n, where)
            return
        if not isinstance(node, ast.Node):
            return
        if isinstance(node, ast.SelectStmt):
            where = node.whereClause
        if (
            isinstance(node, ast.RangeVar)
            and node.relname == "customers"
            and node.schemaname in (None, "public")
        ):
            found.append((where is not None, where))
        for attr in node:
            walk(getattr(node, attr), where)

    walk(parse_sql(sql), None)
    return found


EXPECTED_FILTER = _stmt("SELECT 1 WHERE region = 'EU'").whereClause


# ---------------------------------------------------------------- exact output


def test_exact_select_rewrite() -> None:
    assert rw("SELECT name FROM customers WHERE true OR 1 = 1") == (
        f"SELECT name FROM {FILTERED} WHERE TRUE OR 1 = 1"
    )


def test_exact_alias_is_kept() -> None:
    assert rw("SELECT c.name FROM customers AS c") == (
        "SELECT c.name FROM (SELECT id, name, email, phone, region FROM public.customers "
        "WHERE region = 'EU') AS c"
    )


def test_exact_schema_qualified_column_reference_is_shortened() -> None:
    assert rw("SELECT public.customers.name, public.customers.* FROM public.customers") == (
        f"SELECT customers.name, customers.* FROM {FILTERED}"
    )


def test_exact_null_mask() -> None:
    directives = {CUSTOMERS: RelationRewrite(None, {"email": MaskKind.NULL})}
    assert rw("SELECT * FROM customers", directives) == (
        "SELECT * FROM (SELECT id, name, CAST(NULL AS pg_catalog.text) AS email, phone, region "
        "FROM public.customers) AS customers"
    )


def test_exact_delete_grafts_parenthesised_filter() -> None:
    directives = {CUSTOMERS: RelationRewrite("region = 'EU' OR region = 'US'")}
    assert rw("DELETE FROM customers WHERE id = 1 OR true", directives) == (
        "DELETE FROM customers WHERE (customers.region = 'EU' OR customers.region = 'US') "
        "AND (id = 1 OR TRUE)"
    )


def test_exact_update_without_where() -> None:
    assert rw("UPDATE customers AS c SET name = 'x'") == (
        "UPDATE customers AS c SET name = 'x' WHERE c.region = 'EU'"
    )


def test_statements_without_directed_tables_are_untouched() -> None:
    sql = "SELECT 1; -- keep me\nSELECT * FROM orders /* and me */"
    assert rw(sql) == sql


# ---------------------------------------------------------------- the filter cannot be escaped

ESCAPE_CASES = [
    "SELECT * FROM customers WHERE true OR 1=1",
    "SELECT * FROM orders o JOIN customers c ON true",
    "SELECT * FROM orders WHERE customer_id IN (SELECT id FROM customers) OR true",
    "SELECT (SELECT email FROM customers LIMIT 1)",
    "WITH x AS (SELECT * FROM customers) SELECT * FROM x",
    "SELECT id FROM orders UNION ALL SELECT id FROM customers",
    "SELECT * FROM orders o, LATERAL (SELECT * FROM customers c WHERE c.id = o.customer_id) x",
    "SELECT * FROM customers TABLESAMPLE SYSTEM (50)",
    "SELECT * FROM ONLY customers",
    "INSERT INTO orders (id) SELECT id FROM customers",
    "UPDATE orders SET total = 0 FROM customers WHERE customers.id = orders.customer_id",
    "DELETE FROM orders USING customers WHERE customers.id = orders.customer_id",
    "MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN DELETE",
    "CREATE TABLE copy AS SELECT * FROM customers",
    "EXPLAIN ANALYZE SELECT * FROM customers",
    "PREPARE p AS SELECT * FROM customers WHERE id = $1",
    "DECLARE c CURSOR FOR SELECT * FROM customers",
    "COPY customers TO STDOUT",
    "COPY (SELECT * FROM customers) TO STDOUT",
    "SELECT * FROM orders WHERE EXISTS (SELECT 1 FROM public.customers WHERE email LIKE 'a%')",
]


@pytest.mark.parametrize("sql", ESCAPE_CASES)
def test_every_scan_is_filtered(sql: str) -> None:
    out = rw(sql)
    scans = base_customer_scans(out)
    assert scans, out
    for filtered, where in scans:
        assert filtered and where == EXPECTED_FILTER, out
    # The result still parses, analyses, and reads customers.
    a = analyze(out, CAT, PATH)
    assert any(r.table == CUSTOMERS for r in a.relations)


def test_cte_shadowing_the_table_reads_the_filtered_table_once() -> None:
    out = rw("WITH customers AS (SELECT * FROM customers) SELECT * FROM customers")
    assert out == f"WITH customers AS (SELECT * FROM {FILTERED}) SELECT * FROM customers"


def test_cte_named_like_the_table_is_not_rewritten() -> None:
    out = rw("WITH customers AS (SELECT 1 AS id) SELECT * FROM customers")
    assert out == "WITH customers AS (SELECT 1 AS id) SELECT * FROM customers"


def test_other_schema_is_not_rewritten_and_search_path_changes_apply() -> None:
    assert rw("SELECT * FROM private.customers") == "SELECT * FROM private.customers"
    out = rw(
        "SET search_path = private; SELECT * FROM customers; "
        "SET search_path = public; SELECT * FROM customers"
    )
    assert out.count("WHERE region = 'EU'") == 1
    assert out.endswith(f"SELECT * FROM {FILTERED}")


def test_quoted_table_name_is_a_different_table() -> None:
    assert rw('SELECT * FROM "Customers"') == 'SELECT * FROM "Customers"'


def test_output_columns_keep_names_and_order() -> None:
    directives = {CUSTOMERS: RelationRewrite("region = 'EU'", {"email": MaskKind.HASH})}
    out = rw("SELECT * FROM customers", directives)
    a = analyze(out, CAT, PATH)
    assert [o.name for o in a.statements[0].outputs] == ["id", "name", "email", "phone", "region"]


# ---------------------------------------------------------------- masks

MASKS = {CUSTOMERS: RelationRewrite(None, {"email": MaskKind.PARTIAL, "phone": MaskKind.REDACT})}


def test_mask_expressions_are_used_in_select() -> None:
    out = rw("SELECT email, phone FROM customers", MASKS)
    assert mask_sql(MaskKind.REDACT, "phone", "s") in out
    assert "pg_catalog.split_part(CAST(email AS pg_catalog.text), '@', -1)" in out


def test_hash_salt_is_quoted() -> None:
    directives = {CUSTOMERS: RelationRewrite(None, {"email": MaskKind.HASH})}
    out = rewrite("SELECT email FROM customers", directives, CAT, PATH, "it's; DROP TABLE x --")
    assert "'it''s; DROP TABLE x --'" in out
    assert [s.kind for s in analyze(out, CAT, PATH).statements] == [StatementKind.SELECT]


def test_returning_star_is_expanded_with_masks() -> None:
    out = rw("UPDATE customers SET name = 'x' WHERE id = 1 RETURNING *", MASKS)
    returning = _stmt(out).returningClause.exprs
    assert [rt.name or rt.val.fields[-1].sval for rt in returning] == [
        "id",
        "name",
        "email",
        "phone",
        "region",
    ]
    assert isinstance(returning[2].val, ast.CaseExpr)


def test_predicates_on_masked_target_columns_see_masked_values() -> None:
    out = rw("DELETE FROM customers c WHERE c.email LIKE 'a%' RETURNING c.email", MASKS)
    stmt = _stmt(out)
    assert isinstance(stmt.whereClause.lexpr, ast.CaseExpr)
    assert stmt.returningClause.exprs[0].name == "email"
    assert isinstance(stmt.returningClause.exprs[0].val, ast.CaseExpr)


def test_update_set_keeps_target_names() -> None:
    out = rw("UPDATE customers SET email = 'new@x' WHERE id = 1", MASKS)
    assert out == "UPDATE customers SET email = 'new@x' WHERE id = 1"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "row_filter",
    ["true) OR (1=1", "true; DROP TABLE customers", "true ORDER BY 1", "true UNION SELECT 1", "", "region ="],
)
def test_row_filter_must_be_one_expression(row_filter: str) -> None:
    with pytest.raises(RewriteError):
        rw("SELECT * FROM customers", {CUSTOMERS: RelationRewrite(row_filter)})


@pytest.mark.parametrize(
    "sql",
    [
        "MERGE INTO customers c USING orders o ON c.id = o.customer_id WHEN MATCHED THEN DELETE",
        "INSERT INTO customers (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET name = 'x'",
    ],
)
def test_writes_that_cannot_honour_the_filter_are_refused(sql: str) -> None:
    with pytest.raises(RewriteError):
        rw(sql)


def test_whole_row_reference_to_masked_write_target_is_refused() -> None:
    with pytest.raises(RewriteError):
        rw("DELETE FROM customers RETURNING row_to_json(customers)", MASKS)


def test_directed_table_unknown_to_catalog_is_refused() -> None:
    with pytest.raises(RewriteError):
        rw("SELECT * FROM ghosts", {t("public.ghosts"): RelationRewrite("true")})


def test_insert_values_into_directed_table_passes() -> None:
    sql = "INSERT INTO customers (id, email) VALUES (1, 'a@b')"
    assert rw(sql) == sql
    a = analyze(rw(sql), CAT, PATH)
    assert a.statements[0].relations[0].access is Access.INSERT
