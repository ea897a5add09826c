"""Table-driven policy suite: (user, SQL, expected decision, expected rule), through the real HTTP
app, the real analyser on the live catalog of a real PostgreSQL, and the demo policies
(src/sqlproxy/demo/demo.toml). Each case is checked with a dry run; denied cases are also sent
for execution to prove nothing runs."""

from __future__ import annotations

import pytest

from tests.fix_proxy import ProxyHarness

DENY = False
ALLOW = True

CASES: list[tuple[str, str, bool, str]] = [
    # --- plain reads and the most specific rule -------------------------------------------------
    ("analyst", "SELECT id, name FROM customers", ALLOW, "analyst-read-public"),
    ("analyst", "SELECT name, salary FROM employees", DENY, "analyst-no-employees"),
    ("analyst", "SELECT name FROM employees", DENY, "analyst-no-employees"),
    ("analyst", "SELECT * FROM sensitive_records", DENY, "analyst-no-sensitive-records"),
    (
        "analyst",
        "SELECT count(*) FROM orders o JOIN order_items i ON i.order_id = o.id",
        ALLOW,
        "analyst-read-public",
    ),
    # identifiers: unquoted folds to lower case, schema qualification, quoting
    ("analyst", "SELECT * FROM EMPLOYEES", DENY, "analyst-no-employees"),
    ("analyst", 'SELECT * FROM "public"."employees"', DENY, "analyst-no-employees"),
    ("analyst", "SELECT * FROM public . employees", DENY, "analyst-no-employees"),
    # hiding the table in a subquery, a join, a scalar subquery, EXISTS, a CTE, a set operation
    (
        "analyst",
        "SELECT c.name FROM customers c JOIN employees e ON e.id = c.id",
        DENY,
        "analyst-no-employees",
    ),
    ("analyst", "SELECT (SELECT max(salary) FROM employees)", DENY, "analyst-no-employees"),
    (
        "analyst",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM employees WHERE salary > 100000)",
        DENY,
        "analyst-no-employees",
    ),
    ("analyst", "WITH e AS (SELECT * FROM employees) SELECT * FROM e", DENY, "analyst-no-employees"),
    ("analyst", "SELECT name FROM customers UNION SELECT name FROM employees", DENY, "analyst-no-employees"),
    (
        "analyst",
        "SELECT * FROM customers WHERE id IN (SELECT id FROM sensitive_records)",
        DENY,
        "analyst-no-sensitive-records",
    ),
    # writes in disguise: data-modifying CTEs, multi-statement strings, comments
    ("analyst", "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d", DENY, "default-deny"),
    (
        "analyst",
        "WITH u AS (UPDATE customers SET name = 'x' RETURNING id) SELECT * FROM u",
        DENY,
        "default-deny",
    ),
    ("analyst", "SELECT 1; DELETE FROM orders", DENY, "default-deny"),
    ("analyst", "SELECT 1; -- harmless\nDELETE FROM orders", DENY, "default-deny"),
    ("analyst", "SELECT 1 /* ; */; DROP TABLE orders", DENY, "default-deny"),
    ("analyst", "INSERT INTO orders (customer_id, total, status) VALUES (1, 1, 'x')", DENY, "default-deny"),
    ("analyst", "EXPLAIN ANALYZE DELETE FROM orders", DENY, "default-deny"),
    ("analyst", "PREPARE p AS DELETE FROM orders", DENY, "default-deny"),
    ("analyst", "CREATE TABLE stolen AS SELECT * FROM customers", DENY, "default-deny"),
    ("analyst", "TRUNCATE orders", DENY, "default-deny"),
    # search_path tricks do not change what a name resolves to
    (
        "analyst",
        "SET search_path TO pg_catalog, public; SELECT * FROM employees",
        DENY,
        "analyst-no-employees",
    ),
    # dangerous statements and functions, whatever the tables
    ("analyst", "SELECT pg_read_file('/etc/passwd')", DENY, "default-deny"),
    ("analyst", "SELECT * FROM pg_catalog.pg_read_file('/etc/passwd')", DENY, "default-deny"),
    ("analyst", "SELECT PG_CATALOG.PG_LS_DIR('.')", DENY, "default-deny"),
    ("analyst", "SELECT query_to_xml('select * from employees', true, true, '')", DENY, "default-deny"),
    ("analyst", "SELECT set_config('search_path', 'evil', false)", DENY, "default-deny"),
    # catalog columns holding secrets or other users' data, even for the admin
    ("analyst", "SELECT rolname, rolpassword FROM pg_authid", DENY, "default-deny"),
    ("admin", "SELECT rolname, rolpassword FROM pg_catalog.pg_authid", DENY, "default-deny"),
    ("analyst", "SELECT most_common_vals FROM pg_stats WHERE tablename = 'employees'", DENY, "default-deny"),
    ("analyst", "SELECT query FROM pg_stat_activity", DENY, "default-deny"),
    ("analyst", "SELECT pg_stat_get_backend_activity(1)", DENY, "default-deny"),
    ("analyst", "SELECT rolname FROM pg_roles", ALLOW, "catalog-read"),
    ("analyst", "SELECT pid, state FROM pg_stat_activity", ALLOW, "catalog-read"),
    ("analyst", "SELECT set_config('role', 'postgres', false)", DENY, "default-deny"),
    ("analyst", "SELECT set_config('sqlproxy.user', 'admin', true)", DENY, "default-deny"),
    ("analyst", "SELECT set_config($$ROLE$$, 'postgres', true)", DENY, "default-deny"),
    # The function form of a plain SET is decided as SET (the demo lets everyone SET).
    ("analyst", "SELECT set_config('statement_timeout', '5s', true)", ALLOW, "session-utility"),
    ("analyst", "SELECT lo_import('/etc/passwd')", DENY, "default-deny"),
    ("analyst", "DO $$ BEGIN DELETE FROM orders; END $$", DENY, "default-deny"),
    ("analyst", "COPY orders TO '/tmp/orders.csv'", DENY, "default-deny"),
    ("analyst", "COPY (SELECT 1) TO PROGRAM 'id'", DENY, "default-deny"),
    ("admin", "DO $$ BEGIN NULL; END $$", DENY, "default-deny"),
    ("admin", "ALTER SYSTEM SET work_mem = '1GB'", DENY, "default-deny"),
    ("admin", "COPY orders FROM PROGRAM 'cat /etc/passwd'", DENY, "default-deny"),
    ("admin", "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", DENY, "default-deny"),
    ("admin", "SELECT pg_read_file('/etc/passwd')", DENY, "default-deny"),
    # session utility for everyone
    ("analyst", "SELECT 1", ALLOW, "session-utility"),
    ("developer", "SELECT now()", ALLOW, "session-utility"),
    ("auditor", "SHOW search_path", ALLOW, "session-utility"),
    ("auditor", "SET work_mem = '4MB'", ALLOW, "session-utility"),
    # developer: orders read/write, customers read with masks, nothing else
    (
        "developer",
        "SELECT c.email, o.total FROM customers c JOIN orders o ON o.customer_id = c.id",
        ALLOW,
        "developer-read-customers",
    ),
    ("developer", "UPDATE orders SET status = 'shipped' WHERE id = -1", ALLOW, "developer-orders"),
    ("developer", "DELETE FROM order_items WHERE id = -1", ALLOW, "developer-orders"),
    ("developer", "DELETE FROM customers WHERE id = -1", DENY, "default-deny"),
    ("developer", "UPDATE customers SET email = 'x' WHERE id = -1", DENY, "default-deny"),
    ("developer", "TRUNCATE orders", DENY, "default-deny"),
    ("developer", "SELECT * FROM employees", DENY, "default-deny"),
    # admin: everything but the dangerous
    ("admin", "SELECT * FROM employees", ALLOW, "admin-all"),
    ("admin", "CREATE TABLE admin_scratch (a int)", ALLOW, "admin-all"),
    # auditor: order totals only
    ("auditor", "SELECT total FROM orders", ALLOW, "auditor-orders"),
    ("auditor", "SELECT * FROM customers", DENY, "default-deny"),
    (
        "auditor",
        "SELECT o.total FROM orders o JOIN customers c ON c.id = o.customer_id",
        DENY,
        "default-deny",
    ),
]


@pytest.mark.parametrize(
    ("user", "sql", "allowed", "rule"), CASES, ids=[f"{c[0]}:{c[1][:50]}" for c in CASES]
)
async def test_policy_decision(proxy: ProxyHarness, user: str, sql: str, allowed: bool, rule: str) -> None:
    r = await proxy.dry_run(user, sql)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["allowed"] is allowed, body["decision"]
    if allowed:
        assert rule in body["decision"]["rules"], body["decision"]
    else:
        assert body["decision"]["rule"] == rule, body["decision"]


DENIED_FOR_REAL = [(u, s, r) for (u, s, a, r) in CASES if not a]


@pytest.mark.parametrize(
    ("user", "sql", "rule"), DENIED_FOR_REAL, ids=[f"{c[0]}:{c[1][:50]}" for c in DENIED_FOR_REAL]
)
async def test_denied_statement_does_not_run(proxy: ProxyHarness, user: str, sql: str, rule: str) -> None:
    before = await proxy.query("admin", "SELECT count(*) FROM orders")
    r = await proxy.query(user, sql)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["sqlstate"] == "42501"
    assert err["rule"] == rule
    assert rule in err["message"]
    after = await proxy.query("admin", "SELECT count(*) FROM orders")
    assert before.json()["results"][0]["rows"] == after.json()["results"][0]["rows"]
