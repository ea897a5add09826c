"""`sqlproxy demo`: an embedded PostgreSQL with the demo schema, demo users with fresh API keys,
and the proxy on top, with ready-to-paste curl commands."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from importlib import resources
from pathlib import Path

from rich.console import Console

from sqlproxy.auth.keys import generate_api_key, hash_api_key
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.embedded.demo_data import load_demo
from sqlproxy.embedded.postgres import EmbeddedPostgres
from sqlproxy.protocol.scram import make_verifier

DEMO_USERS = ("admin", "analyst", "developer", "auditor")


def _demo_keys(state_dir: Path, file_name: str = "demo-keys.json") -> dict[str, str]:
    """API keys (or wire passwords) made once per state dir and kept (0600) so the printed
    commands keep working across runs."""
    path = state_dir / file_name
    if path.exists():
        keys: dict[str, str] = json.loads(path.read_text())
        if all(u in keys for u in DEMO_USERS):
            return keys
    keys = {u: generate_api_key() for u in DEMO_USERS}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=2)
    return keys


def _world_traversable(path: Path) -> bool:
    for p in (path, *path.parents):
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue
    return True


def demo_postgres_dir(state_dir: Path) -> Path:
    """Where the demo cluster lives. PostgreSQL refuses to run as root, so as root it runs as an
    unprivileged user, which must be able to reach its data directory; a checkout under /root or
    a private temporary directory is not reachable, so the cluster then lives under the system
    temporary directory instead (one per state dir, kept across runs)."""
    state_dir = state_dir.resolve()
    if os.geteuid() != 0 or _world_traversable(state_dir):
        return state_dir / "postgres"
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"sqlproxy-demo-{tag}"


def write_demo_config(
    state_dir: Path,
    dsn: str,
    http_port: int,
    keys: dict[str, str],
    passwords: dict[str, str] | None = None,
) -> Path:
    template = resources.files("sqlproxy.demo").joinpath("demo.toml").read_text(encoding="utf-8")
    text = (
        template.replace("@DSN@", dsn)
        .replace("@STATE_DIR@", str(state_dir.resolve()))
        .replace("@HTTP_PORT@", str(http_port))
    )
    for user, key in keys.items():
        text = text.replace(f"@KEY_{user.upper()}@", hash_api_key(key))
    for user in DEMO_USERS:
        # Wire-door passwords are stored as SCRAM verifiers, like PostgreSQL's pg_authid.
        pw = (passwords or {}).get(user)
        line = f'password = "{make_verifier(pw)}"' if pw else ""
        text = text.replace(f"@WIRE_{user.upper()}@", line)
    path = state_dir / "demo.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def run_demo(state_dir: Path, http_port: int) -> None:
    from sqlproxy.server import serve

    console = Console()
    state_dir.mkdir(parents=True, exist_ok=True)
    console.print("[bold]sqlproxy demo[/bold]: starting an embedded PostgreSQL ...")
    pg_dir = demo_postgres_dir(state_dir)
    console.print(f"PostgreSQL data directory: {pg_dir}", highlight=False)
    pg = EmbeddedPostgres(pg_dir)
    pg.start()
    try:
        dsn = load_demo(pg)
        keys = _demo_keys(state_dir)
        passwords = _demo_keys(state_dir, "demo-passwords.json")
        cfg_path = write_demo_config(state_dir, dsn, http_port, keys, passwords)
        holder = ConfigHolder(load_config(cfg_path), cfg_path)
        base = f"http://127.0.0.1:{http_port}"
        lines = [
            f"Proxy: {base}   (OpenAPI docs: {base}/docs, metrics: {base}/metrics)",
            f"Config: {cfg_path}   (edit, then: curl -X POST -H 'Authorization: Bearer $ADMIN' "
            f"{base}/api/v1/admin/reload)",
            "",
            *(f"export {u.upper()}={k}" for u, k in keys.items()),
            "",
            "# the analyst sees EU customers only, with e-mail and phone masked:",
            f'curl -s {base}/api/v1/query -H "Authorization: Bearer $ANALYST" '
            '-d \'{"sql": "SELECT id, name, email, phone, region FROM customers LIMIT 5"}\'',
            "# the analyst may not read salaries (403 naming the rule):",
            f'curl -s {base}/api/v1/query -H "Authorization: Bearer $ANALYST" '
            '-d \'{"sql": "SELECT name, salary FROM employees"}\'',
            "# a data-modifying CTE is a write, whatever the outer SELECT says:",
            f'curl -s {base}/api/v1/query -H "Authorization: Bearer $ANALYST" '
            '-d \'{"sql": "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d"}\'',
            "# what the analyser and the policy say, without running anything:",
            f'curl -s {base}/api/v1/query/dry-run -H "Authorization: Bearer $DEVELOPER" '
            '-d \'{"sql": "SELECT c.email, o.total FROM customers c '
            "JOIN orders o ON o.customer_id = c.id\"}'",
            "# the audit trail (the auditor sees everyone's):",
            f"curl -s '{base}/api/v1/audit?limit=5' -H \"Authorization: Bearer $AUDITOR\"",
            "# the same users over the PostgreSQL wire protocol (psql, any driver):",
            *(
                f'PGPASSWORD={passwords[u]} psql "host=127.0.0.1 port={holder.current.wire.port} '
                f'dbname=demo user={u}"'
                for u in ("analyst", "admin")
            ),
            "# verify the audit hash chain:",
            f"sqlproxy audit verify --config {cfg_path}",
        ]
        console.rule("[bold green]sqlproxy demo is ready[/bold green]")
        # Plain, unwrapped lines so that every command can be pasted as it stands.
        for line in lines:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        console.rule()
        serve(holder)
    finally:
        pg.stop()
