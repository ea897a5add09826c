"""Every door gets malformed, oversized, hostile and unauthenticated input: the answer is a clear
status and JSON error, an audit record, and nothing lost."""

from __future__ import annotations

from tests.fix_proxy import ProxyHarness


async def _last_audit(proxy: ProxyHarness, request_id: str | None = None) -> dict[str, object]:
    await proxy.runtime.audit.flush()
    r = await proxy.client.get("/api/v1/audit", params={"limit": 1000}, headers=proxy.auth("admin"))
    records: list[dict[str, object]] = r.json()["records"]
    if request_id is None:
        # the GET itself is audited after it reads, so the newest read is the one before it
        return records[-1]
    found = [rec for rec in records if rec["id"] == request_id]
    assert found, f"no audit record with id {request_id}"
    return found[0]


async def test_missing_and_wrong_credentials(proxy: ProxyHarness) -> None:
    r = await proxy.client.post("/api/v1/query", json={"sql": "SELECT 1"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert body["error"]["code"] == "unauthenticated"
    rec = await _last_audit(proxy, body["id"])
    assert rec["decision"] == "unauthenticated" and rec["user"] is None

    r = await proxy.client.post(
        "/api/v1/query", json={"sql": "SELECT 1"}, headers={"Authorization": "Bearer sqp_not-a-key"}
    )
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "invalid credentials"
    r2 = await proxy.client.post(
        "/api/v1/query", json={"sql": "SELECT 1"}, headers={"Authorization": "Basic YWRtaW46YWRtaW4="}
    )
    assert r2.status_code == 401


async def test_identity_cannot_come_from_the_body(proxy: ProxyHarness) -> None:
    r = await proxy.client.post(
        "/api/v1/query", json={"sql": "SELECT 1", "user": "admin"}, headers=proxy.auth("analyst")
    )
    assert r.status_code == 400
    assert "user" in r.json()["error"]["message"]


async def test_garbage_json_invalid_utf8_and_wrong_shapes(proxy: ProxyHarness) -> None:
    h = {**proxy.auth("analyst"), "Content-Type": "application/json"}
    for content, fragment in [
        (b"{not json", "not valid JSON"),
        (b'\xff\xfe{"sql": 1}', "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"sql": 42}', "sql"),
        (b'{"sql": "SELECT 1", "max_rows": -5}', "max_rows"),
        (b"", "not valid JSON"),
    ]:
        r = await proxy.client.post("/api/v1/query", content=content, headers=h)
        assert r.status_code == 400, (content, r.text)
        body = r.json()
        assert fragment in body["error"]["message"], (content, body)
        rec = await _last_audit(proxy, body["id"])
        assert rec["decision"] == "bad_request" and rec["user"] == "analyst"


async def test_sql_that_does_not_parse_reports_the_position(proxy: ProxyHarness) -> None:
    r = await proxy.query("analyst", "SELECT * FROM customers WHERE id = = 3")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["sqlstate"] == "42601" and err["code"] == "syntax_error"
    assert err["position"] == 36
    r = await proxy.query("analyst", "   ")
    assert r.status_code == 400


async def test_oversized_body_and_sql(proxy: ProxyHarness) -> None:
    huge = "SELECT 1 " + "-- padding\n" * 200_000
    r = await proxy.query("analyst", huge)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"
    cfg = proxy.runtime.config.current
    long_sql = "SELECT " + "+".join(["1"] * (cfg.server.max_sql_bytes // 2 + 10))
    r = await proxy.query("analyst", long_sql)
    assert r.status_code == 413


async def test_nul_bytes_and_unknown_database(proxy: ProxyHarness) -> None:
    r = await proxy.query("analyst", "SELECT 1\x00; DROP TABLE orders")
    assert r.status_code == 400
    r = await proxy.query("analyst", "SELECT 1", database="nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_database"


async def test_transaction_control_refused_over_http(proxy: ProxyHarness) -> None:
    r = await proxy.query("admin", "BEGIN; SELECT 1; COMMIT")
    assert r.status_code == 400
    assert "transaction" in r.json()["error"]["message"]


async def test_database_error_keeps_sqlstate(proxy: ProxyHarness) -> None:
    r = await proxy.query("admin", "SELECT * FROM no_such_table_here")
    assert r.status_code == 400
    assert r.json()["error"]["sqlstate"] == "42P01"
    r = await proxy.query("admin", "SELECT 'abc'::int")
    assert r.json()["error"]["sqlstate"] == "22P02"


async def test_pool_is_not_leaked_by_failures(proxy: ProxyHarness) -> None:
    up = proxy.runtime.upstreams["demo"]
    for _ in range(30):
        await proxy.query("admin", "SELECT 1/0")
        await proxy.query("analyst", "SELECT * FROM employees")
        await proxy.query("admin", "SELECT * FROM no_such_table_here")
    stats = up.pool_stats()
    assert stats["size"] == stats["idle"]
    r = await proxy.query("admin", "SELECT 1")
    assert r.status_code == 200


async def test_openapi_document(proxy: ProxyHarness) -> None:
    r = await proxy.client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in ["/api/v1/query", "/api/v1/query/dry-run", "/api/v1/audit", "/health", "/metrics"]:
        assert p in paths


async def test_health_and_metrics(proxy: ProxyHarness) -> None:
    r = await proxy.client.get("/health")
    assert r.status_code == 200
    assert r.json()["ready"] is True and r.json()["upstreams"]["demo"]["ready"] is True
    await proxy.query("analyst", "SELECT * FROM employees")
    r = await proxy.client.get("/metrics")
    text = r.text
    assert 'sqlproxy_requests_total{decision="deny",door="http"}' in text
    assert "sqlproxy_stage_seconds_bucket" in text
    assert "sqlproxy_audit_queue_depth" in text
    assert 'sqlproxy_pool_connections{database="demo",state="open"}' in text


async def test_admin_endpoints_need_admin(proxy: ProxyHarness) -> None:
    r = await proxy.client.get("/api/v1/admin/users", headers=proxy.auth("analyst"))
    assert r.status_code == 403
    r = await proxy.client.get("/api/v1/admin/users", headers=proxy.auth("admin"))
    assert r.status_code == 200
    users = {u["name"]: u for u in r.json()["users"]}
    assert users["analyst"]["roles"] == ["analyst"]
    assert "api_key_sha256" not in r.text and proxy.keys["analyst"] not in r.text
    r = await proxy.client.get("/api/v1/admin/policies", headers=proxy.auth("admin"))
    assert any(p["name"] == "analyst-no-employees" for p in r.json()["policies"])


async def test_unknown_route_is_json(proxy: ProxyHarness) -> None:
    r = await proxy.client.get("/api/v1/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "http_error"


async def test_upstream_down_is_503_and_audited(proxy: ProxyHarness) -> None:
    from sqlproxy.config.models import DatabaseConfig

    rt = proxy.runtime
    cfg = rt.config.current
    new_dbs = {
        **cfg.databases,
        "dead": DatabaseConfig(dsn="postgresql://x:y@127.0.0.1:1/none", connect_timeout_s=2),
    }
    rt.config.replace(cfg.model_copy(update={"databases": new_dbs}))
    try:
        r = await proxy.query("admin", "SELECT 1", database="dead")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "upstream_unavailable"
        rec = await _last_audit(proxy, r.json()["id"])
        assert rec["decision"] == "error" and rec["database"] == "dead"
        r = await proxy.client.get("/health/ready")
        assert r.status_code == 503
        # the healthy database is undisturbed
        r = await proxy.query("admin", "SELECT 1")
        assert r.status_code == 200
    finally:
        dead = rt.upstreams["dead"]
        rt.config.replace(cfg)
        await dead.close()
        assert "dead" not in rt.upstreams


async def test_statement_timeout_is_504_and_audited(proxy: ProxyHarness) -> None:
    rt = proxy.runtime
    cfg = rt.config.current
    demo = cfg.databases["demo"]
    new_dbs = {**cfg.databases, "slow": demo.model_copy(update={"statement_timeout_ms": 50})}
    rt.config.replace(cfg.model_copy(update={"databases": new_dbs}))
    try:
        # Far longer than 50 ms on any machine; the timeout stops it.
        r = await proxy.query(
            "admin", "SELECT count(*) FROM generate_series(1, 500000000) g", database="slow"
        )
        assert r.status_code == 504, r.text
        body = r.json()
        assert body["error"]["sqlstate"] == "57014"
        rec = await _last_audit(proxy, body["id"])
        assert rec["decision"] == "error" and rec["sqlstate"] == "57014" and rec["database"] == "slow"
        # The pool's connection is usable afterwards: the timeout was local to that transaction.
        r = await proxy.query("admin", "SELECT 1 AS one", database="slow")
        assert r.status_code == 200 and r.json()["results"][0]["rows"] == [[1]]
    finally:
        slow = rt.upstreams["slow"]
        rt.config.replace(cfg)
        await slow.close()
