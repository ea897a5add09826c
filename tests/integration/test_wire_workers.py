"""The wire door on worker processes ([wire] workers = 2): real worker processes sharing a port
with SO_REUSEPORT, real clients (psycopg, pgbench), one audit chain sealed by the proxy's
process, lockout and reloads that reach every worker, cancels routed between workers, a killed
worker replaced."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from sqlproxy.config.loader import ConfigHolder, load_config
from sqlproxy.config.models import PolicyRule, ProxyConfig
from sqlproxy.demo.launcher import write_demo_config
from sqlproxy.runtime import Runtime
from sqlproxy.wire.listener import worker_of
from sqlproxy.wire.workers import WireWorkers
from tests.audit_checks import verify_trail
from tests.fix_wire import WireClients, run_pgbench_script


@dataclass
class Workers(WireClients):
    runtime: Runtime
    door: WireWorkers
    state: Path

    @property
    def port(self) -> int:
        return self.door.bound_port

    async def connect(self, user: str = "analyst", **kw: Any) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.dsn(user), autocommit=True, **kw)

    def audit_lines(self) -> list[dict[str, Any]]:
        files = sorted((self.state / "audit").glob("audit.jsonl*"))
        return [json.loads(line) for f in files for line in f.read_text().splitlines() if line]

    async def audited(self, marker: str, expected: int) -> list[dict[str, Any]]:
        """The audit records whose SQL holds ``marker``, once ``expected`` of them are written
        (or after 20 s)."""
        found: list[dict[str, Any]] = []

        async def written() -> bool:
            nonlocal found
            await self.runtime.audit.flush()
            found = [r for r in self.audit_lines() if marker in (r.get("sql") or "")]
            return len(found) >= expected

        await poll(written, 20)
        return found


async def poll(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Whether ``check`` came true within ``seconds`` (asked every 0.1 s): workers report
    metrics once a second and a replaced worker takes a moment to start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


WorkersFactory = Callable[..., Awaitable[Workers]]


async def _start(
    tmp: Path, demo_dsn: str, keys: dict[str, str], passwords: dict[str, str], **wire: Any
) -> Workers:
    state = tmp
    path = write_demo_config(state, demo_dsn, 0, keys, passwords)
    cfg = load_config(path)
    cfg = cfg.model_copy(
        update={"wire": cfg.wire.model_copy(update={"host": "127.0.0.1", "port": 0, "workers": 2, **wire})}
    )
    runtime = Runtime(ConfigHolder(cfg, path), env={})
    await runtime.start()
    door = WireWorkers(runtime, cfg.wire.workers, env={})
    try:
        await door.start()
    except BaseException:
        await runtime.close()
        raise
    return Workers(passwords=passwords, runtime=runtime, door=door, state=state)


async def _stop(w: Workers) -> None:
    await w.door.stop(1)
    await w.runtime.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def workers(
    demo_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
    demo_keys: dict[str, str],
    demo_passwords: dict[str, str],
) -> AsyncIterator[Workers]:
    state = tmp_path_factory.mktemp("workers")
    w = await _start(state, demo_dsn, demo_keys, demo_passwords, server_pool_size=4)
    yield w
    await _stop(w)


@pytest_asyncio.fixture(loop_scope="session")
async def workers_factory(
    demo_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
    demo_keys: dict[str, str],
    demo_passwords: dict[str, str],
) -> AsyncIterator[WorkersFactory]:
    made: list[Workers] = []

    async def make(**wire: Any) -> Workers:
        w = await _start(tmp_path_factory.mktemp("workers-f"), demo_dsn, demo_keys, demo_passwords, **wire)
        made.append(w)
        return w

    yield make
    for w in made:
        await _stop(w)


async def _spread(w: Workers, n: int = 16) -> list[psycopg.AsyncConnection[Any]]:
    """At least ``n`` connections, with at least one on each worker. The kernel picks the worker
    by a hash of the connection's addresses and ports: more connections are opened until every
    worker has one (64 in a row on one of two workers would happen once in 2**63 runs)."""
    conns: list[psycopg.AsyncConnection[Any]] = []
    seen: set[int] = set()
    while len(conns) < n or (len(seen) < w.door.count and len(conns) < 64):
        conns.append(await w.connect())
        seen.add(worker_of(conns[-1].info.backend_pid))
    assert seen == set(range(w.door.count))
    return conns


async def test_every_worker_serves_the_pipeline_and_audits_into_one_chain(workers: Workers) -> None:
    conns = await _spread(workers)
    try:
        for i, conn in enumerate(conns):
            cur = await conn.execute(f"SELECT id, email FROM customers /* spread-{i} */ ORDER BY id LIMIT 1")
            (row,) = await cur.fetchall()
            assert "***@" in row[1]  # masked for the analyst, by whichever worker
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
                await conn.execute(f"SELECT name, salary FROM employees /* spread-{i} */")
            assert "analyst-no-employees" in str(ei.value)
    finally:
        for c in conns:
            await c.close()
    n = len(conns)
    records = await workers.audited("/* spread-", 2 * n)
    assert len(records) == 2 * n
    assert sorted(r["decision"] for r in records) == ["allow"] * n + ["deny"] * n
    assert {r["door"] for r in records} == {"wire"} and {r["user"] for r in records} == {"analyst"}
    await workers.runtime.audit.flush()
    head = workers.runtime.audit.head
    key = bytes.fromhex((workers.state / "audit" / "chain.key").read_text().strip())
    await verify_trail(
        workers.state / "audit" / "audit.db", workers.state / "audit" / "audit.jsonl", key, head.seq
    )


def _wire_requests(w: Workers) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(w.runtime.metrics.render().decode()):
        if fam.name == "sqlproxy_requests":
            total += sum(s.value for s in fam.samples if s.labels.get("door") == "wire")
    return total


async def test_metrics_count_what_the_workers_served(workers: Workers) -> None:
    before = _wire_requests(workers)
    conns = await _spread(workers, 8)
    try:
        for c in conns:
            for _ in range(5):
                await c.execute("SELECT count(*) FROM orders")
    finally:
        for c in conns:
            await c.close()

    async def counted() -> bool:
        return _wire_requests(workers) >= before + 5 * len(conns)

    assert await poll(counted, 10)


async def test_a_cancel_reaches_a_client_of_another_worker(workers: Workers) -> None:
    # The kernel hands the CancelRequest's connection to either worker: repeat until one went to
    # the other worker and was passed on (each try has an even chance).
    routed = workers.door.cancels_routed
    for _ in range(40):
        conn = await workers.connect("developer")
        try:
            query = asyncio.create_task(conn.execute("SELECT count(*) FROM generate_series(1, 400000000)"))
            await asyncio.sleep(0.3)
            conn.cancel()  # psycopg sends the CancelRequest on a new connection
            with pytest.raises(psycopg.errors.QueryCanceled):
                await asyncio.wait_for(query, 20)
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        finally:
            await conn.close()
        if workers.door.cancels_routed > routed:
            break
    assert workers.door.cancels_routed > routed


async def test_a_reload_reaches_every_worker(workers: Workers) -> None:
    holder = workers.runtime.config
    old = holder.current
    block = PolicyRule(name="reload-blocks-customers", users=["analyst"], table="customers", action="block")
    new = old.model_copy(update={"policies": (*old.policies, block)})
    holder.replace(new)
    try:
        conns = await _spread(workers)
        try:
            for conn in conns:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
                    await conn.execute("SELECT id FROM customers LIMIT 1")
                assert "reload-blocks-customers" in str(ei.value)
        finally:
            for c in conns:
                await c.close()
    finally:
        holder.replace(old)
    conns = await _spread(workers)
    try:
        for conn in conns:
            await conn.execute("SELECT id FROM customers LIMIT 1")
    finally:
        for c in conns:
            await c.close()


async def test_pgbench_through_the_workers(workers: Workers) -> None:
    script = "\\set aid random(1, 10)\nSELECT id, total FROM orders /* pgbench-w */ WHERE id = :aid;\n"
    await run_pgbench_script(workers.env("admin"), script, clients=8, transactions=50)
    # Prepared mode parses once per connection: 400 executions each mode, one record each.
    records = await workers.audited("/* pgbench-w */", 1200)
    assert len(records) == 1200


async def test_garbage_is_refused_and_the_workers_go_on(workers: Workers) -> None:
    for payload in (b"\x00\x00\x00\x08\x12\x34\x56\x78", b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 64):
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", workers.door.bound_port)
            writer.write(payload)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)  # the worker answers and closes
            assert data == b"" or data[:1] == b"E"
            writer.close()
    conns = await _spread(workers)
    for c in conns:
        await c.close()
    assert all(w.process.returncode is None for w in workers.door.workers.values())


async def test_copy_out_through_the_workers_is_masked_and_audited(workers: Workers) -> None:
    conns = await _spread(workers, 6)
    try:
        for i, conn in enumerate(conns):
            out = bytearray()
            async with conn.cursor().copy(
                f"COPY (SELECT id, email FROM customers /* copy-w{i} */ ORDER BY id) TO STDOUT"
            ) as cp:
                async for chunk in cp:
                    out += chunk
            lines = bytes(out).decode().splitlines()
            assert lines and all("***@" in line for line in lines)
    finally:
        for c in conns:
            await c.close()
    records = await workers.audited("/* copy-w", len(conns))
    assert len(records) == len(conns) and all(r["extra"]["copy"]["direction"] == "out" for r in records)


async def test_a_worker_cut_off_from_the_proxy_stops(workers: Workers) -> None:
    # As when the proxy's process is killed: the worker must not keep the port and its server
    # connections. It stops as if told to, and (here, the proxy being alive) is replaced.
    old = workers.door.workers[0]
    old.channel.close()
    code = await asyncio.wait_for(old.process.wait(), 30)
    assert code == 0

    async def replaced() -> bool:
        return workers.door.workers[0] is not old

    assert await poll(replaced, 30)
    conns = await _spread(workers)
    for c in conns:
        await c.close()


async def test_a_killed_worker_is_replaced_and_the_other_goes_on(workers: Workers) -> None:
    conns = await _spread(workers)
    victim = workers.door.workers[1]
    survivors = [c for c in conns if worker_of(c.info.backend_pid) == 0]
    try:
        os.kill(victim.pid, signal.SIGKILL)

        async def replaced() -> bool:
            return workers.door.workers[1] is not victim

        assert await poll(replaced, 30) and workers.door.restarts >= 1
        status = workers.door.status()
        assert status["running"] == 2 and status["restarts"] == workers.door.restarts
        for c in survivors:  # clients of the other worker never noticed
            cur = await c.execute("SELECT count(*) FROM orders")
            assert (await cur.fetchone()) is not None
    finally:
        for c in conns:
            await c.close()
    again = await _spread(workers)  # the new worker takes clients on the same port
    for c in again:
        await c.close()


async def test_lockout_counts_failures_over_all_workers(workers_factory: WorkersFactory) -> None:
    w = await workers_factory()
    threshold = w.runtime.config.current.auth.lockout_threshold
    # One failure per connection: the kernel spreads them, and no worker alone sees `threshold`
    # of them (unless all land on one, which only makes the lock local, and the next check
    # still needs it on every worker).
    for _ in range(threshold):
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(w.dsn("developer", password="wrong"))
    # The proxy's process counted all of them and told every worker: the right password is
    # refused now, whichever worker takes the connection.
    for _ in range(12):
        with pytest.raises(psycopg.OperationalError) as ei:
            await psycopg.AsyncConnection.connect(w.dsn("developer"))
        assert "password authentication failed" in str(ei.value)
    lockout = w.runtime.users.lockout
    assert lockout.locked("user:developer") and lockout.locked("ip:127.0.0.1")


async def test_stop_writes_every_record_and_the_chain_verifies(workers_factory: WorkersFactory) -> None:
    w = await workers_factory()
    conns = await _spread(w, 8)
    for i, c in enumerate(conns):
        for j in range(25):
            await c.execute(f"SELECT id FROM customers /* last-{i}-{j} */ LIMIT 1")
    await _stop(w)
    for c in conns:
        await c.close()
    assert all(x.process.returncode is not None for x in w.door.workers.values())
    assert len([r for r in w.audit_lines() if "/* last-" in (r.get("sql") or "")]) == 25 * len(conns)
    key = bytes.fromhex((w.state / "audit" / "chain.key").read_text().strip())
    store = w.state / "audit" / "audit.db"
    await verify_trail(store, w.state / "audit" / "audit.jsonl", key, len(w.audit_lines()))


async def test_a_port_taken_by_another_program_fails_the_start_cleanly(
    workers_factory: WorkersFactory,
) -> None:
    import socket

    from sqlproxy.wire.workers import WorkerStartError

    before = _my_worker_processes()  # the module's own workers
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the workers cannot join it
    taken.listen()
    try:
        with pytest.raises(WorkerStartError) as ei:
            await workers_factory(port=taken.getsockname()[1])
        assert "could not start" in str(ei.value) and "in use" in str(ei.value)
    finally:
        taken.close()
    assert _my_worker_processes() == before  # the first worker exited, the second never started


def _my_worker_processes() -> list[int]:
    """Worker processes (not yet reaped included) whose parent is this test process."""
    found = []
    for pid in _children(os.getpid()):
        try:
            if b"sqlproxy.wire.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


async def test_tls_on_every_worker_and_a_broken_reload_reaches_none(
    workers_factory: WorkersFactory, tmp_path: Path
) -> None:
    from sqlproxy.config.loader import ConfigError
    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    w = await workers_factory(tls_cert=str(pki.cert), tls_key=str(pki.key), require_tls=True)
    tls = {"sslmode": "verify-full", "sslrootcert": str(pki.ca), "host": "localhost"}
    conns: list[psycopg.AsyncConnection[Any]] = []
    seen: set[int] = set()
    while len(seen) < 2 and len(conns) < 64:
        conns.append(await psycopg.AsyncConnection.connect(w.dsn(**tls), autocommit=True))
        seen.add(worker_of(conns[-1].info.backend_pid))
    try:
        assert seen == {0, 1} and all(c.pgconn.ssl_in_use for c in conns)
        # Checked in the proxy's process, which serves no wire client itself: refused there,
        # so no worker ever gets it.
        holder = w.runtime.config
        broken = holder.current.model_copy(
            update={"wire": holder.current.wire.model_copy(update={"tls_key": str(tmp_path / "none.key")})}
        )
        with pytest.raises(ConfigError) as ei:
            holder.replace(broken)
        assert "wire.tls_key" in str(ei.value)
        for _ in range(8):
            c = await psycopg.AsyncConnection.connect(w.dsn(**tls), autocommit=True)
            assert c.pgconn.ssl_in_use
            await c.close()
    finally:
        for c in conns:
            await c.close()


def test_workers_setting_is_checked(tmp_path: Path) -> None:
    from sqlproxy.config.loader import ConfigError

    base = ProxyConfig.model_validate({"databases": {"d": {"dsn": "postgresql://x@127.0.0.1/d"}}})
    assert base.wire.workers == 1
    for bad in (0, 65):
        p = tmp_path / "c.toml"
        p.write_text(f'[databases.d]\ndsn = "postgresql://x@127.0.0.1/d"\n[wire]\nworkers = {bad}\n')
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        assert "wire.workers" in str(ei.value)


def _children(pid: int) -> set[int]:
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.add(int(d.name))
    return found


def test_serve_with_workers_reloads_on_sighup_and_stops_on_sigterm(
    demo_dsn: str, tmp_path: Path, demo_keys: dict[str, str], demo_passwords: dict[str, str]
) -> None:
    """`sqlproxy serve` as a user runs it, with [wire] workers = 2: SIGHUP reaches the workers,
    SIGTERM stops them all, and the trail they fed verifies."""
    import subprocess
    import sys
    import time

    from sqlproxy.embedded._process import free_port

    wire_port, http_port = free_port(), free_port()
    cfg = write_demo_config(tmp_path, demo_dsn, http_port, demo_keys, demo_passwords)
    cfg.write_text(cfg.read_text() + f'\n[wire]\nhost = "127.0.0.1"\nport = {wire_port}\nworkers = 2\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlproxy", "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    dsn = (
        f"host=127.0.0.1 port={wire_port} dbname=demo user=analyst "
        f"password={demo_passwords['analyst']} sslmode=disable connect_timeout=5"
    )

    def employees() -> str:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                conn.execute("SELECT name FROM employees LIMIT 1")
                return "allowed"
            except psycopg.errors.InsufficientPrivilege:
                return "denied"

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                first = employees()
                break
            except psycopg.OperationalError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the wire door did not come up"
                time.sleep(0.2)
        assert first == "denied"
        # /health says how many workers run once the proxy has started them all.
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).json()
                if health.get("wire", {}).get("running") == 2:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the proxy did not report its workers"
            time.sleep(0.2)
        assert health["wire"]["workers"] == 2 and health["wire"]["restarts"] == 0
        workers = _children(proc.pid)
        assert len(workers) >= 2  # the two workers (and the audit writer process)
        text = cfg.read_text()
        cfg.write_text(
            text.replace('table = "employees"\naction = "block"', 'table = "employees"\naction = "allow"')
        )
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        allowed = 0
        while allowed < 16:  # 16 new connections in a row: the kernel spread them over both
            if employees() == "allowed":
                allowed += 1
            else:
                allowed = 0
                assert time.monotonic() < deadline, "SIGHUP did not reach the workers"
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert not [p for p in workers if Path(f"/proc/{p}").exists()], "a worker outlived the proxy"
    r = subprocess.run(
        [sys.executable, "-m", "sqlproxy", "audit", "verify", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and ": ok" in r.stdout, r.stdout + r.stderr
