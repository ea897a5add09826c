"""The HTTP query API on a real PostgreSQL: results and types, masking and row filters through
aliases, expressions, CTEs and views, classification by lineage, transactions and row caps."""

from __future__ import annotations

import re

from tests.fix_proxy import ProxyHarness


async def _rows(proxy: ProxyHarness, user: str, sql: str) -> list[list[object]]:
    r = await proxy.query(user, sql)
    assert r.status_code == 200, r.text
    rows: list[list[object]] = r.json()["results"][-1]["rows"]
    return rows


async def test_result_shape_and_real_types(proxy: ProxyHarness) -> None:
    r = await proxy.query(
        "admin",
        "SELECT 1::int AS i, 2.5::numeric AS n, NULL::text AS z, true AS b, 'x'::text AS t, "
        "'2024-01-02'::date AS d",
    )
    assert r.status_code == 200, r.text
    body = r.json()
    res = body["results"][0]
    assert [c["name"] for c in res["columns"]] == ["i", "n", "z", "b", "t", "d"]
    assert res["rows"] == [[1, 2.5, None, True, "x", "2024-01-02"]]
    assert res["row_count"] == 1 and res["truncated"] is False
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])


async def test_dml_reports_affected_rows_and_multi_statement_is_one_transaction(proxy: ProxyHarness) -> None:
    # Rows made by this test are marked by their creation time.
    mark = "created_at = '2001-01-01T00:00:00Z'"
    r = await proxy.query(
        "developer",
        "INSERT INTO orders (customer_id, total, status, created_at) VALUES "
        "(1, 10, 'pending', '2001-01-01T00:00:00Z'), (1, 11, 'pending', '2001-01-01T00:00:00Z'); "
        f"UPDATE orders SET total = total + 1 WHERE {mark}",
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["row_count"] == 2 and results[0]["command"].startswith("INSERT")
    assert results[1]["row_count"] == 2
    # A failing second statement rolls the first back.
    r = await proxy.query(
        "developer", f"DELETE FROM orders WHERE {mark}; SELECT 1 / 0 FROM orders WHERE {mark}"
    )
    assert r.status_code == 400
    assert r.json()["error"]["sqlstate"] == "22012"
    assert await _rows(proxy, "admin", f"SELECT count(*) FROM orders WHERE {mark}") == [[2]]
    r = await proxy.query("developer", f"DELETE FROM orders WHERE {mark}")
    assert r.json()["results"][0]["row_count"] == 2


async def test_row_cap_is_enforced_while_reading(proxy: ProxyHarness) -> None:
    r = await proxy.query("admin", "SELECT g FROM generate_series(1, 100000) g", max_rows=7)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert len(res["rows"]) == 7 and res["truncated"] is True
    # The database's own cap (1000 in the demo) wins over a larger request.
    r = await proxy.query("admin", "SELECT g FROM generate_series(1, 5000) g", max_rows=100000)
    assert len(r.json()["results"][0]["rows"]) == 1000


async def test_masking_follows_lineage_and_cannot_be_unmasked(proxy: ProxyHarness) -> None:
    plain = await _rows(proxy, "admin", "SELECT email FROM customers WHERE region = 'eu' ORDER BY id LIMIT 3")
    assert all("***" not in str(v[0]) for v in plain)
    for sql in [
        "SELECT email FROM customers ORDER BY id LIMIT 3",
        "SELECT email AS e FROM customers ORDER BY id LIMIT 3",
        "SELECT c.email FROM customers AS c ORDER BY c.id LIMIT 3",
        "SELECT public.customers.email FROM public.customers ORDER BY id LIMIT 3",
        "SELECT lower(email) FROM customers ORDER BY id LIMIT 3",
        "SELECT x FROM (SELECT email AS x, id FROM customers) s ORDER BY id LIMIT 3",
        "WITH c AS (SELECT id, email AS x FROM customers) SELECT x FROM c ORDER BY id LIMIT 3",
        "SELECT email || '' FROM customers ORDER BY id LIMIT 3",
    ]:
        rows = await _rows(proxy, "analyst", sql)
        assert len(rows) == 3, sql
        for (v,) in rows:
            assert isinstance(v, str) and "***" in v, (sql, v)
            assert v not in {p[0] for p in plain}, (sql, v)


async def test_mask_applies_inside_predicates(proxy: ProxyHarness) -> None:
    # A WHERE clause on a masked column sees the masked value, so it cannot be used as an oracle.
    first = (
        await _rows(proxy, "admin", "SELECT email FROM customers WHERE region = 'eu' ORDER BY id LIMIT 1")
    )[0][0]
    assert isinstance(first, str)
    rows = await _rows(proxy, "analyst", f"SELECT count(*) FROM customers WHERE email = '{first}'")
    assert rows == [[0]]


async def test_hash_mask_is_stable_for_joins(proxy: ProxyHarness) -> None:
    rows = await _rows(proxy, "developer", "SELECT email, email FROM customers ORDER BY id LIMIT 2")
    for a, b in rows:
        assert a == b and isinstance(a, str) and re.fullmatch(r"[0-9a-f]{64}", a)
    assert rows[0][0] != rows[1][0]


async def test_row_filter_cannot_be_escaped(proxy: ProxyHarness) -> None:
    eu = (await _rows(proxy, "admin", "SELECT count(*) FROM customers WHERE region = 'eu'"))[0][0]
    total = (await _rows(proxy, "admin", "SELECT count(*) FROM customers"))[0][0]
    assert isinstance(eu, int) and isinstance(total, int) and 0 < eu < total
    for sql in [
        "SELECT count(*) FROM customers",
        "SELECT count(*) FROM customers WHERE true OR 1 = 1",
        "SELECT count(*) FROM customers WHERE region = 'us' OR region <> 'us'",
        "SELECT count(*) FROM (SELECT * FROM customers) s",
        "WITH c AS (SELECT * FROM customers) SELECT count(*) FROM c",
        "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id GROUP BY ()",
        "SELECT count(DISTINCT c.id) FROM customers c, customers d",
    ]:
        rows = await _rows(proxy, "analyst", sql)
        if "JOIN" not in sql:
            assert rows == [[eu]], sql
    us = await _rows(proxy, "analyst", "SELECT count(*) FROM customers WHERE region = 'us'")
    assert us == [[0]]


async def test_classification_by_lineage_and_value(proxy: ProxyHarness) -> None:
    r = await proxy.query(
        "admin", "SELECT email AS contact, lower(email) AS low, name FROM customers LIMIT 5"
    )
    body = r.json()
    assert body["classifications"]["contact"] == ["PII.Email"]
    assert body["classifications"]["low"] == ["PII.Email"]
    assert "name" not in body["classifications"]
    cols = {c["name"]: c["classifications"] for c in body["results"][0]["columns"]}
    assert cols["contact"] == ["PII.Email"]
    # By value: no column rule names this expression, the detector finds the numbers.
    r = await proxy.query("admin", "SELECT '4111 1111 1111 1111'::text AS x, '078-05-1120'::text AS y")
    cls = r.json()["classifications"]
    assert cls["x"] == ["PII.CreditCard"]
    assert cls["y"] == ["PII.SSN"]
    r = await proxy.query("admin", "SELECT card_number, ssn FROM sensitive_records LIMIT 3")
    cls = r.json()["classifications"]
    assert "PII.CreditCard" in cls["card_number"] and "PII.SSN" in cls["ssn"]


async def test_view_columns_carry_classification(proxy: ProxyHarness) -> None:
    r = await proxy.query("admin", "SELECT contact_email FROM customer_contacts LIMIT 2")
    assert r.status_code == 200, r.text
    assert r.json()["classifications"]["contact_email"] == ["PII.Email"]


async def test_dry_run_shows_analysis_and_rewrite(proxy: ProxyHarness) -> None:
    r = await proxy.dry_run("analyst", "SELECT email FROM customers WHERE id = 3")
    body = r.json()
    assert body["allowed"] is True
    st = body["statements"][0]
    assert st["kind"] == "select"
    assert st["relations"] == [{"table": "public.customers", "access": "read", "columns": ["email", "id"]}]
    assert st["outputs"][0]["sources"] == ["public.customers.email"]
    assert body["masks"] == {"public.customers.email": "partial", "public.customers.phone": "partial"} or (
        "public.customers.email" in body["masks"]
    )
    assert body["row_filters"] == {"public.customers": "region = 'eu'"}
    assert body["rewritten_sql"] and "region = 'eu'" in body["rewritten_sql"][0]


async def test_views_do_not_bypass_base_table_policies(proxy: ProxyHarness) -> None:
    # customer_contacts exposes customers.email: the analyst's mask and row filter apply inside it.
    eu = (await _rows(proxy, "admin", "SELECT count(*) FROM customers WHERE region = 'eu'"))[0][0]
    assert await _rows(proxy, "analyst", "SELECT count(*) FROM customer_contacts") == [[eu]]
    rows = await _rows(proxy, "analyst", "SELECT contact_email FROM customer_contacts ORDER BY id LIMIT 3")
    assert len(rows) == 3 and all("***" in str(v) for (v,) in rows)
    rows = await _rows(proxy, "analyst", "SELECT cc.contact_email FROM public.customer_contacts cc LIMIT 2")
    assert all("***" in str(v) for (v,) in rows)
    # employee_directory reads employees, which the analyst may not read at all.
    r = await proxy.query("analyst", "SELECT * FROM employee_directory")
    assert r.status_code == 403
    assert r.json()["error"]["rule"] == "analyst-no-employees"


async def test_session_state_never_leaks_between_requests(proxy: ProxyHarness) -> None:
    # A plain SET outlives its transaction on a pooled connection; the proxy must not hand that
    # connection to the next request as it is.
    for _ in range(3):
        r = await proxy.query("admin", "SET work_mem = '7777kB'; SHOW work_mem")
        assert r.json()["results"][1]["rows"] == [["7777kB"]]
    for _ in range(12):
        rows = await _rows(proxy, "admin", "SHOW work_mem")
        assert rows != [["7777kB"]]
        user = await _rows(proxy, "developer", "SELECT current_setting('sqlproxy.user', true)")
        assert user == [["developer"]]
    stats = proxy.runtime.upstreams["demo"].pool_stats()
    assert stats["size"] == stats["idle"]
