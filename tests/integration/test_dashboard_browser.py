"""The dashboard in a real browser: Debian's headless Chromium driven by playwright-core from Node
(tests/browser/dashboard.test.mjs) against the live proxy, while this test sends the traffic.

The two sides step together over the script's stdin and stdout (one JSON line per step), so
nothing waits on a clock: the script waits for conditions on the page, each bounded by its
timeout, and this test waits for the script's lines.

Needs /usr/bin/chromium and node/npm (scripts/sysdeps.sh installs them); the npm package is
installed from tests/browser/package-lock.json on first use, without any browser download.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fix_stream import LiveProxy

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
SCRIPT = BROWSER_DIR / "dashboard.test.mjs"
CHROMIUM = os.environ.get("SQLPROXY_TEST_CHROMIUM", "/usr/bin/chromium")
# Bounds, not synchronisation: a step that takes longer than this has hung.
STEP_TIMEOUT_S = 120.0
EMPTY = "\N{EN DASH}"  # what the page shows for a figure it has not received


@pytest.fixture(scope="session")
def browser_env() -> dict[str, str]:
    """The environment for the node script, after making sure playwright-core is installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None or not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs node, npm and {CHROMIUM}: run scripts/sysdeps.sh")
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "CHROMIUM": CHROMIUM}
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=BROWSER_DIR,
            env=env,
            check=True,
            timeout=600,
        )
    return env


async def _line(proc: asyncio.subprocess.Process, stderr_path: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT_S)
    if not raw:
        await proc.wait()
        raise AssertionError(f"the browser script ended (exit {proc.returncode}): {stderr_path.read_text()}")
    msg: dict[str, Any] = json.loads(raw)
    if msg.get("event") == "failed":
        raise AssertionError(f"the browser script failed: {msg['error']}\n{stderr_path.read_text()}")
    return msg


def _shots_dir() -> Path:
    shots = Path(os.environ.get("SQLPROXY_TEST_SHOTS") or tempfile.mkdtemp(prefix="sqlproxy-dashboard-"))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


async def run_page(
    env: dict[str, str], shots: Path, act: Callable[[dict[str, Any]], Awaitable[None]]
) -> dict[str, Any]:
    """Runs the browser script; ``act`` runs between its "ready" and the "go" it waits for.
    Returns the facts of its "done" line."""
    stderr_path = shots / f"node-stderr-{env['SQLPROXY_SCENARIO']}.txt"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(SCRIPT),
            cwd=BROWSER_DIR,
            env={**env, "SQLPROXY_SHOTS": str(shots)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        try:
            ready = await _line(proc, stderr_path)
            assert ready["event"] == "ready", ready
            await act(ready)
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            done = await _line(proc, stderr_path)
            assert done["event"] == "done", done
            assert await asyncio.wait_for(proc.wait(), STEP_TIMEOUT_S) == 0
        finally:
            if proc.returncode is None:
                # SIGTERM first: playwright closes the browser it launched on it; SIGKILL would
                # leave Chromium behind.
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    # Whatever the scenario: the key stays out of every URL, the page stays on its origin, and
    # no script error or CSP violation happened.
    assert done["keyInUrls"] == 0
    assert done["foreignRequests"] == []
    assert done["errors"] == [], done["errors"]
    return done


async def test_dashboard_in_chromium_follows_live_traffic_and_filters_the_audit_tail(
    live: LiveProxy, browser_env: dict[str, str]
) -> None:
    mark = f"m_{secrets.token_hex(4)}"
    shots = _shots_dir()
    env = {
        **browser_env,
        "SQLPROXY_SCENARIO": "operator",
        "SQLPROXY_URL": live.base_url,
        "SQLPROXY_KEY": live.keys["admin"],
        "SQLPROXY_MARK": mark,
    }

    async def traffic(ready: dict[str, Any]) -> None:
        """The traffic the page must show while it is open."""
        for _ in range(3):
            r = await live.query("developer", f"SELECT id AS {mark} FROM orders LIMIT 1")
            assert r.status_code == 200, r.text
        # The auditor's budget is 20/s with a burst of 50: spend it until a request is refused.
        limited = 0
        for _ in range(40):
            batch = await asyncio.gather(
                *(live.query("auditor", "SELECT total FROM orders LIMIT 1") for _ in range(10))
            )
            assert {b.status_code for b in batch} <= {200, 429}
            limited = sum(b.status_code == 429 for b in batch)
            if limited:
                break
        assert limited, "the auditor was never rate limited"
        # Last, so the denied panel (the 20 newest) still holds it.
        r = await live.query("analyst", f"SELECT salary AS {mark} FROM employees")
        assert r.status_code == 403, r.text

    done = await run_page(env, shots, traffic)

    # Login as the page documents it: the key stays in session storage, the field is emptied.
    assert done["loginDocumented"] and done["keyInStorage"] and done["keyFieldCleared"]
    # Live numbers moved with the traffic.
    assert done["total1"] >= done["total0"] + 5
    assert done["metricsUpdates"] >= 1
    assert done["p50"] not in ("", EMPTY) and done["p99"] not in ("", EMPTY)
    assert "developer" in done["topUsers"] and "auditor" in done["topUsers"]
    assert "public.orders" in done["topTables"]
    assert {"user": "analyst", "rule": "analyst-no-employees"} in done["denied"]
    assert "user:developer" in done["rateLimits"] and "user:auditor" in done["rateLimits"]
    assert done["rateLimitRejected"].startswith("user ")
    assert done["auditorRefilled"] is True
    # The unfiltered tail mixes users and decisions; each filter leaves only what matches.
    assert {"allow", "deny", "rate_limited"} <= set(done["unfilteredDecisions"])
    assert {"developer", "analyst", "auditor"} <= set(done["unfilteredUsers"])
    deny = done["denyFilter"]
    assert deny["rows"] >= 1 and deny["decisions"] == ["deny"]
    assert deny["marked"] == ["analyst"]
    assert json.loads(deny["filtersShown"]) == {"decision": "deny"}
    dev = done["userFilter"]
    assert dev["users"] == ["developer"]
    assert dev["marked"] == ["allow", "allow", "allow"]
    for name in ("dashboard.png", "dashboard-filtered.png"):
        png = (shots / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


async def test_dashboard_refuses_a_bad_key_and_scopes_a_plain_user_to_their_own_records(
    live: LiveProxy, browser_env: dict[str, str]
) -> None:
    mark = f"m_{secrets.token_hex(4)}"
    env = {
        **browser_env,
        "SQLPROXY_SCENARIO": "scoped",
        "SQLPROXY_URL": live.base_url,
        "SQLPROXY_KEY": live.keys["developer"],
        "SQLPROXY_MARK": mark,
    }

    async def traffic(ready: dict[str, Any]) -> None:
        # Someone else's first, the page's user's last (see the scenario).
        r = await live.query("analyst", f"SELECT id AS {mark} FROM customers LIMIT 1")
        assert r.status_code == 200, r.text
        r = await live.query("developer", f"SELECT id AS {mark} FROM orders LIMIT 1")
        assert r.status_code == 200, r.text

    done = await run_page(env, _shots_dir(), traffic)
    assert "refused" in done["wrongKeyError"]
    assert done["wrongKeyLoginShown"] and done["wrongKeyForgotten"]
    assert done["who"].startswith("developer @") and "audit: own" in done["who"]
    assert done["metricsShown"] is False and done["metricsNotice"] is True
    assert done["userFilter"] == {"value": "developer", "disabled": True}
    assert done["users"] == ["developer"]
    assert done["marked"] == ["developer"]
    assert done["loggedOutForgotten"] and done["loggedOutStatus"] == "disconnected"
