"""The demo database: schema.sql + seed.sql from sqlproxy.demo, loaded once."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import MappingProxyType

import psycopg

from sqlproxy.embedded.postgres import EmbeddedPostgres, PostgresServer, create_database, with_database

__all__ = ["DEMO_DATABASE", "DEMO_ROW_COUNTS", "demo_sql", "load_demo", "start_demo_postgres"]

DEMO_DATABASE = "demo"

# What seed.sql inserts; tests assert these exact numbers.
DEMO_ROW_COUNTS: MappingProxyType[str, int] = MappingProxyType(
    {
        "public.customers": 300,
        "public.orders": 3000,
        "public.order_items": 7500,
        "public.employees": 50,
        "public.sensitive_records": 200,
        "hr.payroll": 50,
    }
)

# Any constant works; it only has to be the same for every loader of the demo.
_LOAD_LOCK_KEY = 0x5371_6C50_726F_7879 & 0x7FFF_FFFF_FFFF_FFFF


def demo_sql() -> tuple[str, str]:
    """(schema.sql, seed.sql) as shipped in the sqlproxy.demo package."""
    pkg = resources.files("sqlproxy.demo")
    return (pkg / "schema.sql").read_text("utf-8"), (pkg / "seed.sql").read_text("utf-8")


def load_demo(admin: str | PostgresServer, database: str = DEMO_DATABASE) -> str:
    """Create `database` if missing and load the demo into it unless its tables exist.

    `admin` is a DSN, or a server whose admin DSN is used; it must be allowed to create
    databases. Returns the DSN of the demo database (a postgresql:// URL). Safe to call on every
    start and from concurrent processes.
    """
    admin_dsn = admin if isinstance(admin, str) else admin.dsn()
    create_database(admin_dsn, database, exist_ok=True)
    dsn = with_database(admin_dsn, database)
    schema, seed = demo_sql()
    with psycopg.connect(dsn) as conn, conn.transaction():
        # Two demo processes starting together would both see the tables absent.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOAD_LOCK_KEY,))
        row = conn.execute("SELECT to_regclass('public.customers') IS NOT NULL").fetchone()
        if row is not None and row[0]:
            return dsn
        # No parameters: psycopg sends each script as one simple query, many statements at once.
        conn.execute(schema)
        conn.execute(seed)
    return dsn


def start_demo_postgres(state_dir: Path, port: int | None = None) -> tuple[EmbeddedPostgres, str]:
    """Start (or resume) the demo's own cluster under `state_dir` and make sure the demo is loaded.

    Returns the running server and the demo database's DSN. The cluster, its generated password
    and its last port persist in `state_dir`, so a second run finds its data and, when the port is
    still free, the same DSN. The caller stops the server (or leaves it to the atexit handler).
    """
    server = EmbeddedPostgres(state_dir, port).start()
    try:
        return server, load_demo(server.dsn())
    except BaseException:
        server.stop()
        raise
