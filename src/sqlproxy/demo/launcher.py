"""`sqlproxy demo`: an embedded PostgreSQL with the demo schema, demo users with fresh API keys,
and the proxy on top, with ready-to-paste curl commands."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from sqlproxy.auth.keys import generate_api_key, hash_api_key
from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.embedded.demo_data import load_demo
from sqlproxy.embedded.postgres import EmbeddedPostgres

DEMO_USERS = ("admin", "analyst", "developer", "auditor")


def _demo_keys(state_dir: Path) -> dict[str, str]:
    """API keys made once per state dir and kept (0600) so curl commands keep working across runs."""
    path = state_dir / "demo-keys.json"
    if path.exists():
        keys: dict[str, str] = json.loads(path.read_text())
        if all(u in keys for u in DEMO_USERS):
            return keys
    keys = {u: generate_api_key() for u in DEMO_USERS}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=2)
    return keys


def write_demo_config(state_dir: Path, dsn: str, http_port: int, keys: dict[str, str]) -> Path:
    template = resources.files("sqlproxy.demo").joinpath("demo.toml").read_text(encoding="utf-8")
    text = (
        template.replace("@DSN@", dsn)
        .replace("@STATE_DIR@", str(state_dir.resolve()))
        .replace("@HTTP_PORT@", str(http_port))
    )
    for user, key in keys.items():
        text = text.replace(f"@KEY_{user.upper()}@", hash_api_key(key))
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
    pg = EmbeddedPostgres(state_dir / "postgres")
    pg.start()
    try:
        dsn = load_demo(pg)
        keys = _demo_keys(state_dir)
        cfg_path = write_demo_config(state_dir, dsn, http_port, keys)
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
            "# verify the audit hash chain:",
            f"sqlproxy audit verify --config {cfg_path}",
        ]
        console.print(Panel("\n".join(lines), title="ready", expand=False), highlight=False)
        serve(holder)
    finally:
        pg.stop()
