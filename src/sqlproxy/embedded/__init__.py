"""Servers we start ourselves: PostgreSQL (tests and `make demo`) and Redis (tests)."""

from sqlproxy.embedded._process import EmbeddedServerError
from sqlproxy.embedded.demo_data import DEMO_ROW_COUNTS, load_demo, start_demo_postgres
from sqlproxy.embedded.postgres import EmbeddedPostgres, ExternalPostgres, PostgresServer
from sqlproxy.embedded.redis import EmbeddedRedis, ExternalRedis, RedisServer

__all__ = [
    "DEMO_ROW_COUNTS",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "ExternalPostgres",
    "ExternalRedis",
    "PostgresServer",
    "RedisServer",
    "load_demo",
    "start_demo_postgres",
]
