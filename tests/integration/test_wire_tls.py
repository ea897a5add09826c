"""TLS on the wire door, with a throwaway CA and server certificate made here by the openssl
command: psycopg with sslmode=require / verify-full, require_tls, GSSENCRequest, cancel over
TLS, direct TLS (sslnegotiation=direct, ALPN "postgresql"), and the hostile cases of the
negotiation (unencrypted bytes after SSLRequest, a broken handshake, direct TLS without ALPN
or to a listener without TLS, garbage that starts like a TLS record); and reloads: a server
certificate rotated, files that cannot be loaded, TLS switched on and off."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sqlproxy.config.loader import ConfigError
from sqlproxy.protocol.messages import (
    CancelRequest,
    ErrorResponse,
    NoticeResponse,
    ReadyForQuery,
    StartupMessage,
)
from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireHarness, reload_wire
from tests.pki import Pki, make_pki
from tests.raw_wire import HANG_S, ROBUST_SQL, RawClient, errors, fatal, lock_key, query, session_ended

WireFactory = Callable[..., Awaitable[WireHarness]]

_SSL_REQUEST = struct.pack("!II", 8, 80877103)
_GSSENC_REQUEST = struct.pack("!II", 8, 80877104)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("wire-tls"))


async def _tls_wire(wire_factory: WireFactory, pki: Pki, **overrides: Any) -> WireHarness:
    return await wire_factory(tls_cert=str(pki.cert), tls_key=str(pki.key), **overrides)


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await asyncio.wait_for(psycopg.AsyncConnection.connect(dsn, autocommit=True), HANG_S)


async def _check_encrypted(h: WireHarness, conn: psycopg.AsyncConnection[Any]) -> None:
    assert conn.pgconn.ssl_in_use
    # The proxy's side agrees: this client's session runs over TLS.
    session = h.server._by_pid[conn.info.backend_pid]
    assert session.tls
    assert session.transport is not None
    tls = session.transport.get_extra_info("ssl_object")
    assert isinstance(tls, ssl.SSLObject)
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    cur = await conn.execute("SELECT id, email FROM customers ORDER BY id LIMIT 1")
    row = await cur.fetchone()
    assert row is not None and "***" in row[1]  # the pipeline still masks for the analyst


async def test_sslmode_require_is_encrypted(wire_factory: WireFactory, pki: Pki) -> None:
    h = await _tls_wire(wire_factory, pki)
    async with await _connect(h.dsn("analyst", sslmode="require")) as conn:
        await _check_encrypted(h, conn)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_sslmode_verify_full(wire_factory: WireFactory, pki: Pki, host: str) -> None:
    h = await _tls_wire(wire_factory, pki)
    dsn = h.dsn("analyst", sslmode="verify-full", sslrootcert=str(pki.ca), host=host, hostaddr="127.0.0.1")
    async with await _connect(dsn) as conn:
        await _check_encrypted(h, conn)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"sslrootcert": "OTHER"}, "certificate verify failed"),
        ({"host": "sqlproxy.invalid"}, "does not match host name"),
    ],
)
async def test_verify_full_refuses_the_wrong_server(
    wire_factory: WireFactory, pki: Pki, extra: dict[str, str], reason: str
) -> None:
    """The negative control for verify-full: the client really checks what the proxy shows."""
    h = await _tls_wire(wire_factory, pki)
    params = {"sslrootcert": str(pki.ca), "host": "127.0.0.1", "hostaddr": "127.0.0.1", **extra}
    if params["sslrootcert"] == "OTHER":
        params["sslrootcert"] = str(pki.other_ca)
    with pytest.raises(psycopg.OperationalError, match=reason):
        await _connect(h.dsn("analyst", sslmode="verify-full", **params))


async def test_require_tls_refuses_plaintext_with_a_clear_fatal(wire_factory: WireFactory, pki: Pki) -> None:
    h = await _tls_wire(wire_factory, pki, require_tls=True)
    with pytest.raises(psycopg.OperationalError, match="accepts only TLS"):
        await _connect(h.dsn("analyst", sslmode="disable"))
    raw = await RawClient.open(h.port)
    raw.send(StartupMessage.build({"user": "analyst", "database": "demo"}).encode())
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "28000"
    assert "sslmode=require" in (err.message or "")
    await raw.close()
    # TLS clients are welcome, whether they insist on it or merely prefer it.
    for mode in ("require", "prefer"):
        async with await _connect(h.dsn("analyst", sslmode=mode)) as conn:
            await _check_encrypted(h, conn)


async def test_plaintext_listener_answers_ssl_request_no(wire: WireHarness) -> None:
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        await _connect(wire.dsn("analyst", sslmode="require"))
    async with await _connect(wire.dsn("analyst", sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_gssenc_request_is_answered_no(wire: WireHarness, wire_factory: WireFactory, pki: Pki) -> None:
    # Plain listener: GSS 'N', then SSL 'N', then an ordinary login.
    raw = await RawClient.open(wire.port)
    raw.send(_GSSENC_REQUEST)
    assert await raw.read_byte() == b"N"
    raw.send(_SSL_REQUEST)
    assert await raw.read_byte() == b"N"
    msgs = await raw.login("analyst", wire.passwords["analyst"])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    raw.send(query("SELECT 1"))
    assert not errors(await raw.until_ready())
    await raw.close()
    # TLS listener: GSS 'N', then SSL 'S', then a login inside TLS.
    h = await _tls_wire(wire_factory, pki, require_tls=True)
    raw = await RawClient.open(h.port)
    raw.send(_GSSENC_REQUEST)
    assert await raw.read_byte() == b"N"
    raw.send(_SSL_REQUEST)
    assert await raw.read_byte() == b"S"
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    await raw.start_tls(ctx, server_hostname="localhost")
    msgs = await raw.login("analyst", h.passwords["analyst"])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    await raw.close()
    # libpq with gssencmode=prefer (it asks only when it has Kerberos credentials).
    for harness, mode in ((wire, "disable"), (h, "require")):
        async with await _connect(harness.dsn("analyst", gssencmode="prefer", sslmode=mode)) as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


async def test_unencrypted_bytes_after_ssl_request_are_refused(wire_factory: WireFactory, pki: Pki) -> None:
    """CVE-2021-23214: bytes sent together with SSLRequest, before the handshake, could have
    been injected by a man in the middle; the proxy refuses instead of reading them later as
    if they had come through TLS."""
    h = await _tls_wire(wire_factory, pki)
    raw = await RawClient.open(h.port)
    raw.send(_SSL_REQUEST + StartupMessage.build({"user": "analyst", "database": "demo"}).encode())
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "08P01"
    assert "unencrypted data after SSL request" in (err.message or "")
    await raw.close()


async def test_broken_tls_handshake(
    wire_factory: WireFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that asks for TLS and then sends garbage or vanishes mid-handshake ends only
    its own connection, quietly; TLS clients around it go on."""
    h = await _tls_wire(wire_factory, pki)
    async with await _connect(h.dsn("analyst", sslmode="require")) as bystander:
        for garbage in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", b""):
            raw = await RawClient.open(h.port)
            raw.send(_SSL_REQUEST)
            assert await raw.read_byte() == b"S"
            with caplog.at_level(logging.ERROR, logger="sqlproxy.wire"):
                if garbage:
                    raw.send(garbage)
                else:
                    raw.writer.write_eof()
                rest = await asyncio.wait_for(raw.reader.read(), HANG_S)
            await raw.close()
            # Nothing a TLS client could read: the proxy answers in TLS or not at all.
            assert not rest.startswith(b"E"), rest
            cur = await bystander.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert not [r for r in caplog.records if r.name.startswith("sqlproxy.wire")], caplog.records
        session = h.server._by_pid[bystander.info.backend_pid]
    await session_ended(session)
    assert h.server.active == 0
    assert not h.server.sessions


def _alpn_context(pki: Pki, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = pki.client_context()
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def _leaves_quietly(raw: RawClient) -> None:
    """The proxy closes the connection without a word (no PostgreSQL message, TLS or not)."""
    try:
        rest = await asyncio.wait_for(raw.reader.read(), HANG_S)
    except (ConnectionResetError, ssl.SSLError):
        rest = b""
    assert rest == b"", rest
    await raw.close()


@pytest.mark.parametrize("require_tls", [False, True])
async def test_direct_tls_with_libpq(wire_factory: WireFactory, pki: Pki, require_tls: bool) -> None:
    """libpq 17+'s sslnegotiation=direct starts with a TLS ClientHello (ALPN "postgresql")
    instead of SSLRequest; the proxy takes it, with or without require_tls, and verify-full
    checks the proxy's certificate as on the negotiated path."""
    assert psycopg.pq.version() >= 170000, "psycopg's libpq has no sslnegotiation=direct"
    h = await _tls_wire(wire_factory, pki, require_tls=require_tls)
    for extra in (
        {"sslmode": "require"},
        {"sslmode": "verify-full", "sslrootcert": str(pki.ca), "host": "localhost", "hostaddr": "127.0.0.1"},
    ):
        async with await _connect(h.dsn("analyst", sslnegotiation="direct", **extra)) as conn:
            await _check_encrypted(h, conn)
            session = h.server._by_pid[conn.info.backend_pid]
            assert session.transport is not None
            tls = session.transport.get_extra_info("ssl_object")
            assert tls.selected_alpn_protocol() == "postgresql"
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        await _connect(
            h.dsn("analyst", sslnegotiation="direct", sslmode="verify-full", sslrootcert=str(pki.other_ca))
        )
    # The negotiated path offers ALPN too (libpq 17+ sends it there as well).
    async with await _connect(h.dsn("analyst", sslmode="require")) as conn:
        session = h.server._by_pid[conn.info.backend_pid]
        assert session.transport is not None
        assert session.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"


async def test_direct_tls_raw_client_needs_alpn(
    wire_factory: WireFactory, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw TLS client: with ALPN "postgresql" it logs in; without ALPN, or offering only
    another protocol, the proxy closes the connection after the handshake without a word, as
    PostgreSQL 17 does. An SSLRequest inside direct TLS is a protocol violation."""
    h = await _tls_wire(wire_factory, pki, require_tls=True)
    raw = await RawClient.open_tls(h.port, _alpn_context(pki, ["postgresql"]))
    msgs = await raw.login("analyst", h.passwords["analyst"])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    raw.send(query("SELECT 1"))
    assert not errors(await raw.until_ready())
    await raw.close()
    with caplog.at_level(logging.INFO, logger="sqlproxy.wire"):
        for alpn in (None, ["http/1.1"]):
            raw = await RawClient.open_tls(h.port, _alpn_context(pki, alpn))
            assert raw.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
            await _leaves_quietly(raw)
    assert sum("no ALPN" in r.getMessage() for r in caplog.records) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    raw = await RawClient.open_tls(h.port, _alpn_context(pki, ["postgresql"]))
    raw.send(_SSL_REQUEST)
    err = fatal(await raw.until_eof())
    assert err.sqlstate == "08P01" and "duplicate SSLRequest" in (err.message or "")
    await raw.close()
    await _all_gone(h)


async def _all_gone(h: WireHarness) -> None:
    for s in list(h.server.sessions):
        await session_ended(s)
    assert h.server.active == 0
    assert not h.server.sessions
    assert h.backends_in_use() == 0


_CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


@pytest.mark.parametrize("tls", [True, False])
async def test_direct_tls_garbage_closes_quietly(
    wire_factory: WireFactory, pki: Pki, tls: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that start like a TLS record (0x16) but are garbage, cut short, or a ClientHello
    to a listener without TLS: the connection is closed without a PostgreSQL message, nothing
    is logged as an error, and a session around it goes on."""
    h = await (
        _tls_wire(wire_factory, pki, startup_timeout_s=2) if tls else wire_factory(startup_timeout_s=2)
    )
    async with await _connect(h.dsn("analyst", sslmode="require" if tls else "disable")) as bystander:
        with caplog.at_level(logging.INFO, logger="sqlproxy.wire"):
            for garbage, eof in (
                (b"\x16" + b"\xff" * 300, False),  # not a TLS record: refused at once
                (b"\x16", True),  # a record cut short, then the client half-closes
                (_CLIENT_HELLO_START + b"\x00" * 40, True),
                (_CLIENT_HELLO_START, False),  # ... or falls silent: startup_timeout_s
            ):
                raw = await RawClient.open(h.port)
                raw.send(garbage)
                if eof:
                    raw.writer.write_eof()
                await _leaves_quietly(raw)
            if not tls:
                # A real ClientHello, offering ALPN "postgresql", to a plaintext listener.
                with pytest.raises((ConnectionError, ssl.SSLError)):
                    await RawClient.open_tls(h.port, _alpn_context(pki, ["postgresql"]))
                with pytest.raises(psycopg.OperationalError):
                    await _connect(h.dsn("analyst", sslmode="require", sslnegotiation="direct"))
            cur = await bystander.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
        session = h.server._by_pid[bystander.info.backend_pid]
    await session_ended(session)
    await _all_gone(h)


async def test_first_byte_late_or_never(wire_factory: WireFactory, pki: Pki) -> None:
    """A client whose first byte is not there when the connection is accepted waits with the
    listener (which peeks it without reading): a late startup packet logs in as usual, over
    the negotiated TLS path too; a client that never says a word is dropped at shutdown."""
    h = await _tls_wire(wire_factory, pki)
    raw = await RawClient.open(h.port)
    await asyncio.sleep(0.2)
    assert len(h.server._routing) == 1
    msgs = await raw.login("analyst", h.passwords["analyst"])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    assert not h.server._routing
    await raw.close()
    raw = await RawClient.open(h.port)
    await asyncio.sleep(0.2)
    raw.send(_SSL_REQUEST)
    assert await raw.read_byte() == b"S"
    await raw.start_tls(pki.client_context(), server_hostname="localhost")
    msgs = await raw.login("analyst", h.passwords["analyst"])
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    await raw.close()
    silent = await RawClient.open(h.port)
    await asyncio.sleep(0.2)
    assert len(h.server._routing) == 1
    await h.server.stop(grace_s=1)
    assert not h.server._routing
    assert await asyncio.wait_for(silent.reader.read(), HANG_S) == b""
    await silent.close()


async def test_cancel_over_tls(wire_factory: WireFactory, pki: Pki, demo_dsn: str) -> None:
    """libpq 17+ (psycopg's cancel_safe) sends its CancelRequest on a connection of its own,
    over TLS when sslmode asks for it; the proxy routes it to the right session."""
    with psycopg.connect(demo_dsn, autocommit=True) as c:
        c.execute(ROBUST_SQL)
    h = await _tls_wire(wire_factory, pki, require_tls=True)
    running = asyncio.Event()
    async with await _connect(h.dsn("admin", sslmode="require")) as conn:
        conn.add_notice_handler(lambda _d: running.set())
        task = asyncio.create_task(conn.execute(f"SELECT robust.hold({lock_key()}, 3600)"))
        await asyncio.wait_for(running.wait(), HANG_S)
        await asyncio.wait_for(conn.cancel_safe(), HANG_S)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(task, HANG_S)
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_plaintext_cancel_reaches_a_tls_session(
    wire_factory: WireFactory, pki: Pki, demo_dsn: str
) -> None:
    """The old PQcancel sends CancelRequest in plaintext even for a TLS connection, and
    PostgreSQL accepts it whatever its TLS rules; so does a require_tls proxy. (psycopg's
    conn.cancel() holds the GIL while it waits, so in this process, which also runs the proxy,
    a raw client sends what PQcancel sends.) A wrong key is ignored the same quiet way."""
    with psycopg.connect(demo_dsn, autocommit=True) as setup:
        setup.execute(ROBUST_SQL)
    h = await _tls_wire(wire_factory, pki, require_tls=True)
    raw = await RawClient.open(h.port)
    raw.send(_SSL_REQUEST)
    assert await raw.read_byte() == b"S"
    await raw.start_tls(ssl.create_default_context(cafile=str(pki.ca)), server_hostname="localhost")
    msgs = await raw.login("admin", h.passwords["admin"])
    assert isinstance(msgs[-1], ReadyForQuery) and raw.key is not None, msgs
    raw.send(query(f"SELECT robust.hold({lock_key()}, 3600)"))
    while not isinstance(msg := await raw.recv(), NoticeResponse):  # robust.hold runs upstream
        assert msg is not None and not isinstance(msg, ErrorResponse), msg
    for pid, secret in ((1, b"\0\0\0\0"), (raw.key.process_id, raw.key.secret_key)):
        c = await RawClient.open(h.port)
        c.send(CancelRequest(pid, secret).encode())
        assert await c.until_eof() == []
        await c.close()
    msgs = await raw.until_ready()
    (err,) = errors(msgs)
    assert err.sqlstate == "57014"
    await raw.close()


# ------------------------------------------------------------------------------ reloads


def _verify_full(h: WireHarness, ca: Path, **extra: str) -> str:
    return h.dsn(
        "analyst", sslmode="verify-full", sslrootcert=str(ca), host="localhost", hostaddr="127.0.0.1", **extra
    )


def _tls_files(pki: Pki, d: Path) -> tuple[Path, Path]:
    """A copy of the server certificate and key in ``d``, for a test to replace in place."""
    cert, key = d / "wire.crt", d / "wire.key"
    cert.write_bytes(pki.cert.read_bytes())
    key.write_bytes(pki.key.read_bytes())
    return cert, key


async def test_reload_rotates_the_server_certificate(
    wire_following: WireFactory, proxy: ProxyHarness, pki: Pki, tmp_path: Path
) -> None:
    """A certificate and key replaced in place are read again on a reload: new connections
    see the new certificate (verify-full against the new CA, on either TLS negotiation),
    sessions already open keep theirs. Until the reload the old one is served."""
    cert, key = _tls_files(pki, tmp_path)
    h = await wire_following(tls_cert=str(cert), tls_key=str(key))
    async with await _connect(_verify_full(h, pki.ca)) as before:
        new_d = tmp_path / "new-pki"
        new_d.mkdir()
        new_pki = make_pki(new_d)
        cert.write_bytes(new_pki.cert.read_bytes())
        key.write_bytes(new_pki.key.read_bytes())
        async with await _connect(_verify_full(h, pki.ca)) as conn:
            await _check_encrypted(h, conn)  # not read again until the reload
        reload_wire(proxy.runtime)
        for negotiation in ("postgres", "direct"):
            async with await _connect(_verify_full(h, new_pki.ca, sslnegotiation=negotiation)) as conn:
                await _check_encrypted(h, conn)
            with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
                await _connect(_verify_full(h, pki.ca, sslnegotiation=negotiation))
        # The session opened before goes on, with the settings it was accepted with.
        await _check_encrypted(h, before)
        session = h.server._by_pid[before.info.backend_pid]
        assert session.door.ssl_context is not None
        assert session.door.ssl_context is not h.server.ssl_context


def _encrypted_copy(key: Path, d: Path) -> Path:
    out = d / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


async def test_reload_with_a_file_that_cannot_be_loaded_is_refused(
    wire_following: WireFactory, proxy: ProxyHarness, pki: Pki, tmp_path: Path
) -> None:
    """A certificate, key, client CA file or CRL file that cannot be loaded refuses the whole
    reload with a ConfigError naming its key: the configuration, the runtime's services and
    the listener's TLS context stay as they were, and the old certificate is still served."""
    cert, key = _tls_files(pki, tmp_path)
    h = await wire_following(tls_cert=str(cert), tls_key=str(key))
    rt = proxy.runtime
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tls_key": str(garbage)}, "wire.tls_key", "PEM private key of tls_cert"),
        ({"tls_key": str(tmp_path / "missing.key")}, "wire.tls_key", "No such file"),
        ({"tls_key": str(pki.ca.parent / "other-ca.key")}, "wire.tls_key", "key values mismatch"),
        ({"tls_key": str(_encrypted_copy(key, tmp_path))}, "wire.tls_key", "encrypted"),
        ({"tls_cert": str(tmp_path / "missing.crt")}, "wire.tls_cert", "No such file"),
        ({"tls_cert": str(key)}, "wire.tls_cert", "no certificate or crl found"),
        ({"client_ca_file": str(key)}, "wire.client_ca_file", "no certificate or crl found"),
        ({"client_ca_file": str(garbage)}, "wire.client_ca_file", "PEM lib"),
        (
            {"client_ca_file": str(pki.ca), "client_crl_file": str(pki.other_ca)},
            "wire.client_crl_file",
            "it holds certificates",
        ),
    ]
    for settings, path, reason in cases:
        config, services, door, generation = (
            rt.config.current,
            rt.services,
            h.server.door,
            rt.config.generation,
        )
        with pytest.raises(ConfigError) as ei:
            reload_wire(rt, **settings)
        assert [p.path for p in ei.value.problems] == [path], settings
        assert reason in ei.value.problems[0].reason, ei.value.problems
        assert rt.config.current is config and rt.config.generation == generation
        assert rt.services is services and h.server.door is door
    # The key file itself broken in place: refused too, and the old certificate still served.
    key.write_bytes(garbage.read_bytes())
    with pytest.raises(ConfigError, match=r"wire\.tls_key: cannot load"):
        reload_wire(rt)
    async with await _connect(_verify_full(h, pki.ca)) as conn:
        await _check_encrypted(h, conn)


async def test_tls_switched_on_and_off_by_reload(
    wire_following: WireFactory, proxy: ProxyHarness, pki: Pki
) -> None:
    """TLS switched on by a reload (with require_tls): new connections negotiate it, either
    way, and plaintext ones are refused; switched off: SSLRequest is answered N and direct TLS
    closed, as on a listener that never had TLS. Either way sessions already open go on as
    they started, as PostgreSQL's do when its ssl settings are reloaded."""
    rt = proxy.runtime
    h = await wire_following()
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        await _connect(h.dsn("analyst", sslmode="require"))
    async with await _connect(h.dsn("analyst")) as plain:
        reload_wire(rt, tls_cert=str(pki.cert), tls_key=str(pki.key), require_tls=True)
        async with await _connect(_verify_full(h, pki.ca)) as tls_conn:
            await _check_encrypted(h, tls_conn)
            async with await _connect(_verify_full(h, pki.ca, sslnegotiation="direct")) as conn:
                await _check_encrypted(h, conn)
            with pytest.raises(psycopg.OperationalError, match="accepts only TLS"):
                await _connect(h.dsn("analyst", sslmode="disable"))
            cur = await plain.execute("SELECT 1")  # opened before: still served, in plaintext
            assert await cur.fetchone() == (1,)
            assert not plain.pgconn.ssl_in_use
            reload_wire(rt, tls_cert=None, tls_key=None, require_tls=False)
            with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
                await _connect(h.dsn("analyst", sslmode="require"))
            with pytest.raises(psycopg.OperationalError):
                await _connect(h.dsn("analyst", sslmode="require", sslnegotiation="direct"))
            async with await _connect(h.dsn("analyst", sslmode="prefer")) as conn:
                assert not conn.pgconn.ssl_in_use
            await _check_encrypted(h, tls_conn)  # opened before: still over TLS


async def test_a_stopped_listener_ignores_reloads(
    wire_following: WireFactory, proxy: ProxyHarness, pki: Pki, tmp_path: Path
) -> None:
    """The holder keeps the listener's registration after it stopped: it neither refuses a
    reload nor builds anything for one."""
    h = await wire_following(tls_cert=str(pki.cert), tls_key=str(pki.key))
    door = h.server.door
    await h.server.stop(grace_s=1)
    reload_wire(proxy.runtime, tls_key=str(tmp_path / "missing.key"))
    assert h.server.door is door
