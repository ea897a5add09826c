"""The wire door under hostile and broken input, client disconnects, CancelRequest,
authentication failures, limits, idle timeouts and graceful shutdown, on the real proxy and
the real PostgreSQL the harness starts.

Waiting is always on an event that proves the thing waited for: the proxy closing a raw
socket (its session's cleanup closes the transport last, after the server connection went
back to the pool or was discarded), a session's task ending, a NOTICE the upstream statement
raises once it runs, or an advisory lock a statement held becoming free. The asyncio.wait_for
bounds around them only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest

from sqlproxy.auth.lockout import Lockout
from sqlproxy.protocol.messages import (
    AuthenticationSASL,
    AuthenticationSASLContinue,
    CancelRequest,
    CommandComplete,
    DataRow,
    ErrorResponse,
    NoticeResponse,
    ReadyForQuery,
    StartupMessage,
)
from sqlproxy.wire.pool import _CHECK_AFTER_IDLE_S
from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireHarness
from tests.raw_wire import (
    HANG_S,
    ROBUST_SQL,
    RawClient,
    errors,
    fatal,
    frame,
    lock_key,
    query,
    session_ended,
)

WireFactory = Callable[..., Awaitable[WireHarness]]


@pytest.fixture(scope="module")
def robust_db(demo_dsn: str) -> Iterator[str]:
    with psycopg.connect(demo_dsn, autocommit=True) as conn:
        conn.execute(ROBUST_SQL)
    yield demo_dsn


async def _direct(dsn: str) -> psycopg.AsyncConnection[Any]:
    """A connection straight to PostgreSQL, to observe what the proxy did upstream."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def _lock_is_free(dsn: str, key: int) -> None:
    """Returns once no transaction holds advisory lock ``key`` (waits for it in the server)."""
    async with await _direct(dsn) as d:
        await d.execute("SET lock_timeout = 0")
        async with d.transaction():
            await asyncio.wait_for(d.execute("SELECT pg_advisory_xact_lock(%s)", (key,)), HANG_S)


async def _server_pid_from_notice(raw: RawClient) -> int:
    """Read until the NOTICE that robust.hold/robust.wait raise once they run upstream."""
    while True:
        msg = await raw.recv()
        assert msg is not None, "connection closed before the statement ran"
        assert not isinstance(msg, ErrorResponse), msg
        if isinstance(msg, NoticeResponse):
            return int((msg.message or "").split()[-1])


async def _login(h: WireHarness, user: str = "admin") -> RawClient:
    raw = await RawClient.open(h.port)
    msgs = await raw.login(user, h.passwords[user])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    return raw


class Bystander:
    """A psycopg connection that keeps running queries on the same listener while a hostile
    client does its worst; it must not notice anything. On exit it runs one more query, then
    leaves, and waits until its session on the proxy has ended: from then on the listener
    holds no server connection for anyone unless something leaked."""

    def __init__(self, h: WireHarness) -> None:
        self.h = h
        self.done = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await self.check()

    async def check(self) -> None:
        assert self._conn is not None
        cur = await self._conn.execute("SELECT count(*), current_setting('sqlproxy.user') FROM orders")
        row = await cur.fetchone()
        assert row is not None and row[0] > 0 and row[1] == "analyst"
        self.done += 1

    async def __aenter__(self) -> Bystander:
        self._conn = await psycopg.AsyncConnection.connect(self.h.dsn("analyst"), autocommit=True)
        await self.check()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn = self._conn
        assert conn is not None and self._task is not None
        try:
            self._stop.set()
            await asyncio.wait_for(self._task, HANG_S)  # re-raises whatever the loop hit
            before = self.done
            await self.check()
            assert self.done == before + 1
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            session = self.h.server._by_pid[conn.info.backend_pid]
        finally:
            await conn.close()
        await session_ended(session)


@pytest.fixture
def bystander(wire: WireHarness) -> Bystander:
    return Bystander(wire)


# -- hostile and broken input -------------------------------------------------------------

_V3 = 196608
_STARTUP = StartupMessage.build({"user": "analyst", "database": "demo"}).encode()

# (bytes sent on a fresh connection, SQLSTATE of the FATAL reply; None: closed without a reply,
# as PostgreSQL closes on an incomplete startup packet)
BEFORE_STARTUP: dict[str, tuple[bytes, str | None]] = {
    "http_request": (b"GET / HTTP/1.1\r\nHost: sqlproxy\r\n\r\n", "08P01"),
    "length_2gb": (struct.pack("!II", 0x80000000, _V3), "08P01"),
    "length_4gb_minus_1": (struct.pack("!II", 0xFFFFFFFF, _V3) + b"user\0x\0\0", "08P01"),
    "length_below_8": (struct.pack("!II", 4, _V3), "08P01"),
    "zeros": (b"\0" * 16, "08P01"),
    "protocol_2": (struct.pack("!II", 16, 2 << 16) + b"user\0x\0\0", "0A000"),
    # An unknown request code reads as an unsupported protocol version, as in the server.
    "unknown_request_code": (struct.pack("!II", 8, 1234_5999), "0A000"),
    "parameters_unterminated": (struct.pack("!II", 16, _V3) + b"user\0xyz", "08P01"),
    "truncated_then_eof": (_STARTUP[: len(_STARTUP) // 2], None),
    "header_only_then_eof": (_STARTUP[:4], None),
}


@pytest.mark.parametrize("case", sorted(BEFORE_STARTUP))
async def test_hostile_bytes_before_startup(wire: WireHarness, bystander: Bystander, case: str) -> None:
    data, sqlstate = BEFORE_STARTUP[case]
    async with bystander:
        raw = await RawClient.open(wire.port)
        raw.send(data)
        if sqlstate is None:
            raw.writer.write_eof()
        msgs = await raw.until_eof()
        await raw.close()
    if sqlstate is None:
        assert msgs == []
    else:
        err = fatal(msgs)
        assert err.sqlstate == sqlstate, err
        assert len(msgs) == 1
    assert wire.backends_in_use() == 0


# Sent after a successful login (as admin, in transaction pool mode).
AFTER_LOGIN: dict[str, tuple[bytes, str | None]] = {
    "unknown_type_y": (b"y\0\0\0\x04", "08P01"),
    "unknown_type_nul": (b"\0\0\0\0\x04", "08P01"),
    "length_below_4": (b"Q\0\0\0\x03SELECT 1\0", "08P01"),
    "length_2gb": (b"Q\x7f\xff\xff\xffSELECT 1\0", "08P01"),
    # Over max_message_bytes (64 MiB) but under the protocol's 1 GiB: a limit, not garbage.
    "length_over_limit": (b"Q" + struct.pack("!I", 100 << 20) + b"SELECT 1\0", "54000"),
    "small_message_too_long": (b"S" + struct.pack("!I", 1 << 20), "08P01"),
    "query_without_nul": (frame(b"Q", b"SELECT 1"), "08P01"),
    "query_length_short": (b"Q\0\0\0\x08SELECT 1\0", "08P01"),
    "empty_query_payload": (frame(b"Q", b""), "08P01"),
    "parse_without_nul": (frame(b"P", b"stmt"), "08P01"),
    "parse_without_query_nul": (frame(b"P", b"\0SELECT 1"), "08P01"),
    "bind_without_nul": (frame(b"B", b"portal"), "08P01"),
    "bind_without_statement_nul": (frame(b"B", b"\0stmt"), "08P01"),
    "execute_without_nul": (frame(b"E", b"portal"), "08P01"),
    "truncated_query_then_eof": (b"Q\0\0\x01\0SELECT", None),
    "truncated_header_then_eof": (b"Q\0\0", None),
}


@pytest.mark.parametrize("case", sorted(AFTER_LOGIN))
async def test_hostile_bytes_after_login(wire: WireHarness, bystander: Bystander, case: str) -> None:
    data, sqlstate = AFTER_LOGIN[case]
    async with bystander:
        raw = await _login(wire)
        raw.send(data)
        if sqlstate is None:
            raw.writer.write_eof()
        msgs = await raw.until_eof()
        await raw.close()
    if sqlstate is None:
        assert msgs == []
    else:
        err = fatal(msgs)
        assert err.sqlstate == sqlstate, err
    assert wire.backends_in_use() == 0


async def test_hostile_bytes_inside_a_transaction_roll_it_back(
    wire: WireHarness, bystander: Bystander, robust_db: str
) -> None:
    """A protocol violation while the client holds a server connection in a transaction: the
    connection is dropped (so the server rolls back), never handed on."""
    tag = uuid.uuid4().hex
    async with bystander:
        raw = await _login(wire)
        raw.send(query(f"BEGIN; INSERT INTO robust.t VALUES ('{tag}', 1)"))
        msgs = await raw.until_ready()
        assert msgs[-1] == ReadyForQuery("T"), msgs
        raw.send(frame(b"Q", b"SELECT 1"))  # no terminator
        err = fatal(await raw.until_eof())
        assert err.sqlstate == "08P01"
        await raw.close()
    assert wire.backends_in_use() == 0
    async with await _direct(robust_db) as d:
        cur = await d.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() == (0,)


async def test_messages_postgres_tolerates_are_tolerated(wire: WireHarness) -> None:
    """CopyData/CopyDone/CopyFail outside COPY are ignored (as by the server), a FunctionCall is
    refused with an error that does not end the session, and the session goes on."""
    raw = await _login(wire)
    raw.send(frame(b"d", b"stray") + frame(b"c", b"") + frame(b"f", b"why\0") + query("SELECT 41 + 1"))
    msgs = await raw.until_ready()
    assert not errors(msgs)
    assert DataRow((b"42",)) in msgs
    raw.send(frame(b"F", struct.pack("!IHHH", 1234, 0, 0, 0)))
    msgs = await raw.until_ready()
    (err,) = errors(msgs)
    assert err.severity == "ERROR" and err.sqlstate == "0A000"
    # Text that is not UTF-8: an ERROR, as from the server, in both protocols.
    raw.send(frame(b"Q", b"SELECT '\xff\xfe'\0"))
    (err,) = errors(await raw.until_ready())
    assert err.severity == "ERROR" and err.sqlstate == "22021"
    raw.send(frame(b"P", b"\0SELECT '\xc3\x28'\0\0\0") + frame(b"S", b""))
    msgs = await raw.until_ready()
    (err,) = errors(msgs)
    assert err.severity == "ERROR" and err.sqlstate == "22021"
    assert msgs[-1] == ReadyForQuery("I")
    raw.send(query("SELECT 1"))
    msgs = await raw.until_ready()
    assert DataRow((b"1",)) in msgs and msgs[-1] == ReadyForQuery("I")
    raw.send(frame(b"X", b""))
    assert await raw.until_eof() == []
    await raw.close()
    assert wire.backends_in_use() == 0


async def test_listener_still_serves_new_clients_after_hostile_input(wire: WireHarness) -> None:
    for data in (b"\xff" * 64, struct.pack("!II", 0x80000000, _V3)):
        raw = await RawClient.open(wire.port)
        raw.send(data)
        assert fatal(await raw.until_eof()).sqlstate == "08P01"
        await raw.close()
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer")) as conn:
        cur = await conn.execute("SELECT count(*) FROM orders")
        assert ((await cur.fetchone()) or (0,))[0] > 0


# -- clients that vanish ------------------------------------------------------------------


async def test_disconnect_mid_query_cancels_and_drops_the_server_connection(
    wire_factory: WireFactory, robust_db: str
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    key = lock_key()
    raw = await _login(h)
    raw.send(query(f"SELECT robust.hold({key}, 3600)"))
    server_pid = await _server_pid_from_notice(raw)  # the statement runs upstream now
    assert h.backends_in_use() == 1
    raw.abort()
    # The statement held the lock for its transaction: the lock is free only once the server
    # stopped it, which in the hour it asked for means the proxy cancelled it.
    await _lock_is_free(robust_db, key)
    # The next client gets a different server connection, idle, without the dead one's lock.
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_backend_pid(), (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')"
        )
        row = await cur.fetchone()
        assert row is not None
        assert row[0] != server_pid
        assert row[1] == 0
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    assert h.backends_in_use() == 0
    async with await _direct(robust_db) as d:
        cur = await d.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (server_pid,)
        )
        assert await cur.fetchone() == (0,)


async def test_disconnect_mid_extended_query_cancels(wire_factory: WireFactory, robust_db: str) -> None:
    """The same with the extended protocol (psycopg with parameters), the client's task
    waiting for client bytes rather than for the server."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    key = lock_key()
    raw = await _login(h)
    sql = b"SELECT robust.hold($1, 3600)\0"
    raw.send(
        frame(b"P", b"\0" + sql + b"\0\0")
        + frame(b"B", b"\0\0" + struct.pack("!hhi", 0, 1, len(str(key))) + str(key).encode() + b"\0\0")
        + frame(b"E", b"\0\0\0\0\0")
        + frame(b"S", b"")
    )
    await _server_pid_from_notice(raw)
    raw.abort()
    await _lock_is_free(robust_db, key)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    assert h.backends_in_use() == 0


async def test_disconnect_mid_transaction_rolls_back_and_is_not_reused(
    wire_factory: WireFactory, robust_db: str
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    tag, key = uuid.uuid4().hex, lock_key()
    raw = await _login(h)
    raw.send(
        query(
            f"BEGIN; INSERT INTO robust.t VALUES ('{tag}', 1); "
            f"SELECT pg_advisory_xact_lock({key}); SET LOCAL work_mem = '7MB'"
        )
    )
    msgs = await raw.until_ready()
    assert not errors(msgs) and msgs[-1] == ReadyForQuery("T"), msgs
    raw.abort()
    await _lock_is_free(robust_db, key)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        cur = await conn.execute(
            "SELECT current_setting('work_mem'), count(*) FROM robust.t WHERE tag = %s", (tag,)
        )
        row = await cur.fetchone()
        assert row is not None and row[0] != "7MB" and row[1] == 0
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    assert h.backends_in_use() == 0


async def test_disconnect_after_execute_without_sync_does_not_commit(
    wire_factory: WireFactory, robust_db: str
) -> None:
    """Parse/Bind/Execute of an INSERT without a Sync, then the client vanishes: PostgreSQL
    would roll the implicit transaction back. The server connection must not go to the next
    client with that transaction still open (its next statement would commit the INSERT)."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    tag = uuid.uuid4().hex
    raw = await _login(h)
    sql = f"INSERT INTO robust.t VALUES ('{tag}', 1)".encode()
    raw.send(
        frame(b"P", b"\0" + sql + b"\0\0\0")
        + frame(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
        + frame(b"E", b"\0\0\0\0\0")
        + frame(b"H", b"")
    )
    while not isinstance(msg := await raw.recv(), CommandComplete):
        assert msg is not None and not isinstance(msg, ErrorResponse), msg
    s = next(iter(h.server.sessions))
    raw.abort()
    await session_ended(s)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        await conn.execute("SELECT 1")
        cur = await conn.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() == (0,)
    async with await _direct(robust_db) as d:
        cur = await d.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() == (0,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_session_state_is_reset_before_the_next_client(
    wire_factory: WireFactory, robust_db: str, mode: str
) -> None:
    """A client leaves a temp table, a prepared statement, a setting, a LISTEN and a session
    advisory lock behind and disconnects; the one server connection goes to the next client
    clean."""
    h = await wire_factory(pool_mode=mode, server_pool_size=1)
    key = lock_key()
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        await conn.execute("CREATE TEMP TABLE leftover (a int)")
        await conn.execute("PREPARE leftover_stmt AS SELECT 1")
        await conn.execute("SET work_mem = '7MB'")
        await conn.execute("LISTEN leftover_channel")
        await conn.execute(f"SELECT pg_advisory_lock({key})")
        cur = await conn.execute("SELECT pg_backend_pid()")
        first = await cur.fetchone()
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_backend_pid(), to_regclass('pg_temp.leftover'), "
            "(SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover_stmt'), "
            "current_setting('work_mem'), (SELECT count(*) FROM pg_listening_channels()), "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
        )
        row = await cur.fetchone()
        assert row is not None
        assert row[0] == (first or (0,))[0]  # the same server connection, reset
        assert row[1:] == (None, 0, "4MB", 0, 0)
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    await _lock_is_free(robust_db, key)


# -- CancelRequest --------------------------------------------------------------------------


async def test_psycopg_cancel_interrupts_its_own_query(wire: WireHarness, robust_db: str) -> None:
    running = asyncio.Event()
    async with await psycopg.AsyncConnection.connect(wire.dsn("admin"), autocommit=True) as conn:
        conn.add_notice_handler(lambda _d: running.set())
        task = asyncio.create_task(conn.execute(f"SELECT robust.hold({lock_key()}, 3600)"))
        await asyncio.wait_for(running.wait(), HANG_S)
        await asyncio.wait_for(conn.cancel_safe(), HANG_S)
        with pytest.raises(psycopg.errors.QueryCanceled) as ei:
            await asyncio.wait_for(task, HANG_S)
        assert ei.value.sqlstate == "57014"
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_asyncpg_cancel_interrupts_its_own_query(wire: WireHarness) -> None:
    import asyncpg

    running = asyncio.Event()
    conn = await asyncpg.connect(wire.url("admin"))
    try:
        conn.add_log_listener(lambda *_a: running.set())
        task = asyncio.create_task(conn.fetchval(f"SELECT robust.hold({lock_key()}, 3600)"))
        await asyncio.wait_for(running.wait(), HANG_S)
        task.cancel()  # asyncpg sends a CancelRequest and waits for the server's answer
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(conn.fetchval("SELECT 7"), HANG_S) == 7
    finally:
        await conn.close()


async def test_cancel_with_wrong_secret_or_pid_does_nothing(wire: WireHarness, robust_db: str) -> None:
    key = lock_key()
    async with await _direct(robust_db) as d:
        await d.execute("BEGIN")
        await d.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        raw = await _login(wire)
        assert raw.key is not None
        pid, secret = raw.key.process_id, raw.key.secret_key
        raw.send(query(f"SELECT robust.wait({key})"))
        server_pid = await _server_pid_from_notice(raw)
        wrong = bytes([secret[0] ^ 1]) + secret[1:]
        for cancel in (CancelRequest(pid, wrong), CancelRequest(pid ^ 1, secret)):
            c = await RawClient.open(wire.port)
            c.send(cancel.encode())
            assert await c.until_eof() == []  # the proxy has dealt with it
            await c.close()
        cur = await d.execute(
            "SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", (server_pid,)
        )
        assert await cur.fetchone() in (("active", "Lock"), ("active", None))  # still running
        await d.execute("COMMIT")  # now the statement completes by itself
    msgs = await raw.until_ready()
    assert not errors(msgs), msgs
    assert DataRow((str(server_pid).encode(),)) in msgs
    # The right key does cancel (same connection, a statement that would wait an hour).
    raw.send(query(f"SELECT robust.hold({lock_key()}, 3600)"))
    await _server_pid_from_notice(raw)
    c = await RawClient.open(wire.port)
    c.send(CancelRequest(pid, secret).encode())
    assert await c.until_eof() == []
    await c.close()
    msgs = await raw.until_ready()
    (err,) = errors(msgs)
    assert err.sqlstate == "57014"
    assert msgs[-1] == ReadyForQuery("I")
    await raw.close()


# -- authentication -------------------------------------------------------------------------


async def _failed_login(h: WireHarness, user: str, password: str) -> tuple[list[Any], ErrorResponse]:
    raw = await RawClient.open(h.port)
    msgs = await raw.login(user, password)
    rest = await raw.until_eof()
    await raw.close()
    assert rest == []
    return msgs, fatal(msgs)


@pytest.fixture
def fresh_lockout(proxy: ProxyHarness) -> Iterator[Lockout]:
    """A Lockout of the test's own on the runtime's user directory: failures counted here
    (every test client comes from 127.0.0.1) do not lock out the rest of the suite."""
    users = proxy.runtime.users
    saved = users.lockout
    users.lockout = Lockout(3, 300.0, 300.0)
    try:
        yield users.lockout
    finally:
        users.lockout = saved


def _shape(msgs: list[Any]) -> list[Any]:
    out: list[Any] = []
    for m in msgs:
        if isinstance(m, AuthenticationSASL):
            out.append(("sasl", m.mechanisms))
        elif isinstance(m, AuthenticationSASLContinue):
            attrs = dict(p.split("=", 1) for p in m.data.decode().split(","))
            out.append(("continue", sorted(attrs), len(attrs["s"]), attrs["i"]))
        elif isinstance(m, ErrorResponse):
            out.append(("error", sorted(k for k, _ in m.fields)))
        else:
            out.append(type(m).__name__)
    return out


async def test_wrong_password_and_unknown_user_look_the_same(
    wire: WireHarness, proxy: ProxyHarness, fresh_lockout: Lockout
) -> None:
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    msgs_a, err_a = await _failed_login(wire, "analyst", "not-the-password")
    msgs_b, err_b = await _failed_login(wire, ghost, "not-the-password")
    assert err_a.sqlstate == err_b.sqlstate == "28P01"
    assert err_a.severity == err_b.severity == "FATAL"
    assert err_a.message == 'password authentication failed for user "analyst"'
    assert err_b.message == f'password authentication failed for user "{ghost}"'
    assert _shape(msgs_a) == _shape(msgs_b)
    # Probing the unknown user again gives the same salt (no tell-tale fresh salt per try).
    msgs_c, _ = await _failed_login(wire, ghost, "again")
    salts = [
        dict(p.split("=", 1) for p in m.data.decode().split(","))["s"]
        for m in (*msgs_b, *msgs_c)
        if isinstance(m, AuthenticationSASLContinue)
    ]
    assert len(salts) == 2 and salts[0] == salts[1]
    # psycopg reports both the same way.
    texts = []
    for user in ("analyst", ghost):
        with pytest.raises(psycopg.OperationalError) as ei:
            await psycopg.AsyncConnection.connect(wire.dsn(user, password="nope"))
        texts.append(str(ei.value).replace(user, "USER"))
    assert texts[0] == texts[1]


async def test_lockout_and_an_audit_record_per_failure(
    wire: WireHarness, proxy: ProxyHarness, fresh_lockout: Lockout
) -> None:
    store = proxy.runtime.audit.store
    await proxy.runtime.audit.flush()
    seen = {r.id for r in await store.query(decision="unauthenticated", limit=100_000)}
    # Three wrong passwords (the threshold of this test's Lockout) lock the user out ...
    for _ in range(3):
        await _failed_login(wire, "developer", "wrong")
    # ... so the right password is refused too, and looks exactly like a wrong one.
    _, err = await _failed_login(wire, "developer", wire.passwords["developer"])
    assert err.sqlstate == "28P01"
    assert err.message == 'password authentication failed for user "developer"'
    await proxy.runtime.audit.flush()
    new = [
        r
        for r in await store.query(decision="unauthenticated", limit=100_000)
        if r.id not in seen and r.door == "wire"
    ]
    assert len(new) == 4
    for r in new:
        assert r.extra.get("user_presented") == "developer"
        assert r.sqlstate == "28P01"
        assert r.source.startswith("127.0.0.1")
    # The lock is the directory's: lifting it (a fresh Lockout) lets the right password in.
    proxy.runtime.users.lockout = Lockout(3, 300.0, 300.0)
    async with await psycopg.AsyncConnection.connect(wire.dsn("developer")) as conn:
        cur = await conn.execute("SELECT current_setting('sqlproxy.user')")
        assert await cur.fetchone() == ("developer",)


# -- limits, timeouts, shutdown -----------------------------------------------------------


async def test_max_clients(wire_factory: WireFactory) -> None:
    h = await wire_factory(max_clients=2)
    a = await psycopg.AsyncConnection.connect(h.dsn("analyst"), autocommit=True)
    b = await psycopg.AsyncConnection.connect(h.dsn("developer"), autocommit=True)
    try:
        raw = await RawClient.open(h.port)
        msgs = await raw.login("admin", h.passwords["admin"])
        err = fatal(msgs)
        assert err.sqlstate == "53300"
        assert "too many clients" in (err.message or "")
        assert await raw.until_eof() == []
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            await psycopg.AsyncConnection.connect(h.dsn("admin"))
        # The ones inside are unaffected; when one leaves, a new client gets its slot.
        cur = await a.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        s = h.server._by_pid[b.info.backend_pid]
        await b.close()
        await session_ended(s)
        async with await psycopg.AsyncConnection.connect(h.dsn("admin")) as c:
            cur = await c.execute("SELECT 2")
            assert await cur.fetchone() == (2,)
    finally:
        await a.close()
        await b.close()


async def test_startup_timeout_is_configurable(wire_factory: WireFactory) -> None:
    """A client that stops answering in the middle of its login is told so and disconnected
    after ``startup_timeout_s``, and the slot it held is free again (max_clients 1 lets the
    next one in)."""
    h = await wire_factory(startup_timeout_s=0.5, max_clients=1)
    raw = await RawClient.open(h.port)
    raw.send(StartupMessage.build({"user": "analyst", "database": "demo"}).encode())
    assert isinstance(await raw.recv(), AuthenticationSASL)  # admitted; it never answers
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "08006"
    assert "timeout expired during startup" in (err.message or "")
    await raw.close()
    async with await psycopg.AsyncConnection.connect(h.dsn("analyst"), autocommit=True) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_idle_session_timeout(wire_factory: WireFactory) -> None:
    h = await wire_factory(idle_timeout_s=0.3)
    raw = await RawClient.open(h.port)
    # The Query goes with the login, so the timer cannot fire before it on a slow machine.
    msgs = await raw.login("analyst", h.passwords["analyst"], pipeline=query("SELECT 1"))
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    assert DataRow((b"1",)) in await raw.until_ready()
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "57P05"
    assert "idle-session timeout" in (err.message or "")
    await raw.close()
    assert h.backends_in_use() == 0
    assert h.server.active == 0


@pytest.mark.parametrize("failed", [False, True])
async def test_idle_in_transaction_timeout(wire_factory: WireFactory, robust_db: str, failed: bool) -> None:
    h = await wire_factory(idle_in_transaction_timeout_s=0.3)
    tag, key = uuid.uuid4().hex, lock_key()
    raw = await _login(h)
    # Sent together: the transaction is never idle before the test is done with it.
    # (The idle timer only runs inside a transaction here: idle_timeout_s is 0.)
    raw.send(
        query(f"BEGIN; INSERT INTO robust.t VALUES ('{tag}', 1); SELECT pg_advisory_xact_lock({key})")
        + (query("SELECT 1/0") if failed else b"")  # idle in a failed transaction counts too
    )
    msgs = await raw.until_ready()
    assert msgs[-1] == ReadyForQuery("T")
    if failed:
        msgs = await raw.until_ready()
        assert msgs[-1] == ReadyForQuery("E")
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "25P03"
    assert "idle-in-transaction timeout" in (err.message or "")
    await raw.close()
    assert h.backends_in_use() == 0
    await _lock_is_free(robust_db, key)
    async with await _direct(robust_db) as d:
        cur = await d.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() == (0,)


async def test_idle_timeout_does_not_fire_while_a_query_runs(
    wire_factory: WireFactory, robust_db: str
) -> None:
    """Only waiting for the client is idle: a statement that runs (server-side) ten times
    longer than idle_timeout_s completes, and only then does the idle timer end the session.
    The Query goes out with the last login message, so the timer is never armed before it."""
    h = await wire_factory(idle_timeout_s=0.05)
    raw = await RawClient.open(h.port)
    msgs = await raw.login(
        "admin", h.passwords["admin"], pipeline=query(f"SELECT robust.hold({lock_key()}, 0.5)")
    )
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    msgs = await raw.until_ready()
    assert not errors(msgs), msgs
    assert any(isinstance(m, DataRow) for m in msgs)
    assert fatal(await raw.until_eof()).sqlstate == "57P05"
    await raw.close()


async def _stopping(h: WireHarness, grace_s: float) -> asyncio.Task[None]:
    task = asyncio.create_task(h.server.stop(grace_s=grace_s))
    # One turn of the loop (not a delay): stop() marks the server as stopping and closes the
    # listening socket before its first await.
    await asyncio.sleep(0)
    assert h.server.stopping
    return task


async def test_graceful_shutdown_lets_a_transaction_commit(wire_factory: WireFactory, robust_db: str) -> None:
    h = await wire_factory()
    port = h.port
    tag = uuid.uuid4().hex
    busy = await _login(h)
    idle = await _login(h, "analyst")
    busy.send(query(f"BEGIN; INSERT INTO robust.t VALUES ('{tag}', 1)"))
    assert (await busy.until_ready())[-1] == ReadyForQuery("T")
    stop = await _stopping(h, grace_s=HANG_S)
    # An idle client is told at once; new connections are refused.
    assert fatal(await idle.until_eof()).sqlstate == "57P01"
    await idle.close()
    with pytest.raises(OSError):
        await RawClient.open(port)
    assert not stop.done()
    # The transaction goes on to commit within the grace period, then the session ends.
    busy.send(query(f"INSERT INTO robust.t VALUES ('{tag}', 2); COMMIT"))
    msgs = await busy.until_ready()
    assert not errors(msgs) and msgs[-1] == ReadyForQuery("I"), msgs
    err = fatal(await busy.until_eof())
    assert err.sqlstate == "57P01"
    await busy.close()
    await asyncio.wait_for(stop, HANG_S)
    async with await _direct(robust_db) as d:
        cur = await d.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() == (2,)


async def test_graceful_shutdown_deadline_ends_a_stuck_transaction(
    wire_factory: WireFactory, robust_db: str
) -> None:
    h = await wire_factory()
    tag = uuid.uuid4().hex
    raw = await _login(h)
    raw.send(query(f"BEGIN; INSERT INTO robust.t VALUES ('{tag}', 1)"))
    assert (await raw.until_ready())[-1] == ReadyForQuery("T")
    stop = await _stopping(h, grace_s=0.2)
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "57P01"
    await raw.close()
    await asyncio.wait_for(stop, HANG_S)
    assert h.backends_in_use() == 0
    async with await _direct(robust_db) as d:
        cur = await d.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() == (0,)


async def test_shutdown_refuses_a_client_mid_startup(wire_factory: WireFactory) -> None:
    """A client whose TCP connection was accepted before stop() but whose StartupMessage comes
    after it is refused as PostgreSQL refuses connections during shutdown (57P03)."""
    h = await wire_factory()
    raw = await RawClient.open(h.port)
    # Let the listener accept it: the proxy answers an SSLRequest only once it has a session.
    raw.send(struct.pack("!II", 8, 80877103))
    assert await raw.read_byte() == b"N"
    stop = await _stopping(h, grace_s=HANG_S)
    msgs = await raw.login("admin", h.passwords["admin"])
    err = fatal(msgs)
    assert err.sqlstate == "57P03"
    await raw.close()
    await asyncio.wait_for(stop, HANG_S)


async def test_a_late_cancel_never_reaches_another_clients_query(
    wire_factory: WireFactory, robust_db: str
) -> None:
    """Transaction pooling hands A's server connection to B once A is idle; A's cancel key
    then cancels nothing, in particular not B's statement on that same connection."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    key = lock_key()
    a = await _login(h)
    assert a.key is not None
    a.send(query("SELECT pg_backend_pid()"))
    a_msgs = await a.until_ready()
    async with await _direct(robust_db) as d:
        await d.execute("BEGIN")
        await d.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        b = await _login(h)
        b.send(query(f"SELECT robust.wait({key})"))
        server_pid = await _server_pid_from_notice(b)
        assert DataRow((str(server_pid).encode(),)) in a_msgs  # B runs on A's old connection
        c = await RawClient.open(h.port)
        c.send(CancelRequest(a.key.process_id, a.key.secret_key).encode())
        assert await c.until_eof() == []
        await c.close()
        cur = await d.execute(
            "SELECT state, wait_event_type FROM pg_stat_activity WHERE pid = %s", (server_pid,)
        )
        assert await cur.fetchone() in (("active", "Lock"), ("active", None))  # still running
        await d.execute("COMMIT")
    msgs = await b.until_ready()
    assert not errors(msgs) and DataRow((str(server_pid).encode(),)) in msgs
    for raw in (a, b):
        await raw.close()


async def test_failed_logins_give_their_client_slot_back(
    wire_factory: WireFactory, fresh_lockout: Lockout
) -> None:
    h = await wire_factory(max_clients=1)
    for _ in range(2):
        _, err = await _failed_login(h, "analyst", "wrong")
        assert err.sqlstate == "28P01"
    # One that leaves in the middle of SCRAM.
    raw = await RawClient.open(h.port)
    raw.send(StartupMessage.build({"user": "analyst", "database": "demo"}).encode())
    assert isinstance(await raw.recv(), AuthenticationSASL)
    assert h.server.active == 1
    raw.writer.write_eof()
    assert await raw.until_eof() == []
    await raw.close()
    assert h.server.active == 0
    async with await psycopg.AsyncConnection.connect(h.dsn("analyst")) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_garbage_after_a_pipelined_batch(wire: WireHarness) -> None:
    """Garbage right behind a valid batch in the same packet: as PostgreSQL, the proxy answers
    the batch it read before the garbage, then ends the session with 08P01; nothing leaks."""
    raw = await _login(wire)
    raw.send(
        frame(b"P", b"\0SELECT 42\0\0\0")
        + frame(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
        + frame(b"E", b"\0\0\0\0\0")
        + frame(b"S", b"")
        + b"y\0\0\0\x04"
    )
    msgs = await raw.until_eof()
    await raw.close()
    assert fatal(msgs).sqlstate == "08P01"
    answered = [type(m).__name__ for m in msgs[:-1]]
    assert answered == ["ParseComplete", "BindComplete", "DataRow", "CommandComplete", "ReadyForQuery"], msgs
    assert DataRow((b"42",)) in msgs
    assert wire.backends_in_use() == 0


async def test_garbage_after_a_simple_query(wire: WireHarness) -> None:
    raw = await _login(wire)
    raw.send(query("SELECT 41 + 1") + b"\x01\xff\xff\xff\xff")
    msgs = await raw.until_eof()
    await raw.close()
    assert fatal(msgs).sqlstate == "08P01"
    assert DataRow((b"42",)) in msgs and ReadyForQuery("I") in msgs, msgs
    assert wire.backends_in_use() == 0


async def test_server_connection_killed_while_idle_is_replaced(
    wire_factory: WireFactory, robust_db: str
) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        (first,) = await cur.fetchone() or (0,)
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)  # the connection is idle in the pool now
    async with await _direct(robust_db) as d:
        await d.execute("SELECT pg_terminate_backend(%s, 60000)", (first,))
    # Whether or not the proxy has read the server's goodbye yet, a connection idle for a while
    # is checked before it is handed out: the next client gets a new one and never an error.
    await asyncio.sleep(_CHECK_AFTER_IDLE_S)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        (second,) = await cur.fetchone() or (0,)
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    assert second not in (0, first)
    assert h.backends_in_use() == 0


async def test_idle_server_connection_with_pending_input_is_not_handed_out(
    wire_factory: WireFactory,
) -> None:
    """The check itself, without a race to win: a pooled connection whose socket has input
    the event loop has not read yet (here: reading paused) is dropped, not reused."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        (first,) = await cur.fetchone() or (0,)
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    pool = h.server.pool_for("demo")
    (be,) = list(pool.idle)
    assert be.transport is not None and not be.has_input()
    be.transport.pause_reading()  # what the server says next stays in the socket
    be.write(b"Q\x00\x00\x00\x0dSELECT 1\x00")  # an answer arrives that no one reads
    await asyncio.sleep(0.2)
    assert be.has_input()
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        (second,) = await cur.fetchone() or (0,)
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    assert second not in (0, first) and be.closed
    assert h.backends_in_use() == 0


async def test_server_connection_killed_mid_query(wire_factory: WireFactory, robust_db: str) -> None:
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    raw = await _login(h)
    raw.send(query(f"SELECT robust.hold({lock_key()}, 3600)"))
    server_pid = await _server_pid_from_notice(raw)
    async with await _direct(robust_db) as d:
        await d.execute("SELECT pg_terminate_backend(%s, 60000)", (server_pid,))
    msgs = await raw.until_eof()
    await raw.close()
    errs = errors(msgs)
    # One FATAL: the server's own (terminating connection due to administrator command).
    assert len(errs) == 1 and errs[0].severity == "FATAL", msgs
    assert errs[0].sqlstate == "57P01", errs
    assert h.backends_in_use() == 0
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
async def test_client_vanishing_while_it_waits_for_a_server_connection(
    wire_factory: WireFactory, robust_db: str, protocol: str
) -> None:
    """B queues for the only server connection, which A holds in a transaction, and vanishes.
    When A commits, the connection goes back to the pool and on to the next client clean.
    Whether B's statement still runs is not fixed (PostgreSQL too runs what it read before
    the client vanished): today the proxy drops a simple Query but runs an extended batch."""
    h = await wire_factory(pool_mode="transaction", server_pool_size=1)
    tag = uuid.uuid4().hex
    b = await _login(h)  # logging in needs a server connection too: before A takes it
    a = await _login(h)
    a.send(query("BEGIN"))
    assert (await a.until_ready())[-1] == ReadyForQuery("T")
    sql = f"INSERT INTO robust.t VALUES ('{tag}', 1)"
    if protocol == "simple":
        b.send(query(sql))
    else:
        b.send(
            frame(b"P", b"\0" + sql.encode() + b"\0\0\0")
            + frame(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
            + frame(b"E", b"\0\0\0\0\0")
            + frame(b"S", b"")
        )
    assert b.key is not None
    b_session = h.server._by_pid[b.key.process_id]
    b.abort()
    a.send(query("COMMIT"))
    assert (await a.until_ready())[-1] == ReadyForQuery("I")
    await session_ended(b_session)
    a.send(frame(b"X", b""))
    assert await a.until_eof() == []
    await a.close()
    assert h.backends_in_use() == 0
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM robust.t WHERE tag = %s", (tag,))
        assert await cur.fetchone() in ((0,), (1,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    assert h.backends_in_use() == 0


@pytest.mark.parametrize(
    "case", ["unknown_type_y", "query_without_nul", "bind_without_nul", "truncated_query_then_eof"]
)
async def test_hostile_bytes_in_session_mode_reset_the_connection(
    wire_factory: WireFactory, case: str
) -> None:
    """In session pool mode the client holds its server connection all along; after a
    protocol violation (or a vanishing client) it goes back reset, and the next client on
    the one-connection pool gets it clean."""
    h = await wire_factory(pool_mode="session", server_pool_size=1)
    data, sqlstate = AFTER_LOGIN[case]
    raw = await _login(h)
    raw.send(query("CREATE TEMP TABLE leftover (a int); SET work_mem = '7MB'; SELECT pg_backend_pid()"))
    msgs = await raw.until_ready()
    assert not errors(msgs), msgs
    (first,) = [m.values[0] for m in msgs if isinstance(m, DataRow)]
    raw.send(data)
    if sqlstate is None:
        raw.writer.write_eof()
    rest = await raw.until_eof()
    await raw.close()
    if sqlstate is None:
        assert rest == []
    else:
        assert fatal(rest).sqlstate == sqlstate
    async with await psycopg.AsyncConnection.connect(h.dsn("admin"), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_backend_pid()::text, to_regclass('pg_temp.leftover'), current_setting('work_mem')"
        )
        row = await cur.fetchone()
        assert row is not None and row[1:] == (None, "4MB")
        if case != "bind_without_nul":  # (a half-read extended batch: dropped, not reset)
            assert row[0].encode() == first  # the same connection, reset
        s = h.server._by_pid[conn.info.backend_pid]
    await session_ended(s)
    # Session mode resets on release (DISCARD ALL) before the connection is idle again:
    # taking the pool's one connection proves it came back.
    pool = h.server.pools["demo"]
    be = await asyncio.wait_for(pool.acquire(), HANG_S)
    pool.release(be)
    assert h.backends_in_use() == 0
