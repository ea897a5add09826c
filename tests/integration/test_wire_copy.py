"""COPY through the wire door: psql \\copy, psycopg 3 (text and binary, both directions, simple
and extended protocol), asyncpg, a 1,000,000-row streamed load, errors midway, CopyFail, clients
that vanish mid-COPY, policy denials, masks and row filters on exports, backpressure, and the
audit record each COPY leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio
from psycopg import pq

from sqlproxy.audit.record import AuditRecord
from sqlproxy.protocol.messages import CopyInResponse, DataRow, ReadyForQuery
from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireHarness, run_psql
from tests.raw_wire import RawClient, errors, frame, query

# "order*" tables: the developer may read and insert them (demo policy developer-orders).
T = "order_copy_t"
BULK = "order_copy_bulk"


async def _admin(wire: WireHarness, sql: str) -> None:
    async with await psycopg.AsyncConnection.connect(wire.dsn("admin"), autocommit=True) as conn:
        await conn.execute(sql)


@pytest_asyncio.fixture(loop_scope="session")
async def tables(wire: WireHarness) -> AsyncIterator[None]:
    await _admin(
        wire,
        f"DROP TABLE IF EXISTS {T}, {BULK};"
        f"CREATE TABLE {T} (id int PRIMARY KEY, note text NOT NULL,"
        " amount numeric(10,2) CHECK (amount >= 0));"
        f"CREATE TABLE {BULK} (id int NOT NULL, note text NOT NULL)",
    )
    yield
    await _admin(wire, f"DROP TABLE IF EXISTS {T}, {BULK}")


async def _count(wire: WireHarness, table: str, user: str = "developer") -> int:
    async with await psycopg.AsyncConnection.connect(wire.dsn(user), autocommit=True) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def _seq(proxy: ProxyHarness) -> int:
    await proxy.runtime.audit.flush()
    return proxy.runtime.audit.written_seq


async def _copy_records(proxy: ProxyHarness, after: int, user: str) -> list[AuditRecord]:
    rt = proxy.runtime
    await rt.audit.flush()
    assert rt.audit.store is not None
    recs = await rt.audit.store.query(user=user, after_seq=after, limit=1000)
    return [r for r in recs if "copy" in r.statement_kinds]


async def _one_copy(proxy: ProxyHarness, after: int, user: str) -> AuditRecord:
    recs = await _copy_records(proxy, after, user)
    assert len(recs) == 1, [r.sql for r in recs]
    return recs[0]


def _shape(r: AuditRecord) -> tuple[str, str, int | None]:
    c = r.extra["copy"]
    return c["direction"], c["format"], c["rows"]


async def _until(cond: Callable[[], bool], what: str) -> None:
    """Wait for a condition the proxy reaches on its own (e.g. a pool slot coming back)."""
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def _usable(conn: psycopg.AsyncConnection[Any]) -> None:
    cur = await conn.execute("SELECT 41 + 1")
    assert (await cur.fetchone()) == (42,)


# -- psql ---------------------------------------------------------------------------------------


async def test_psql_backslash_copy_both_ways(wire: WireHarness, proxy: ProxyHarness, tables: None) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in.csv")
        with open(src, "w") as f:
            f.writelines(f"{i},psql {i},{i}.50\n" for i in range(1, 501))
        dst = os.path.join(d, "out.csv")
        start = await _seq(proxy)
        code, out, err = await run_psql(
            wire,
            f"\\copy {T} (id, note, amount) from '{src}' with (format csv)\n"
            f"\\copy (SELECT id, note FROM {T} ORDER BY id) to '{dst}' with (format csv)\n",
            "developer",
        )
        assert code == 0, err
        assert "COPY 500" in out
        with open(dst) as f:
            lines = f.read().splitlines()
        assert len(lines) == 500 and lines[0] == "1,psql 1" and lines[-1] == "500,psql 500"
    recs = await _copy_records(proxy, start, "developer")
    assert [r.extra["copy"]["direction"] for r in recs] == ["in", "out"]
    assert recs[0].extra["copy"]["table"] == f"public.{T}"
    assert recs[0].extra["copy"]["columns"] == ["id", "note", "amount"]
    assert recs[0].extra["copy"]["format"] == "csv"
    assert [r.extra["copy"]["rows"] for r in recs] == [500, 500]
    assert recs[1].extra["copy"]["bytes"] == sum(len(line) + 1 for line in lines)
    # The analyst's export through psql: masked and filtered at the source.
    code, out, err = await run_psql(wire, "\\copy customers (id, email, region) to stdout\n")
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert rows and {r[2] for r in rows} == {"eu"}
    assert all("***" in r[1] for r in rows)


# -- psycopg 3, simple protocol -----------------------------------------------------------------


async def test_psycopg_text_and_binary_both_directions(
    wire: WireHarness, proxy: ProxyHarness, tables: None
) -> None:
    start = await _seq(proxy)
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy(f"COPY {T} (id, note, amount) FROM STDIN") as cp:
            for i in range(1, 1001):
                await cp.write_row((i, f"text\t{i}", i))
        assert cur.rowcount == 1000
        async with cur.copy(f"COPY {T} (id, note, amount) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            for i in range(1001, 2001):
                await cp.write_row((i, f"binary {i}", i))
        assert cur.rowcount == 1000
        got: list[tuple[Any, ...]] = []
        async with cur.copy(f"COPY {T} (id, note) TO STDOUT (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text"])
            async for row in cp.rows():
                got.append(row)
        assert len(got) == 2000
        assert (1, "text\t1") in got and (2000, "binary 2000") in got
        text = bytearray()
        async with cur.copy(f"COPY (SELECT id, note FROM {T} WHERE id <= 3 ORDER BY id) TO STDOUT") as cp:
            async for chunk in cp:
                text += chunk
        assert bytes(text) == b"1\ttext\\t1\n2\ttext\\t2\n3\ttext\\t3\n"
        await _usable(conn)
    recs = await _copy_records(proxy, start, "developer")
    assert [_shape(r) for r in recs] == [
        ("in", "text", 1000),
        ("in", "binary", 1000),
        ("out", "binary", 2000),
        ("out", "text", 3),
    ]
    assert recs[3].extra["copy"]["bytes"] == len(text)
    assert recs[3].extra["copy"]["table"] is None and recs[3].extra["copy"]["query"] is True
    assert all(r.decision == "allow" and r.rows == r.extra["copy"]["rows"] for r in recs)
    assert recs[0].relations == [
        {"table": f"public.{T}", "access": "insert", "columns": ["amount", "id", "note"]}
    ]


# -- extended protocol (PQsendQueryParams: Parse/Bind/Describe/Execute/Sync) ----------------------


# libpq blocks in its calls (and psycopg's C binding keeps the GIL there), so the extended-
# protocol client runs in its own process; it prints what it saw as JSON.
_EXTENDED_CLIENT = r"""
import json, sys
from psycopg import pq

T = sys.argv[2]
pg = pq.PGconn.connect(sys.argv[1].encode())
assert pg.status == pq.ConnStatus.OK, pg.error_message
out = {}
pg.send_query_params(f"COPY {T} (id, note) FROM STDIN (FORMAT csv)".encode(), None)
res = pg.get_result()
assert res is not None and res.status == pq.ExecStatus.COPY_IN, pg.error_message
for i in range(5001, 5101):
    assert pg.put_copy_data(f"{i},ext {i}\n".encode()) == 1
assert pg.put_copy_end() == 1
res = pg.get_result()
out["in"] = [pq.ExecStatus(res.status).name, res.command_status.decode()]
assert pg.get_result() is None
pg.send_query_params(f"COPY (SELECT id FROM {T} WHERE id > 5000 ORDER BY id) TO STDOUT".encode(), None)
res = pg.get_result()
assert res is not None and res.status == pq.ExecStatus.COPY_OUT, pg.error_message
data = bytearray()
while True:
    n, chunk = pg.get_copy_data(0)
    if n < 0:
        break
    data += chunk
res = pg.get_result()
out["out"] = [pq.ExecStatus(res.status).name, res.command_status.decode(), data.decode()]
assert pg.get_result() is None
# An error midway: a duplicate key at the 50th row.
pg.send_query_params(f"COPY {T} (id, note) FROM STDIN (FORMAT csv)".encode(), None)
res = pg.get_result()
assert res is not None and res.status == pq.ExecStatus.COPY_IN
for i in range(6001, 6050):
    pg.put_copy_data(f"{i},x\n".encode())
pg.put_copy_data(b"5001,dup\n")
for i in range(6051, 6100):
    pg.put_copy_data(f"{i},x\n".encode())
pg.put_copy_end()
res = pg.get_result()
out["dup"] = [pq.ExecStatus(res.status).name, (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()]
while pg.get_result() is not None:
    pass
res = pg.exec_(b"SELECT 7")
out["after"] = [pq.ExecStatus(res.status).name, res.get_value(0, 0).decode()]
pg.finish()
print(json.dumps(out))
"""


async def _extended_copy_session(dsn: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _EXTENDED_CLIENT,
        dsn,
        T,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_extended_protocol_copy_in_out_and_error(
    wire: WireHarness, proxy: ProxyHarness, tables: None
) -> None:
    start = await _seq(proxy)
    got = await _extended_copy_session(wire.dsn("developer"))
    assert got["in"] == ["COMMAND_OK", "COPY 100"]
    status, tag, data = got["out"]
    assert (status, tag) == ("COMMAND_OK", "COPY 100")
    assert data == "".join(f"{i}\n" for i in range(5001, 5101))
    assert got["dup"] == ["FATAL_ERROR", "23505"]
    assert got["after"] == ["TUPLES_OK", "7"]
    assert await _count(wire, f"{T} WHERE id > 6000") == 0
    recs = await _copy_records(proxy, start, "developer")
    assert [(r.extra["copy"]["direction"], r.extra["copy"]["rows"]) for r in recs] == [
        ("in", 100),
        ("out", 100),
        ("in", None),
    ]
    assert all(r.extra.get("protocol") == "extended" for r in recs)
    assert recs[1].extra["copy"]["bytes"] == len(data)
    assert recs[2].sqlstate == "23505" and recs[2].extra["copy"]["error"]["sqlstate"] == "23505"


# -- asyncpg ------------------------------------------------------------------------------------


async def test_asyncpg_copy_records_and_copy_from_query(
    wire: WireHarness, proxy: ProxyHarness, tables: None
) -> None:
    start = await _seq(proxy)
    conn = await asyncpg.connect(wire.url("developer"))
    try:
        res = await conn.copy_records_to_table(
            T, records=[(i, f"apg {i}", i / 4) for i in range(7001, 8001)], columns=["id", "note", "amount"]
        )
        assert res == "COPY 1000"
        chunks: list[bytes] = []

        async def sink(b: bytes) -> None:
            chunks.append(b)

        res = await conn.copy_from_query(
            f"SELECT id, note FROM {T} WHERE id BETWEEN 7001 AND 8000 ORDER BY id", output=sink, format="csv"
        )
        assert res == "COPY 1000"
        lines = b"".join(chunks).decode().splitlines()
        assert lines[0] == "7001,apg 7001" and len(lines) == 1000
        assert await conn.fetchval("SELECT 5") == 5
    finally:
        await conn.close()
    # The analyst's export through asyncpg: masked and filtered.
    conn = await asyncpg.connect(wire.url("analyst"))
    try:
        out: list[bytes] = []

        async def sink2(b: bytes) -> None:
            out.append(b)

        await conn.copy_from_table("customers", columns=["email", "region"], output=sink2)
        rows = [line.split("\t") for line in b"".join(out).decode().splitlines()]
        assert rows and all("***" in e and r == "eu" for e, r in rows)
    finally:
        await conn.close()
    recs = await _copy_records(proxy, start, "developer")
    assert [_shape(r) for r in recs] == [
        ("in", "binary", 1000),
        ("out", "csv", 1000),
    ]


# -- a million rows, streamed -------------------------------------------------------------------


async def test_million_row_load_streams(wire: WireHarness, proxy: ProxyHarness, tables: None) -> None:
    n = 1_000_000
    batch = 20_000
    start = await _seq(proxy)
    sent = 0
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy(f"COPY {BULK} (id, note) FROM STDIN") as cp:
            for lo in range(0, n, batch):
                chunk = "".join(f"{i}\trow {i}\n" for i in range(lo, lo + batch)).encode()
                sent += len(chunk)
                await cp.write(chunk)
        assert cur.rowcount == n
        await _usable(conn)
    assert await _count(wire, BULK) == n
    rec = await _one_copy(proxy, start, "developer")
    assert rec.extra["copy"]["rows"] == n and rec.rows == n
    assert rec.extra["copy"]["bytes"] == sent
    assert rec.extra["copy"]["direction"] == "in" and rec.extra["copy"]["table"] == f"public.{BULK}"
    # And out again, through the pump, counted.
    received = 0
    start = await _seq(proxy)
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy(f"COPY {BULK} TO STDOUT") as cp:
            async for part in cp:
                received += len(part)
        assert cur.rowcount == n
    assert received == sent
    rec = await _one_copy(proxy, start, "developer")
    assert rec.extra["copy"]["rows"] == n and rec.extra["copy"]["bytes"] == sent


async def test_export_backpressure_pauses_the_server(wire: WireHarness, proxy: ProxyHarness) -> None:
    """A client that stops reading a large export: the proxy stops reading the server instead of
    buffering the export; then the client reads on and gets every row."""
    n = 300_000
    sql = f"COPY (SELECT g, repeat('x', 200) FROM generate_series(1, {n}) g) TO STDOUT"
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        cur = conn.cursor()
        rows = 0
        async with cur.copy(sql) as cp:
            it = cp.__aiter__()
            first = await it.__anext__()
            rows += bytes(first).count(b"\n")
            pid = conn.info.backend_pid  # the proxy's own key, used to find the session
            sessions = [s for s in wire.server.sessions if s.key[0] == pid]
            assert len(sessions) == 1
            s = sessions[0]

            def paused() -> bool:
                be = s.be
                return be is not None and be.transport is not None and not be.transport.is_reading()

            await _until(paused, "the proxy pauses reading the server while the client does not read")
            assert s.be is not None and s.transport is not None
            # What the proxy holds is bounded by the transports' buffer limits, not by the export.
            held = s.transport.get_write_buffer_size() + s.be.decoder.buffered
            assert held < 4 * 1024 * 1024 < n * 200
            async for chunk in it:
                rows += bytes(chunk).count(b"\n")
        assert rows == n and cur.rowcount == n
    # Whenever the last pause happened, server connections back in the pool read again.
    await _until(lambda: wire.backends_in_use() == 0, "the export's server connection goes back")
    for pool in wire.server.pools.values():
        assert all(be.transport is not None and be.transport.is_reading() for be in pool.idle)


async def test_server_connection_changing_hands_reads_again(wire: WireHarness) -> None:
    """A session pauses its server connection while its client's socket is full (the end of a
    large COPY TO STDOUT can leave it so); the next user of that connection must not inherit
    the pause, or it waits forever."""
    pool = wire.server.pool_for("demo")
    be = await pool.acquire()
    assert be.transport is not None
    be.pause_reading()  # what WireSession.pause_writing does
    assert not be.transport.is_reading()
    pool.release(be)
    assert be.transport.is_reading()
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        await _usable(conn)


async def test_load_backpressure_pauses_the_client(
    wire: WireHarness, proxy: ProxyHarness, demo_dsn: str
) -> None:
    """A server that stops consuming a load (a trigger waits on a lock held elsewhere): the
    proxy stops reading the client instead of buffering the load; released, every row lands."""
    slow = "order_copy_slow"
    await _admin(
        wire, f"DROP TABLE IF EXISTS {slow}; CREATE TABLE {slow} (id int NOT NULL, note text NOT NULL)"
    )
    async with await psycopg.AsyncConnection.connect(demo_dsn, autocommit=True) as direct:
        # Set up directly on the server: the proxy rightly refuses CREATE FUNCTION.
        await direct.execute(
            "CREATE OR REPLACE FUNCTION order_copy_wait() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_advisory_xact_lock_shared(424242); RETURN NEW; END $$"
        )
        await direct.execute(
            f"CREATE TRIGGER order_copy_wait BEFORE INSERT ON {slow} "
            "FOR EACH ROW EXECUTE FUNCTION order_copy_wait()"
        )
        await direct.execute("SELECT pg_advisory_lock(424242)")
        n_chunks, per_chunk = 400, 200
        note = "y" * 1000
        try:
            async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
                cur = conn.cursor()
                async with cur.copy(f"COPY {slow} (id, note) FROM STDIN") as cp:
                    pid = conn.info.backend_pid
                    s = next(x for x in wire.server.sessions if x.key[0] == pid)

                    async def feed() -> None:
                        for c in range(n_chunks):
                            base = c * per_chunk
                            await cp.write("".join(f"{base + i}\t{note}\n" for i in range(per_chunk)))

                    feeder = asyncio.create_task(feed())

                    def paused() -> bool:
                        t = s.transport
                        return t is not None and not t.is_reading()

                    await _until(paused, "the proxy stops reading a client whose server does not consume")
                    assert not feeder.done()  # the client is held back, not finished
                    be = s.be
                    assert be is not None and be.transport is not None
                    held = be.transport.get_write_buffer_size() + s.dec.buffered
                    assert held < 4 * 1024 * 1024 < n_chunks * per_chunk * 1000
                    await direct.execute("SELECT pg_advisory_unlock(424242)")
                    await feeder
                assert cur.rowcount == n_chunks * per_chunk
        finally:
            await direct.execute("SELECT pg_advisory_unlock_all()")
            await direct.execute(f"DROP TABLE IF EXISTS {slow}; DROP FUNCTION IF EXISTS order_copy_wait()")


# -- errors -------------------------------------------------------------------------------------


async def test_constraint_violation_midstream(wire: WireHarness, proxy: ProxyHarness, tables: None) -> None:
    start = await _seq(proxy)
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.CheckViolation) as ei:
            async with cur.copy(f"COPY {T} (id, note, amount) FROM STDIN") as cp:
                for i in range(100_001, 300_001):
                    await cp.write_row((i, "mid", -1 if i == 200_000 else 1))
        assert ei.value.sqlstate == "23514"
        assert "order_copy_t_amount_check" in str(ei.value)
        await _usable(conn)
        # A transaction that fails midway is failed, as on the server.
        await conn.set_autocommit(False)
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with cur.copy(f"COPY {T} (id, note) FROM STDIN") as cp:
                await cp.write_row((900_001, "a"))
                await cp.write_row((900_001, "b"))
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        await conn.rollback()
        await _usable(conn)
    assert await _count(wire, f"{T} WHERE id > 100000") == 0
    recs = await _copy_records(proxy, start, "developer")
    assert [r.sqlstate for r in recs] == ["23514", "23505"]
    assert recs[0].extra["copy"]["error"]["sqlstate"] == "23514"
    assert recs[0].extra["copy"]["rows"] is None and recs[0].extra["copy"]["bytes"] > 0


async def test_copyfail_from_client(wire: WireHarness, proxy: ProxyHarness, tables: None) -> None:
    start = await _seq(proxy)
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer"), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(ValueError, match="boom"):
            async with cur.copy(f"COPY {T} (id, note) FROM STDIN") as cp:
                await cp.write_row((800_001, "never"))
                raise ValueError("boom")
        await _usable(conn)
    assert await _count(wire, f"{T} WHERE id = 800001") == 0
    rec = await _one_copy(proxy, start, "developer")
    assert rec.sqlstate == "57014" and rec.decision != "allow"
    assert "boom" in rec.extra["copy"]["client_fail"]
    assert rec.extra["copy"]["error"]["sqlstate"] == "57014"


async def test_unexpected_message_during_copy_in_fails_the_copy_not_the_session(
    wire: WireHarness, proxy: ProxyHarness, tables: None
) -> None:
    """A Query in the middle of COPY FROM STDIN: PostgreSQL drops it, fails the COPY with an
    ERROR naming the message type, ignores the CopyData that follows and goes on; so does the
    proxy (the server hears of it through a CopyFail). Nothing of the COPY is stored."""
    start = await _seq(proxy)
    raw = await RawClient.open(wire.port)
    msgs = await raw.login("developer", wire.passwords["developer"])
    assert isinstance(msgs[-1], ReadyForQuery)
    raw.send(query(f"COPY {T} (id, note) FROM STDIN"))
    assert isinstance(await raw.recv(), CopyInResponse)
    raw.send(
        frame(b"d", b"900001\tbefore\n")
        + query("SELECT 1")  # not a COPY message
        + frame(b"d", b"900002\tafter\n")  # ignored, as outside COPY
        + frame(b"c", b"")
    )
    msgs = await raw.until_ready()
    errs = errors(msgs)
    assert len(errs) == 1 and errs[0].severity == "ERROR", msgs
    assert "unexpected message type 0x51 during COPY from stdin" in (errs[0].message or "")
    assert msgs[-1] == ReadyForQuery("I")
    # The session goes on.
    raw.send(query("SELECT 40 + 2"))
    msgs = await raw.until_ready()
    assert DataRow((b"42",)) in msgs and not errors(msgs)
    await raw.close()
    assert await _count(wire, f"{T} WHERE id IN (900001, 900002)") == 0
    rec = await _one_copy(proxy, start, "developer")
    assert rec.decision != "allow"
    assert "unexpected message type 0x51" in rec.extra["copy"]["client_fail"]


def _kill_socket(conn: psycopg.AsyncConnection[Any]) -> None:
    """The client vanishes without a word (no CopyDone, no Terminate)."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.mark.parametrize("direction", ["in", "out"])
async def test_client_disconnects_mid_copy(
    wire_factory: Callable[..., Any], tables: None, direction: str
) -> None:
    h: WireHarness = await wire_factory(pool_mode="transaction", server_pool_size=2)
    conn = await psycopg.AsyncConnection.connect(h.dsn("developer"), autocommit=True)
    cur = conn.cursor()
    if direction == "in":
        cp_cm = cur.copy(f"COPY {T} (id, note) FROM STDIN")
        cp = await cp_cm.__aenter__()
        for i in range(700_001, 710_001):
            await cp.write_row((i, "gone"))
    else:
        cp_cm = cur.copy("COPY (SELECT g FROM generate_series(1, 5000000) g) TO STDOUT")
        cp = await cp_cm.__aenter__()
        await cp.__aiter__().__anext__()
    assert h.backends_in_use() >= 1
    _kill_socket(conn)
    with contextlib.suppress(Exception):
        await cp_cm.__aexit__(None, None, None)
    with contextlib.suppress(Exception):
        await conn.close()
    await _until(lambda: h.backends_in_use() == 0, "the server connection goes back or is dropped")
    assert h.server.sessions == set() or all(s.be is None for s in h.server.sessions)
    # The next client works, on the same (small) pool.
    for _ in range(3):
        async with await psycopg.AsyncConnection.connect(h.dsn("developer"), autocommit=True) as c2:
            await _usable(c2)
    assert await _count(h, f"{T} WHERE id > 700000") == 0


# -- policy -------------------------------------------------------------------------------------


DENIED = [
    ("admin", "COPY orders TO '/tmp/sqlproxy-copy-test.csv'", "default-deny", "copy_file"),
    ("admin", "COPY orders FROM PROGRAM 'cat /etc/passwd'", "default-deny", "copy_program"),
    ("admin", "COPY (SELECT 1) TO PROGRAM 'id'", "default-deny", "copy_program"),
    (
        "developer",
        "COPY customers (name, email, region) FROM STDIN",
        "default-deny",
        "insert of column public.customers.",
    ),
    ("analyst", "COPY orders (customer_id) FROM STDIN", "default-deny", "insert of column public.orders."),
    ("analyst", "COPY employees TO STDOUT", "analyst-no-employees", "employees"),
    ("analyst", "COPY (SELECT e.name FROM employees e) TO STDOUT", "analyst-no-employees", "employees"),
    ("developer", "COPY employees (name) TO STDOUT", "default-deny", "read of column public.employees.name"),
]


@pytest.mark.parametrize(("user", "sql", "rule", "detail"), DENIED)
async def test_copy_denied(
    wire: WireHarness, proxy: ProxyHarness, user: str, sql: str, rule: str, detail: str
) -> None:
    start = await _seq(proxy)
    async with await psycopg.AsyncConnection.connect(wire.dsn(user), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            if "STDIN" in sql:
                async with cur.copy(sql) as cp:
                    await cp.write(b"x\n")
            elif "STDOUT" in sql:
                async with cur.copy(sql) as cp:
                    async for _ in cp:
                        pass
            else:
                await cur.execute(sql)
        assert ei.value.sqlstate == "42501"
        assert rule in str(ei.value) and detail in str(ei.value)
        await _usable(conn)
    rec = await _one_copy(proxy, start, user)
    assert rec.decision == "deny" and rec.rule == rule and rec.sqlstate == "42501"


async def test_masked_and_filtered_export(wire: WireHarness, proxy: ProxyHarness, demo_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(demo_dsn, autocommit=True) as direct:
        cur = await direct.execute("SELECT id, email FROM customers WHERE region = 'eu' ORDER BY id")
        eu = {int(i): e for i, e in await cur.fetchall()}
        cur = await direct.execute("SELECT count(*) FROM customers WHERE region <> 'eu'")
        other = await cur.fetchone()
    assert eu and other is not None and other[0] > 0
    start = await _seq(proxy)
    forms = [
        "COPY customers TO STDOUT",
        "COPY customers (id, email) TO STDOUT (FORMAT csv)",
        "COPY (SELECT id, email FROM customers c WHERE c.email LIKE '%') TO STDOUT",
        "COPY public.customers (email, id) TO STDOUT (FORMAT binary)",
    ]
    async with await psycopg.AsyncConnection.connect(wire.dsn("analyst"), autocommit=True) as conn:
        cur = conn.cursor()
        for sql in forms:
            data = bytearray()
            async with cur.copy(sql) as cp:
                async for chunk in cp:
                    data += chunk
            blob = bytes(data)
            assert cur.rowcount == len(eu), sql
            for email in eu.values():
                assert email.encode() not in blob, sql  # never unmasked
                domain = email.partition("@")[2]
                assert domain.encode() in blob, sql  # partial mask keeps the domain
        # Binary, decoded: every id is an EU id, every e-mail masked.
        async with cur.copy("COPY customers (id, email) TO STDOUT (FORMAT binary)") as cp:
            cp.set_types(["int4", "text"])
            rows = [r async for r in cp.rows()]
        assert {r[0] for r in rows} == set(eu)
        assert all("***" in r[1] and r[1] != eu[r[0]] for r in rows)
    recs = await _copy_records(proxy, start, "analyst")
    assert len(recs) == len(forms) + 1
    for r in recs:
        assert r.decision == "allow" and r.extra.get("rewritten") is True
        assert "analyst-mask-contact" in (r.rule or "") and "analyst-own-region" in (r.rule or "")
        assert r.extra["copy"]["direction"] == "out" and r.extra["copy"]["rows"] == len(eu)
    assert recs[0].extra["copy"]["table"] == "public.customers"


async def test_copy_both_is_refused(wire: WireHarness) -> None:
    """Replication connections (the only way to CopyBothResponse) are refused at startup."""
    with pytest.raises(psycopg.OperationalError) as ei:
        await psycopg.AsyncConnection.connect(wire.dsn("admin", replication="database"))
    assert "replication" in str(ei.value)
