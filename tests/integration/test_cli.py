"""The `sqlproxy` command as a user runs it: help, config check with key paths, analyze, hashing,
and `serve` answering HTTP, reloading on SIGHUP and shutting down cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sqlproxy.auth.keys import generate_api_key, hash_api_key
from sqlproxy.demo.launcher import DEMO_USERS, write_demo_config
from sqlproxy.embedded._process import free_port


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlproxy", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        check=False,
    )


def test_help_explains_itself() -> None:
    r = run("--help")
    assert r.returncode == 0
    for word in ["serve", "demo", "config", "analyze", "audit", "hash-key", "hash-password", "policies"]:
        assert word in r.stdout
    assert run("--version").stdout.startswith("sqlproxy ")


def test_config_check_names_key_path_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[databases.app]\ndsn = "mysql://x"\n[users.bob]\nroles = ["ghost"]\napi_key_sha256 = "xyz"\n'
        '[[policies]]\nname = "p"\nusers = ["*"]\naction = "alow"\n'
    )
    r = run("config", "check", str(bad))
    assert r.returncode == 2
    assert "databases.app.dsn: must be a postgresql:// URL" in r.stderr
    assert "users.bob.api_key_sha256" in r.stderr
    assert "policies.0.action" in r.stderr
    r = run("config", "check", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read file" in r.stderr
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[server\n")
    r = run("config", "check", str(syntax))
    assert r.returncode == 2 and "TOML syntax error" in r.stderr


def test_config_check_accepts_the_demo(tmp_path: Path) -> None:
    keys = {u: generate_api_key() for u in DEMO_USERS}
    cfg = write_demo_config(tmp_path, "postgresql://u:p@127.0.0.1:5/db", 8080, keys)
    r = run("config", "check", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "4 user(s)" in r.stdout


def test_analyze_prints_the_analysis() -> None:
    r = run("analyze", "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d; SET search_path = x")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    kinds = [s["kind"] for s in doc["statements"]]
    assert kinds == ["select", "set"]
    assert {"table": "public.t", "access": "delete", "columns": [], "known": False} in doc["statements"][0][
        "relations"
    ]
    r = run("analyze", "SELEC 1")
    assert r.returncode == 1 and "syntax error" in r.stderr


def test_hash_key_and_password() -> None:
    r = run("hash-key", "sqp_example")
    assert r.stdout.strip() == hash_api_key("sqp_example")
    r = run("hash-password", "alice", stdin="pencil\n")
    assert r.returncode == 0 and r.stdout.startswith("SCRAM-SHA-256$4096:")
    r = run("hash-password", "alice", "--md5", stdin="pencil\n")
    assert r.stdout.strip().startswith("md5") and len(r.stdout.strip()) == 35


def test_serve_reloads_on_sighup_and_stops_on_sigterm(demo_dsn: str, tmp_path: Path) -> None:
    keys = {u: generate_api_key() for u in DEMO_USERS}
    port = free_port()
    cfg = write_demo_config(tmp_path, demo_dsn, port, keys)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    h = {"Authorization": f"Bearer {keys['analyst']}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "proxy did not come up"
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        r = httpx.post(f"{base}/api/v1/query", json={"sql": "SELECT name FROM employees"}, headers=h)
        assert r.status_code == 403
        wire = httpx.get(f"{base}/health").json()["wire"]
        assert wire["workers"] == 1 and wire["running"] == 1 and wire["clients"] == 0
        text = cfg.read_text()
        cfg.write_text(
            text.replace('table = "employees"\naction = "block"', 'table = "employees"\naction = "allow"')
        )
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(f"{base}/api/v1/query", json={"sql": "SELECT name FROM employees"}, headers=h)
            if r.status_code == 200:
                break
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
        # A broken file on SIGHUP is refused; the proxy keeps serving the last good config.
        cfg.write_text("this is not toml [")
        os.kill(proc.pid, signal.SIGHUP)
        r = httpx.post(f"{base}/api/v1/query", json={"sql": "SELECT name FROM employees LIMIT 1"}, headers=h)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn re-raises the signal it caught once shutdown is complete.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "reload refused" in out
    assert keys["analyst"] not in out
