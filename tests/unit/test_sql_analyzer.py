from __future__ import annotations

import pytest

from sqlproxy.sql.analyzer import analyze
from sqlproxy.sql.catalog import Catalog
from sqlproxy.sql.model import Access, SqlSyntaxError, StatementAnalysis, StatementKind

from .sql_demo_catalog import demo_catalog, t

CAT = demo_catalog()
PATH = ("public",)


def uses(stmt: StatementAnalysis) -> set[tuple[str, str]]:
    return {(r.table.qualified, r.access.value) for r in stmt.relations}


def cols(stmt: StatementAnalysis, table: str, access: Access) -> set[str]:
    for r in stmt.relations:
        if r.table == t(table) and r.access is access:
            return set(r.columns)
    raise AssertionError(f"no {access} of {table} in {stmt.relations}")


def one(sql: str, path: tuple[str, ...] = PATH) -> StatementAnalysis:
    a = analyze(sql, CAT, path)
    assert len(a.statements) == 1
    return a.statements[0]


# ---------------------------------------------------------------- relations and access modes

RELATION_CASES = [
    ("SELECT * FROM customers", {("public.customers", "read")}),
    ('SELECT * FROM "Customers"', {("public.Customers", "read")}),
    ("SELECT * FROM CUSTOMERS", {("public.customers", "read")}),
    ("SELECT * FROM private.customers", {("private.customers", "read")}),
    (
        "WITH d AS (DELETE FROM orders RETURNING id) SELECT * FROM d",
        {("public.orders", "delete"), ("public.orders", "read")},
    ),
    (
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM employees WHERE salary > 10)",
        {("public.employees", "read")},
    ),
    ("SELECT (SELECT max(total) FROM orders)", {("public.orders", "read")}),
    ("SELECT coalesce((SELECT ssn FROM employees LIMIT 1), 'x')", {("public.employees", "read")}),
    (
        "SELECT id FROM customers UNION SELECT id FROM employees",
        {("public.customers", "read"), ("public.employees", "read")},
    ),
    (
        "SELECT * FROM customers c, LATERAL (SELECT * FROM orders o WHERE o.customer_id = c.id) x",
        {("public.customers", "read"), ("public.orders", "read")},
    ),
    # A CTE named like a table shadows it, but its own body reads the real table.
    ("WITH customers AS (SELECT * FROM employees) SELECT * FROM customers", {("public.employees", "read")}),
    ("WITH orders AS (SELECT * FROM orders) SELECT * FROM orders", {("public.orders", "read")}),
    (
        "INSERT INTO orders (id, total) SELECT id, 1 FROM customers",
        {("public.orders", "insert"), ("public.customers", "read")},
    ),
    (
        "UPDATE employees SET salary = salary * 2 WHERE dept = 'x'",
        {("public.employees", "update"), ("public.employees", "read")},
    ),
    (
        "DELETE FROM orders USING customers WHERE customers.id = orders.customer_id",
        {("public.orders", "delete"), ("public.customers", "read"), ("public.orders", "read")},
    ),
    (
        "MERGE INTO orders o USING customers c ON o.customer_id = c.id "
        "WHEN MATCHED THEN UPDATE SET total = 0 WHEN NOT MATCHED THEN INSERT (id) VALUES (c.id)",
        {
            ("public.orders", "read"),
            ("public.orders", "update"),
            ("public.orders", "insert"),
            ("public.customers", "read"),
        },
    ),
    (
        "INSERT INTO orders (id, total) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET total = excluded.total",
        {("public.orders", "insert"), ("public.orders", "update"), ("public.orders", "read")},
    ),
    ("TRUNCATE orders, customers", {("public.orders", "truncate"), ("public.customers", "truncate")}),
    ("DROP TABLE orders", {("public.orders", "ddl")}),
    ("ALTER TABLE orders ADD COLUMN note text", {("public.orders", "ddl")}),
    ("CREATE INDEX ON orders (total)", {("public.orders", "ddl")}),
    ("COMMENT ON TABLE orders IS 'x'", {("public.orders", "ddl")}),
    ("COMMENT ON COLUMN private.customers.secret IS 'x'", {("private.customers", "ddl")}),
    ("CREATE VIEW v AS SELECT ssn FROM employees", {("public.v", "ddl"), ("public.employees", "read")}),
    ("CREATE TABLE x AS SELECT * FROM employees", {("public.x", "ddl"), ("public.employees", "read")}),
    ("SELECT * INTO x FROM employees", {("public.x", "ddl"), ("public.employees", "read")}),
    ("LOCK TABLE orders IN ACCESS SHARE MODE", {("public.orders", "read")}),
    ("LOCK TABLE orders", {("public.orders", "read"), ("public.orders", "update")}),
    ("SELECT * FROM orders FOR UPDATE", {("public.orders", "read"), ("public.orders", "update")}),
    ("COPY orders FROM STDIN", {("public.orders", "insert")}),
    ("COPY orders TO STDOUT", {("public.orders", "read")}),
    ("COPY (SELECT ssn FROM employees) TO STDOUT", {("public.employees", "read")}),
    ("GRANT SELECT ON employees TO bob", {("public.employees", "ddl")}),
    (
        "CREATE RULE r AS ON INSERT TO orders DO ALSO DELETE FROM employees",
        {("public.orders", "ddl"), ("public.employees", "delete")},
    ),
    # a view is read together with its base relations, so their policies apply through it
    ("SELECT * FROM customer_emails", {("public.customer_emails", "read"), ("public.customers", "read")}),
    ("SELECT * FROM nosuch", {("public.nosuch", "read")}),
]


@pytest.mark.parametrize(("sql", "expected"), RELATION_CASES)
def test_relations_and_access(sql: str, expected: set[tuple[str, str]]) -> None:
    assert uses(one(sql)) == expected


def test_unknown_relation_is_marked_unknown() -> None:
    (rel,) = one("SELECT a FROM nosuch").relations
    assert rel.known is False
    assert rel.columns == frozenset({"a"})


# ---------------------------------------------------------------- kinds and multi-statement strings


def test_comment_does_not_hide_a_second_statement() -> None:
    a = analyze("SELECT 1; -- x\nDELETE FROM orders", CAT, PATH)
    assert a.kinds == (StatementKind.SELECT, StatementKind.DELETE)
    assert uses(a.statements[1]) == {("public.orders", "delete")}


def test_block_comment_and_string_are_not_statements() -> None:
    a = analyze("SELECT '; DELETE FROM orders' /* ; DROP TABLE x */", CAT, PATH)
    assert a.kinds == (StatementKind.SELECT,)
    assert a.relations == ()


KIND_CASES = [
    ("BEGIN", StatementKind.TRANSACTION),
    ("SAVEPOINT a", StatementKind.TRANSACTION),
    ("SET work_mem = '4MB'", StatementKind.SET),
    ("RESET search_path", StatementKind.SET),
    ("SHOW search_path", StatementKind.SHOW),
    ("EXPLAIN SELECT 1", StatementKind.EXPLAIN),
    ("PREPARE p AS SELECT 1", StatementKind.PREPARE),
    ("EXECUTE p", StatementKind.EXECUTE),
    ("DEALLOCATE p", StatementKind.DEALLOCATE),
    ("DO $$ BEGIN END $$", StatementKind.DO),
    ("CALL proc(1)", StatementKind.CALL),
    ("LISTEN ch", StatementKind.LISTEN),
    ("UNLISTEN *", StatementKind.LISTEN),
    ("NOTIFY ch", StatementKind.NOTIFY),
    ("VACUUM orders", StatementKind.MAINTENANCE),
    ("ANALYZE orders", StatementKind.MAINTENANCE),
    ("CHECKPOINT", StatementKind.MAINTENANCE),
    ("REFRESH MATERIALIZED VIEW mv", StatementKind.MAINTENANCE),
    ("DISCARD ALL", StatementKind.DISCARD),
    ("CREATE ROLE r", StatementKind.GRANT),
    ("ALTER ROLE r SUPERUSER", StatementKind.GRANT),
    ("GRANT r TO bob", StatementKind.GRANT),
    ("CREATE SCHEMA s", StatementKind.DDL),
    ("ALTER SYSTEM SET work_mem = '1GB'", StatementKind.DDL),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", StatementKind.DDL),
    ("MERGE INTO orders USING customers c ON false WHEN MATCHED THEN DELETE", StatementKind.MERGE),
    ("COPY orders TO STDOUT", StatementKind.COPY),
    ("DECLARE c CURSOR FOR SELECT 1", StatementKind.CURSOR),
    ("FETCH 10 FROM c", StatementKind.CURSOR),
    ("MOVE FORWARD 3 IN c", StatementKind.CURSOR),
    ("CLOSE c", StatementKind.CURSOR),
    ("CLOSE ALL", StatementKind.CURSOR),
]


@pytest.mark.parametrize(("sql", "kind"), KIND_CASES)
def test_statement_kinds(sql: str, kind: StatementKind) -> None:
    assert one(sql).kind is kind


# ---------------------------------------------------------------- dangers

DANGER_CASES = [
    ("DO $$ BEGIN PERFORM 1; END $$", "do"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "create_function"),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'", "create_function"),
    ("CREATE TRIGGER t BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION f()", "create_function"),
    ("CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)", "create_function"),
    ("CREATE LANGUAGE plx HANDLER plx_call", "create_function"),
    ("CREATE LANGUAGE plperlu", "create_extension"),  # PostgreSQL turns it into CREATE EXTENSION
    ("ALTER SYSTEM SET work_mem = '1GB'", "alter_system"),
    ("COPY orders FROM PROGRAM 'curl evil'", "copy_program"),
    ("COPY orders TO '/tmp/x'", "copy_file"),
    ("LOAD 'evil.so'", "load"),
    ("CREATE EXTENSION dblink", "create_extension"),
    ("SET ROLE admin", "set_role"),
    ("SET LOCAL ROLE admin", "set_role"),
    ("SET SESSION AUTHORIZATION admin", "set_role"),
    ("RESET ROLE", "set_role"),
    ("RESET ALL", "set_role"),
    ("""SET "sqlproxy.user" = 'admin'""", "set_role"),
    ("""SET LOCAL "SQLPROXY.USER" TO 'admin'""", "set_role"),
    ('RESET "sqlproxy.user"', "set_role"),
    ("SECURITY LABEL ON TABLE orders IS 'x'", "security_label"),
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw", "create_server"),
    ("CREATE USER MAPPING FOR bob SERVER s", "create_server"),
    ("CREATE ROLE r SUPERUSER", "create_role"),
    ("ALTER ROLE r SUPERUSER", "alter_role"),
    ("GRANT pg_read_server_files TO bob", "alter_role"),
    ("VACUUM FULL orders", "vacuum_full"),
    ("VACUUM", "database_wide"),
    ("TRUNCATE orders CASCADE", "truncate_cascade"),
    ("SELECT * FROM pg_read_file('/etc/passwd')", "server_file_function"),
    ("SELECT lo_export(1, '/tmp/x')", "server_file_function"),
    ("EXPLAIN ANALYZE SELECT pg_catalog.pg_read_file('/etc/passwd')", "server_file_function"),
    (
        "CREATE SCHEMA s CREATE TRIGGER t BEFORE INSERT ON x FOR EACH ROW EXECUTE FUNCTION f()",
        "create_function",
    ),
]


@pytest.mark.parametrize(("sql", "danger"), DANGER_CASES)
def test_dangers(sql: str, danger: str) -> None:
    assert danger in one(sql).dangers


def test_plain_statements_carry_no_danger() -> None:
    for sql in ("SELECT * FROM orders", "SET work_mem = '4MB'", "VACUUM orders", "COPY orders TO STDOUT"):
        assert one(sql).dangers == frozenset(), sql


# ---------------------------------------------------------------- functions


def test_functions_everywhere() -> None:
    s = one(
        "SELECT lower(name), pg_catalog.upper(email) FROM customers, generate_series(1, 2) g, "
        "ROWS FROM (unnest(array[1]), json_to_recordset('[]') AS (a int)) r "
        "WHERE id IN (SELECT abs(customer_id) FROM orders) ORDER BY md5(name)"
    )
    assert s.functions == {
        "lower",
        "pg_catalog.upper",
        "generate_series",
        "unnest",
        "json_to_recordset",
        "abs",
        "md5",
    }


SET_CONFIG_CASES = [
    # (sql, functions recorded, settings recorded)
    (
        "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new",
        {"current_setting"},
        {"jit"},
    ),
    ("SELECT pg_catalog.set_config('Work_Mem'::text, $1, false)", set(), {"work_mem"}),
    ("SELECT * FROM set_config('statement_timeout', '5s', true)", set(), {"statement_timeout"}),
    ("SELECT set_config('app.tenant', $1, true)", set(), {"app.tenant"}),
    # Identity and search_path changes, and names that are not literals, stay the dangerous function.
    ("SELECT set_config('role', 'admin', false)", {"set_config"}, set()),
    ("SELECT set_config('SESSION_AUTHORIZATION', 'admin', false)", {"set_config"}, set()),
    ("SELECT set_config('search_path', 'evil', false)", {"set_config"}, set()),
    ("SELECT set_config('sqlproxy.user', 'admin', true)", {"set_config"}, set()),
    ("SELECT set_config('SQLPROXY.USER', 'admin', true)", {"set_config"}, set()),
    ("SELECT set_config($1, 'x', false)", {"set_config"}, set()),
    ("SELECT set_config(lower('ROLE'), 'x', false)", {"set_config", "lower"}, set()),
    ("SELECT set_config('', 'x', false)", {"set_config"}, set()),
    # A user's function of the same name is a user's function.
    ("SELECT app.set_config('role', 'x', false)", {"app.set_config"}, set()),
]


@pytest.mark.parametrize(("sql", "functions", "settings"), SET_CONFIG_CASES)
def test_set_config_with_a_literal_name_is_a_setting(
    sql: str, functions: set[str], settings: set[str]
) -> None:
    s = one(sql)
    assert (set(s.functions), set(s.settings)) == (functions, settings)
    assert s.literal_bound is (not sql.startswith("SELECT app."))


# The catalog's own tables and views, as far as these tests need them.
SYSTEM = Catalog.from_dict(
    {
        "pg_catalog.pg_authid": {"columns": ["oid", "rolname", "rolsuper", "rolpassword"]},
        "pg_catalog.pg_roles": {
            "kind": "view",
            "columns": ["rolname", "rolpassword"],
            "definition": "SELECT rolname, '********'::text AS rolpassword FROM pg_catalog.pg_authid",
        },
        "pg_catalog.pg_stat_activity": {"columns": ["pid", "state", "query"]},
        "pg_catalog.pg_stats": {"columns": ["tablename", "attname", "n_distinct", "most_common_vals"]},
    }
)


@pytest.mark.parametrize(
    ("sql", "secret"),
    [
        ("SELECT rolname, rolpassword FROM pg_authid", True),
        ("SELECT * FROM pg_catalog.pg_authid", True),
        ("SELECT a FROM pg_authid a", True),
        ("SELECT (SELECT rolpassword FROM pg_authid LIMIT 1)", True),
        ("SELECT query FROM pg_stat_activity", True),
        ("SELECT most_common_vals FROM pg_stats WHERE tablename = 'employees'", True),
        # Metadata only, or a view that does not show the secret it reads.
        ("SELECT rolname, rolsuper FROM pg_authid", False),
        ("SELECT count(*) FROM pg_authid", False),
        ("SELECT rolname, rolpassword FROM pg_roles", False),
        ("SELECT pid, state FROM pg_stat_activity", False),
        ("SELECT attname, n_distinct FROM pg_stats", False),
    ],
)
def test_catalog_secrets(sql: str, secret: bool) -> None:
    s = analyze(sql, SYSTEM, PATH).statements[0]
    assert ("catalog_secrets" in s.dangers) is secret


def test_functions_in_ddl_defaults_and_call() -> None:
    assert "nextval" in one("CREATE TABLE x (id int DEFAULT nextval('s'))").functions
    assert (
        "pg_catalog.set_config" in one("SELECT pg_catalog.set_config('search_path', 'evil', false)").functions
    )
    assert one("CALL public.proc(lower('x'))").functions == {"public.proc", "lower"}


# ---------------------------------------------------------------- columns per access


def test_read_columns_resolve_unqualified_names_to_the_right_table() -> None:
    s = one("SELECT name, total FROM customers c JOIN orders o ON o.customer_id = c.id WHERE region = 'EU'")
    assert cols(s, "public.customers", Access.READ) == {"name", "id", "region"}
    assert cols(s, "public.orders", Access.READ) == {"total", "customer_id"}


def test_star_expands_from_catalog_and_qualified_star() -> None:
    s = one("SELECT o.* FROM customers c JOIN orders o ON true")
    assert cols(s, "public.orders", Access.READ) == {"id", "customer_id", "total", "created_at"}
    assert cols(s, "public.customers", Access.READ) == set()


def test_whole_row_reference_reads_every_column() -> None:
    s = one("SELECT row_to_json(e) FROM employees e")
    assert cols(s, "public.employees", Access.READ) == {"id", "name", "salary", "ssn", "dept"}


def test_schema_qualified_column_reference() -> None:
    s = one("SELECT private.customers.secret FROM private.customers, public.customers")
    assert cols(s, "private.customers", Access.READ) == {"secret"}
    assert cols(s, "public.customers", Access.READ) == set()


def test_correlated_subquery_reads_outer_column() -> None:
    s = one(
        "SELECT id FROM customers c WHERE EXISTS "
        "(SELECT 1 FROM orders WHERE customer_id = c.id AND email = 'x')"
    )
    assert cols(s, "public.customers", Access.READ) == {"id", "email"}


def test_using_join_column_reads_both_sides() -> None:
    s = one("SELECT id FROM orders JOIN order_items USING (id)")
    assert cols(s, "public.orders", Access.READ) == {"id"}
    assert cols(s, "public.order_items", Access.READ) == {"id"}


def test_insert_columns() -> None:
    assert cols(one("INSERT INTO orders VALUES (1)"), "public.orders", Access.INSERT) == {
        "id",
        "customer_id",
        "total",
        "created_at",
    }
    assert cols(one("INSERT INTO orders (total) VALUES (1)"), "public.orders", Access.INSERT) == {"total"}


def test_update_columns_and_reads() -> None:
    s = one("UPDATE employees SET salary = 1, (dept, name) = (SELECT 'a', 'b') WHERE ssn = 'x' RETURNING id")
    assert cols(s, "public.employees", Access.UPDATE) == {"salary", "dept", "name"}
    assert cols(s, "public.employees", Access.READ) == {"ssn", "id"}


def test_delete_reads_where_and_returning_columns() -> None:
    s = one("DELETE FROM employees WHERE salary > 1 RETURNING ssn")
    assert cols(s, "public.employees", Access.DELETE) == set()
    assert cols(s, "public.employees", Access.READ) == {"salary", "ssn"}


def test_copy_columns() -> None:
    s = one("COPY employees (id, ssn) FROM STDIN WITH (FORMAT csv)")
    assert cols(s, "public.employees", Access.INSERT) == {"id", "ssn"}
    assert s.copy is not None
    assert (s.copy.direction, s.copy.table, s.copy.columns, s.copy.target, s.copy.format) == (
        "from",
        t("public.employees"),
        ("id", "ssn"),
        "stdio",
        "csv",
    )
    out = one("COPY (SELECT 1) TO PROGRAM 'gzip > /tmp/x' BINARY").copy
    assert out is not None
    assert (out.direction, out.table, out.target, out.format) == ("to", None, "program", "binary")


# ---------------------------------------------------------------- wrappers


def test_explain_analyze_runs_the_inner_write() -> None:
    s = one("EXPLAIN ANALYZE DELETE FROM orders")
    assert s.kind is StatementKind.EXPLAIN
    assert s.inner_kind is StatementKind.DELETE
    assert s.executes_inner is True
    assert uses(s) == {("public.orders", "delete")}


def test_explain_without_analyze_does_not_execute() -> None:
    assert one("EXPLAIN DELETE FROM orders").executes_inner is False
    assert one("EXPLAIN (ANALYZE false) DELETE FROM orders").executes_inner is False
    assert one("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM orders").executes_inner is True


def test_prepare_analyses_inner_statement() -> None:
    s = one("PREPARE p AS DELETE FROM employees WHERE id = $1")
    assert s.kind is StatementKind.PREPARE
    assert s.inner_kind is StatementKind.DELETE
    assert ("public.employees", "delete") in uses(s)


def test_declare_cursor_reads_its_query_with_lineage() -> None:
    s = one("DECLARE c NO SCROLL CURSOR FOR SELECT id, email AS e FROM customers WHERE id > $1")
    assert s.kind is StatementKind.CURSOR
    assert s.inner_kind is StatementKind.SELECT
    assert s.executes_inner is True
    assert s.holds_cursor is False
    assert uses(s) == {("public.customers", "read")}
    assert cols(s, "public.customers", Access.READ) == {"id", "email"}
    # The rows its FETCHes return derive from the query's columns (classification by lineage).
    assert [(o.name, {c.column for c in o.sources}) for o in s.outputs] == [("id", {"id"}), ("e", {"email"})]


def test_declare_cursor_with_hold_and_for_update() -> None:
    s = one("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM orders")
    assert s.holds_cursor is True
    assert one("DECLARE c CURSOR WITHOUT HOLD FOR SELECT * FROM orders").holds_cursor is False
    # A cursor that locks rows asks for UPDATE, as PostgreSQL does.
    assert ("public.orders", "update") in uses(one("DECLARE c CURSOR FOR SELECT * FROM orders FOR UPDATE"))


def test_fetch_of_a_cursor_declared_in_the_same_string_has_its_lineage() -> None:
    a = analyze(
        "DECLARE c CURSOR FOR SELECT email AS contact FROM customers; FETCH 2 FROM c; MOVE 1 IN c; "
        "CLOSE c; CLOSE ALL; FETCH 1 FROM other",
        CAT,
        PATH,
    )
    ops = [(s.cursor_op, s.cursor, [o.name for o in s.outputs]) for s in a.statements]
    assert ops == [
        ("declare", "c", ["contact"]),
        ("fetch", "c", ["contact"]),
        ("move", "c", []),
        ("close", "c", []),
        ("close", "*", []),
        ("fetch", "other", []),
    ]
    assert a.statements[1].outputs[0].sources == a.statements[0].outputs[0].sources
    assert a.statements[1].relations == ()  # the lineage, not an access: the DECLARE was decided


def test_fetch_move_close_touch_no_relation() -> None:
    for sql in ("FETCH ALL FROM c", "MOVE LAST IN c", "CLOSE c", "CLOSE ALL"):
        s = one(sql)
        assert (s.kind, s.relations, s.outputs, s.dangers, s.holds_cursor) == (
            StatementKind.CURSOR,
            (),
            (),
            frozenset(),
            False,
        )


@pytest.mark.parametrize(
    ("sql", "deallocates"),
    [
        ("DEALLOCATE ALL", "*"),
        ("DEALLOCATE PREPARE ALL", "*"),
        ("DISCARD ALL", "*"),
        ("DEALLOCATE pdo_stmt_1", "pdo_stmt_1"),
        ('DEALLOCATE PREPARE "Mixed"', "Mixed"),
        ("DISCARD PLANS", None),
        ("SELECT 1", None),
    ],
)
def test_what_a_statement_deallocates(sql: str, deallocates: str | None) -> None:
    assert one(sql).deallocates == deallocates


def test_create_view_reports_inner_reads() -> None:
    s = one("CREATE VIEW v AS SELECT ssn FROM employees")
    assert s.inner_kind is StatementKind.SELECT
    assert cols(s, "public.employees", Access.READ) == {"ssn"}


# ---------------------------------------------------------------- search_path


def test_search_path_change_applies_to_later_statements() -> None:
    a = analyze(
        "SELECT * FROM customers; SET search_path TO private, public; SELECT * FROM customers; "
        "SET LOCAL search_path = public; SELECT * FROM customers; RESET search_path",
        CAT,
        PATH,
    )
    reads = [uses(s) for s in a.statements if s.kind is StatementKind.SELECT]
    assert reads == [
        {("public.customers", "read")},
        {("private.customers", "read")},
        {("public.customers", "read")},
    ]
    assert a.statements[1].search_path == ("private", "public")
    assert a.final_search_path == ("$user", "public")


def test_search_path_quoted_names_keep_case() -> None:
    a = analyze("SET search_path = \"Private\", 'X y'", CAT, PATH)
    assert a.final_search_path == ("Private", "X y")


def test_pg_catalog_is_searched_first_unless_listed() -> None:
    assert uses(one("SELECT * FROM pg_class")) == {("pg_catalog.pg_class", "read")}
    cat = Catalog.from_dict(
        {"public.pg_class": {"columns": ["a"]}, "pg_catalog.pg_class": {"columns": ["oid"]}}
    )
    assert cat.resolve("pg_class", ["public"]) == t("pg_catalog.pg_class")
    assert cat.resolve("pg_class", ["public", "pg_catalog"]) == t("public.pg_class")


def test_search_path_without_table_falls_to_first_schema() -> None:
    (rel,) = one("SELECT * FROM secret", ("app", "public")).relations
    assert rel.table == t("app.secret")
    assert rel.known is False


# ---------------------------------------------------------------- outputs and lineage


def outputs(sql: str) -> list[tuple[str, set[str], bool]]:
    return [(o.name, {str(s) for s in o.sources}, o.direct) for o in one(sql).outputs]


def test_output_names_like_postgresql() -> None:
    names = [
        o[0]
        for o in outputs(
            "SELECT id, name AS n, lower(email), 1 + 2, email::text, 1::int, count(*), "
            "CASE WHEN true THEN 1 END, coalesce(phone, ''), EXISTS (SELECT 1), "
            "(SELECT total FROM orders LIMIT 1), "
            "current_user, c.* FROM customers c"
        )
    ]
    assert names == [
        "id", "n", "lower", "?column?", "email", "int4", "count", "case", "coalesce", "exists", "total",
        "current_user", "id", "name", "email", "phone", "region",
    ]  # fmt: skip


def test_lineage_alias_and_expression() -> None:
    assert outputs("SELECT email AS contact, lower(email) AS le, id + 1 FROM customers") == [
        ("contact", {"public.customers.email"}, True),
        ("le", {"public.customers.email"}, False),
        ("?column?", {"public.customers.id"}, False),
    ]


def test_lineage_through_subquery_and_cte() -> None:
    assert outputs("WITH x AS (SELECT email AS e FROM customers) SELECT s.e FROM (SELECT e FROM x) s") == [
        ("e", {"public.customers.email"}, True)
    ]


def test_lineage_through_recursive_cte() -> None:
    out = outputs(
        "WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM customers UNION ALL SELECT n + 1, e || ssn "
        "FROM r, employees) SELECT e FROM r"
    )
    assert out == [("e", {"public.customers.email", "public.employees.ssn"}, False)]


def test_lineage_through_union_merges_branches() -> None:
    assert outputs("SELECT email FROM customers UNION SELECT ssn FROM employees") == [
        ("email", {"public.customers.email", "public.employees.ssn"}, False)
    ]
    assert outputs("SELECT email FROM customers UNION SELECT email FROM customers") == [
        ("email", {"public.customers.email"}, True)
    ]


def test_lineage_through_views() -> None:
    assert outputs("SELECT * FROM customer_emails") == [
        ("id", {"public.customers.id"}, True),
        ("contact", {"public.customers.email"}, True),
    ]
    # A view over a view; lower() makes it indirect.
    assert outputs("SELECT contact FROM eu_contacts") == [("contact", {"public.customers.email"}, False)]


def test_view_cycle_in_snapshot_terminates() -> None:
    cat = Catalog.from_dict(
        {
            "public.a": {"kind": "view", "columns": ["x"], "definition": "SELECT x FROM public.b"},
            "public.b": {"kind": "view", "columns": ["x"], "definition": "SELECT x FROM public.a"},
        }
    )
    (out,) = analyze("SELECT x FROM a", cat, PATH).statements[0].outputs
    assert out.name == "x"
    assert out.sources  # stops at a view column rather than looping


def test_scalar_subquery_and_function_from_lineage() -> None:
    assert outputs("SELECT (SELECT ssn FROM employees LIMIT 1) AS s") == [
        ("s", {"public.employees.ssn"}, False)
    ]
    assert outputs("SELECT * FROM pg_read_file('/etc/passwd')") == [("pg_read_file", set(), False)]


def test_returning_outputs() -> None:
    assert outputs("DELETE FROM employees RETURNING ssn, salary * 2 AS s2") == [
        ("ssn", {"public.employees.ssn"}, True),
        ("s2", {"public.employees.salary"}, False),
    ]


def test_data_modifying_cte_outputs_follow_returning() -> None:
    assert outputs("WITH d AS (DELETE FROM employees RETURNING ssn) SELECT * FROM d") == [
        ("ssn", {"public.employees.ssn"}, True)
    ]


# ---------------------------------------------------------------- analysis holds no literals, errors


def test_fingerprint_and_normalized() -> None:
    a = analyze("SELECT * FROM orders WHERE id = 42", CAT, PATH)
    b = analyze("SELECT * FROM orders WHERE id = 7", CAT, PATH)
    assert a.fingerprint == b.fingerprint
    assert "42" not in a.normalized
    assert a.normalized == b.normalized


@pytest.mark.parametrize(
    ("sql", "position"), [("SELEC 1", 1), ("SELECT 1; SELEC 2", 11), ("SELECT 'é', FROM", 13)]
)
def test_syntax_error_position_is_one_based(sql: str, position: int) -> None:
    with pytest.raises(SqlSyntaxError) as info:
        analyze(sql, CAT, PATH)
    assert info.value.position == position
    assert "syntax error" in info.value.message


def test_empty_string_has_no_statements() -> None:
    assert analyze("  -- nothing\n", CAT, PATH).statements == ()
