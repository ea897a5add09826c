"""The `sqlproxy` command."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sqlproxy import __version__

app = typer.Typer(
    help=(
        "sqlproxy: a policy-enforcing SQL proxy for PostgreSQL.\n\n"
        "Every statement is parsed with PostgreSQL's own grammar, checked against per-user policies "
        "(allow / block / mask / row filters), classified for PII and written to a tamper-evident audit "
        "log. Start with `sqlproxy demo` (embedded PostgreSQL, demo users) or "
        "`sqlproxy serve --config proxy.toml`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Work with configuration files.", no_args_is_help=True)
audit_app = typer.Typer(help="Work with the audit log.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(audit_app, name="audit")

err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="The TOML configuration file.", envvar="SQLPROXY_CONFIG"),
]


def _load(path: Path):  # type: ignore[no-untyped-def]
    from sqlproxy.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        err.print(f"[red]invalid configuration in {path}:[/red]", highlight=False)
        for p in e.problems:
            err.print(f"  - {p}", highlight=False, markup=False)
        raise typer.Exit(2) from None


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"sqlproxy {__version__}")
        raise typer.Exit(0)


@app.command()
def serve(
    config: ConfigOpt,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the proxy with a configuration file (HTTP on server.http_port, default 8080)."""
    from sqlproxy.config.loader import ConfigHolder
    from sqlproxy.server import serve as run_server

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _load(config)
    if not cfg.databases:
        err.print("[red]no [databases] configured; use `sqlproxy demo` for an embedded PostgreSQL[/red]")
        raise typer.Exit(2)
    run_server(ConfigHolder(cfg, config), log_level=log_level)


@app.command()
def demo(
    state_dir: Annotated[
        Path, typer.Option(help="Where the embedded PostgreSQL, keys and audit live.")
    ] = Path("var/demo"),
    http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
) -> None:
    """Start an embedded PostgreSQL with the demo schema and run the proxy on it with demo users."""
    from sqlproxy.demo.launcher import run_demo

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(state_dir, http_port)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="The TOML file to validate.")]) -> None:
    """Validate a configuration file; every problem is reported with its key path."""
    cfg = _load(path)
    from sqlproxy.auth.users import UserDirectory
    from sqlproxy.classify.classifier import Classifier
    from sqlproxy.config.loader import ConfigError
    from sqlproxy.policy.engine import PolicyEngine

    try:
        UserDirectory(cfg, os.environ)
        PolicyEngine(cfg.policies, cfg.row_filters)
        Classifier(cfg.classification)
    except ConfigError as e:
        err.print(f"[red]invalid configuration in {path}:[/red]", highlight=False)
        for p in e.problems:
            err.print(f"  - {p}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    except ValueError as e:
        err.print(f"invalid configuration in {path}: {e}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    out.print(
        f"[green]ok[/green]: {len(cfg.databases)} database(s), {len(cfg.users)} user(s), "
        f"{len(cfg.roles)} role(s), {len(cfg.policies)} rule(s), {len(cfg.row_filters)} row filter(s)"
    )


@app.command()
def analyze(
    sql: Annotated[str, typer.Argument(help="The SQL to analyse (several statements allowed).")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Use this config's upstream catalog.")
    ] = None,
    database: Annotated[str | None, typer.Option(help="Database name from the config.")] = None,
    search_path: Annotated[str, typer.Option(help="Comma-separated search_path.")] = "public",
) -> None:
    """Print what the analyser sees in SQL: statement kinds, relations and access modes, columns,
    output lineage, functions, dangers and the fingerprint (JSON)."""
    from sqlproxy.sql.analyzer import analyze as run_analyze
    from sqlproxy.sql.catalog import Catalog
    from sqlproxy.sql.model import SqlSyntaxError

    catalog = Catalog.from_relations(())
    path = tuple(p.strip() for p in search_path.split(",") if p.strip())
    if config is not None:
        cfg = _load(config)
        name = cfg.resolve_database(database)
        if name is None:
            err.print(f"[red]unknown database {database!r}[/red]")
            raise typer.Exit(2)
        catalog = asyncio.run(_fetch_catalog(cfg.databases[name].dsn))
        path = cfg.databases[name].search_path
    try:
        a = run_analyze(sql, catalog, path)
    except SqlSyntaxError as e:
        err.print(f"[red]syntax error: {e.message} (position {e.position})[/red]", highlight=False)
        raise typer.Exit(1) from None
    doc = {
        "fingerprint": a.fingerprint,
        "normalized": a.normalized,
        "statements": [
            {
                "kind": str(st.kind),
                "category": st.category,
                "relations": [
                    {
                        "table": r.table.qualified,
                        "access": str(r.access),
                        "columns": sorted(r.columns),
                        "known": r.known,
                    }
                    for r in st.relations
                ],
                "outputs": [
                    {"name": o.name, "sources": sorted(str(s) for s in o.sources), "direct": o.direct}
                    for o in st.outputs
                ],
                "functions": sorted(st.functions),
                "dangers": sorted(st.dangers),
            }
            for st in a.statements
        ],
    }
    out.print_json(json.dumps(doc))


async def _fetch_catalog(dsn: str):  # type: ignore[no-untyped-def]
    import asyncpg

    from sqlproxy.sql.catalog import load_catalog

    conn = await asyncpg.connect(dsn)
    try:
        return await load_catalog(conn)
    finally:
        await conn.close()


@audit_app.command("verify")
def audit_verify(config: ConfigOpt) -> None:
    """Verify the audit hash chain (store and JSONL files): detects modified, deleted, inserted,
    reordered and truncated records. Exit status 1 when tampering is found."""
    from sqlproxy.audit.configured import verify_configured

    cfg = _load(config)
    report = verify_configured(cfg, os.environ)
    for line in report.summary_lines():
        out.print(line, highlight=False)
    raise typer.Exit(0 if report.ok else 1)


@app.command("hash-key")
def hash_key(
    key: Annotated[str | None, typer.Argument(help="The API key; read from stdin when omitted.")] = None,
) -> None:
    """Print the SHA-256 of an API key for users.NAME.api_key_sha256 (a new key is generated when
    stdin is empty)."""
    from sqlproxy.auth.keys import generate_api_key, hash_api_key

    if key is None:
        key = sys.stdin.readline().strip() if not sys.stdin.isatty() else ""
    if not key:
        key = generate_api_key()
        err.print(f"generated key (give it to the user, it is not stored): {key}", highlight=False)
    out.print(hash_api_key(key), highlight=False)


@app.command("hash-password")
def hash_password(
    user: Annotated[str, typer.Argument(help="The user name (needed for md5).")],
    md5: Annotated[bool, typer.Option(help="Print an md5 hash instead of a SCRAM-SHA-256 verifier.")] = False,
) -> None:
    """Print a password verifier for users.NAME.password (the password is prompted for)."""
    from sqlproxy.protocol.md5 import md5_password_hash
    from sqlproxy.protocol.scram import make_verifier

    pw = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not pw:
        err.print("[red]empty password[/red]")
        raise typer.Exit(2)
    out.print(md5_password_hash(user, pw) if md5 else make_verifier(pw), highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
