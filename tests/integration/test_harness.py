"""The test harness itself: servers start, authenticate for real, hold the demo, restart."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest
import redis
import redis.asyncio

from sqlproxy.embedded.demo_data import DEMO_ROW_COUNTS, load_demo
from sqlproxy.embedded.postgres import EmbeddedPostgres, ExternalPostgres, PostgresServer, with_database
from sqlproxy.embedded.redis import EmbeddedRedis, RedisServer

# --------------------------------------------------------------------------- PostgreSQL


def _wrong_password_dsn(server: PostgresServer) -> str:
    return f"postgresql://{server.user}:not-the-password@{server.host}:{server.port}/postgres"


def test_psycopg_connects_with_generated_password(pg_server: PostgresServer, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT current_user, inet_server_addr()::text").fetchone()
    assert row is not None
    assert row[0] == pg_server.user


async def test_asyncpg_connects_with_generated_password(pg_server: PostgresServer, pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == pg_server.user
    finally:
        await conn.close()


def test_wrong_password_is_refused_by_psycopg(pg_server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(_wrong_password_dsn(pg_server)).close()


async def test_wrong_password_is_refused_by_asyncpg(pg_server: PostgresServer) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(_wrong_password_dsn(pg_server))


def test_embedded_server_uses_scram_for_tcp(pg_server: PostgresServer, pg_dsn: str) -> None:
    if not pg_server.managed:
        pytest.skip("the auth setup of an external server is not ours")
    with psycopg.connect(pg_dsn) as conn:
        methods = {
            r[0]
            for r in conn.execute(
                "SELECT auth_method FROM pg_hba_file_rules WHERE type IN ('host', 'local')"
            ).fetchall()
        }
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = current_user").fetchone()
        listen = conn.execute("SHOW listen_addresses").fetchone()
        prepared = conn.execute("SHOW max_prepared_transactions").fetchone()
    assert methods == {"scram-sha-256"}
    assert stored is not None and stored[0].startswith("SCRAM-SHA-256$")
    assert listen == ("127.0.0.1",)
    assert prepared is not None and int(prepared[0]) > 0


def test_create_and_drop_database(pg_server: PostgresServer) -> None:
    pg_server.create_database("sqlproxy_harness_tmp")
    pg_server.create_database("sqlproxy_harness_tmp")  # exist_ok by default
    with psycopg.connect(pg_server.dsn("sqlproxy_harness_tmp")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("sqlproxy_harness_tmp",)
    pg_server.drop_database("sqlproxy_harness_tmp")
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(pg_server.dsn("sqlproxy_harness_tmp")).close()


def test_embedded_postgres_restarts_with_its_data(pg_factory) -> None:
    pg: EmbeddedPostgres = pg_factory()
    port = pg.port
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    pg.stop()
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.dsn(), connect_timeout=5).close()
    pg.restart()
    assert pg.port == port
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (42,)

    # A second object on the same directory reuses cluster and password (the demo's var/ dir).
    pg.stop()
    again = EmbeddedPostgres(pg.base_dir, durable=False).start()
    try:
        assert again.password == pg.password
        with psycopg.connect(again.dsn()) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
    finally:
        again.stop()


# --------------------------------------------------------------------------- demo data


def test_demo_data_has_expected_row_counts(demo_dsn: str) -> None:
    with psycopg.connect(demo_dsn) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone() for t in DEMO_ROW_COUNTS}
    assert counts == {t: (n,) for t, n in DEMO_ROW_COUNTS.items()}


def test_demo_data_shape(demo_dsn: str) -> None:
    with psycopg.connect(demo_dsn) as conn:
        regions: dict[str, int] = dict(
            conn.execute("SELECT region, count(*) FROM customers GROUP BY region").fetchall()
        )
        contact = conn.execute(
            "SELECT id, name, contact_email FROM customer_contacts WHERE id = 1"
        ).fetchone()
        directory_cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'employee_directory' ORDER BY ordinal_position"
            )
        ]
        card = conn.execute("SELECT card_number FROM sensitive_records WHERE id = 1").fetchone()
        totals_match = conn.execute(
            "SELECT bool_and(o.total = s.sum) FROM orders o "
            "JOIN (SELECT order_id, sum(quantity * unit_price) AS sum FROM order_items GROUP BY 1) s "
            "ON s.order_id = o.id"
        ).fetchone()
        # Identity sequences were moved past the seeded ids: a plain insert works.
        new_id = conn.execute(
            "INSERT INTO customers (name, email, region) VALUES ('New', 'new@example.com', 'eu') RETURNING id"
        ).fetchone()
        conn.rollback()
        conn.execute("SET search_path = hr, public")
        payroll = conn.execute("SELECT count(*) FROM payroll").fetchone()
    assert regions == {"eu": 100, "us": 200}
    assert contact == (1, "Alice Smith", "alice.smith1@example.org")
    assert "salary" not in directory_cols and "email" in directory_cols
    assert card == ("4111111111111111",)
    assert totals_match == (True,)
    assert new_id == (301,)
    assert payroll == (50,)


def test_demo_sensitive_values_are_checkable(demo_dsn: str) -> None:
    def luhn_ok(number: str) -> bool:
        total = 0
        for i, ch in enumerate(reversed(number)):
            d = int(ch) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        return total % 10 == 0

    with psycopg.connect(demo_dsn) as conn:
        cards = [r[0] for r in conn.execute("SELECT card_number FROM sensitive_records")]
        ssns = [r[0] for r in conn.execute("SELECT ssn FROM sensitive_records")]
        ibans = [r[0] for r in conn.execute("SELECT iban FROM hr.payroll")]
    assert all(luhn_ok(c) for c in cards)
    assert all(len(s) == 11 and s[3] == "-" and s[6] == "-" for s in ssns)
    assert all(int("".join(str(int(ch, 36)) for ch in i[4:] + i[:4])) % 97 == 1 for i in ibans)


def test_load_demo_is_idempotent(pg_server: PostgresServer, demo_dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(demo_dsn)["dbname"]
    assert isinstance(name, str)
    again = load_demo(pg_server.dsn(), database=name)
    assert again == with_database(demo_dsn, name)
    with psycopg.connect(again) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (300,)


# --------------------------------------------------------------------------- Redis


def test_redis_answers_ping(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()


async def test_redis_answers_ping_async(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_redis_restart_keeps_the_port(fresh_redis: EmbeddedRedis) -> None:
    url = fresh_redis.url
    client = redis.Redis.from_url(url)
    try:
        client.set("k", "v")
        fresh_redis.stop()
        assert not fresh_redis.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        fresh_redis.restart()
        assert fresh_redis.url == url
        # Same client object: it reconnects to the same address; nothing was persisted.
        assert client.ping() is True
        assert client.get("k") is None
    finally:
        client.close()


# --------------------------------------------------------------------------- DSNs (no server)


def test_external_dsn_round_trips_awkward_credentials() -> None:
    server = ExternalPostgres(
        "host=db.internal port=6543 user='a b' password='p@ss:/?#' dbname=app sslmode=require"
    )
    dsn = server.dsn("other")
    assert dsn.startswith("postgresql://a%20b:p%40ss%3A%2F%3F%23@db.internal:6543/other?")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    assert params["password"] == "p@ss:/?#" and params["user"] == "a b"
    assert params["dbname"] == "other" and params["sslmode"] == "require"
    assert psycopg.conninfo.conninfo_to_dict(server.dsn())["dbname"] == "app"


def test_with_database_keeps_unix_socket_host() -> None:
    dsn = with_database("postgresql://u:p@/postgres?host=/var/run/postgresql&port=5433", "demo")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    assert params["host"] == "/var/run/postgresql" and params["dbname"] == "demo" and params["port"] == "5433"
