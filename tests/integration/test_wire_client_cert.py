"""Client certificates on the wire door: [wire] client_ca_file, client_crl_file,
require_client_cert and the users' wire_auth = "cert" / "cert+password", with psycopg (libpq's
sslcert/sslkey), asyncpg and a raw client; certificates and revocation lists made by
tests/pki.py (signed by the test CA, or by another one)."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from sqlproxy.auth.lockout import Lockout
from sqlproxy.config.loader import ConfigError
from sqlproxy.config.models import ProxyConfig, UserConfig
from sqlproxy.protocol.messages import AuthenticationSASL, ReadyForQuery
from sqlproxy.protocol.scram import make_verifier
from tests.fix_proxy import ProxyHarness
from tests.fix_wire import WireHarness
from tests.pki import Pki, make_pki
from tests.raw_wire import HANG_S, RawClient, fatal

WireFactory = Callable[..., Awaitable[WireHarness]]

CERT_PASSWORD = "cert-and-password-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("wire-client-cert"))


@dataclass
class CertDoor:
    h: WireHarness
    pki: Pki
    lockout: Lockout

    def dsn(
        self, user: str, cert_cn: str | None = None, *, signer: str = "ca", copy: str = "", **extra: str
    ) -> str:
        params = {
            "sslmode": "verify-full",
            "sslrootcert": str(self.pki.ca),
            "host": "localhost",
            "hostaddr": "127.0.0.1",
            **extra,
        }
        if cert_cn is not None:
            cert, key = self.pki.client_cert(cert_cn, signer=signer, copy=copy)
            params |= {"sslcert": str(cert), "sslkey": str(key)}
        else:
            # Not libpq's default ~/.postgresql/postgresql.crt, whatever the machine has.
            params["sslcert"] = "/nonexistent/client.crt"
        password = params.pop("password", None)
        if password is None:
            password = self.h.passwords.get(user, "")
        return self.h.dsn(user, password=password, **params)


@pytest_asyncio.fixture(loop_scope="session")
async def door(
    proxy: ProxyHarness, wire_factory: WireFactory, pki: Pki, demo_passwords: dict[str, str]
) -> AsyncIterator[CertDoor]:
    """The runtime's config with two certificate users (roles of the analyst) and the test CA
    as [wire] client_ca_file, validated as a config file would be; a TLS listener on it; a
    Lockout of the test's own. Everything is put back afterwards."""
    rt = proxy.runtime
    old = rt.config.current
    saved_lockout = rt.users.lockout
    users = dict(old.users)
    like = old.users["analyst"]
    users["cert_only"] = UserConfig(roles=like.roles, attributes=like.attributes, wire_auth="cert")
    users["cert_pw"] = UserConfig(
        roles=like.roles,
        attributes=like.attributes,
        wire_auth="cert+password",
        password=make_verifier(CERT_PASSWORD),
    )
    wire = old.wire.model_copy(
        update={"tls_cert": str(pki.cert), "tls_key": str(pki.key), "client_ca_file": str(pki.ca)}
    )
    new = ProxyConfig.model_validate({**old.model_dump(by_alias=True), "users": users, "wire": wire})
    rt.config.replace(new)
    lockout = Lockout(5, 300.0, 300.0)
    rt.users.lockout = lockout
    try:
        h = await wire_factory()
        yield CertDoor(h, pki, lockout)
    finally:
        rt.config.replace(old)
        rt.users.lockout = saved_lockout


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await asyncio.wait_for(psycopg.AsyncConnection.connect(dsn, autocommit=True), HANG_S)


async def _who(door: CertDoor, conn: psycopg.AsyncConnection[Any]) -> str:
    session = door.h.server._by_pid[conn.info.backend_pid]
    assert session.identity is not None
    cur = await conn.execute("SELECT current_setting('sqlproxy.user')")
    row = await cur.fetchone()
    assert row == (session.identity.name,)
    return session.identity.name


async def _unauthenticated(proxy: ProxyHarness) -> set[str]:
    await proxy.runtime.audit.flush()
    recs = await proxy.runtime.audit.store.query(decision="unauthenticated", limit=100_000)
    return {r.id for r in recs}


async def test_certificate_user_logs_in_without_password(door: CertDoor) -> None:
    async with await _connect(door.dsn("cert_only", "cert_only")) as conn:
        assert await _who(door, conn) == "cert_only"
        assert conn.pgconn.ssl_in_use
        cur = await conn.execute("SELECT id, email FROM customers ORDER BY id LIMIT 1")
        row = await cur.fetchone()
        assert row is not None and "***" in row[1]  # the analyst's policies apply
    # Direct TLS (sslnegotiation=direct) carries the certificate the same way.
    async with await _connect(door.dsn("cert_only", "cert_only", sslnegotiation="direct")) as conn:
        assert await _who(door, conn) == "cert_only"


async def test_certificate_user_refused_like_a_wrong_password(door: CertDoor, proxy: ProxyHarness) -> None:
    """No certificate, a certificate of another user, or no TLS at all: the same 28P01 as a
    wrong password (the client cannot tell), counted toward lockout and audited."""
    seen = await _unauthenticated(proxy)
    cases = [
        ("cert_only", door.dsn("cert_only", None, password="anything")),
        ("cert_only", door.dsn("cert_only", "analyst", password="anything")),
        ("cert_only", door.h.dsn("cert_only", password="anything", sslmode="disable")),
        ("cert_pw", door.dsn("cert_pw", None, password=CERT_PASSWORD)),
        ("cert_pw", door.dsn("cert_pw", "cert_only", password=CERT_PASSWORD)),
        ("cert_pw", door.dsn("cert_pw", "cert_pw", password="wrong")),
    ]
    for user, dsn in cases:
        with pytest.raises(psycopg.OperationalError) as ei:
            await _connect(dsn)
        assert f'FATAL:  password authentication failed for user "{user}"' in str(ei.value)
    # Without a password, libpq gives up when asked for one: still no login.
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        await _connect(door.dsn("cert_only", None))
    await proxy.runtime.audit.flush()
    new = [
        r
        for r in await proxy.runtime.audit.store.query(decision="unauthenticated", limit=100_000)
        if r.id not in seen and r.door == "wire"
    ]
    assert len(new) == len(cases)
    by_user: dict[str, list[Any]] = {}
    for r in new:
        assert r.sqlstate == "28P01"
        by_user.setdefault(r.extra["user_presented"], []).append(r)
    assert {r.extra["wire_auth"] for r in by_user["cert_only"]} == {"cert"}
    assert sorted(str(r.extra.get("client_cert_cn")) for r in by_user["cert_only"]) == [
        "None",
        "None",
        "analyst",
    ]
    assert {r.extra["wire_auth"] for r in by_user["cert_pw"]} == {"cert+password"}


async def test_certificate_and_password(door: CertDoor) -> None:
    async with await _connect(door.dsn("cert_pw", "cert_pw", password=CERT_PASSWORD)) as conn:
        assert await _who(door, conn) == "cert_pw"


async def test_lockout_covers_certificate_users(door: CertDoor, proxy: ProxyHarness) -> None:
    for _ in range(5):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await _connect(door.dsn("cert_only", "analyst", password="x"))
    # Locked: the right certificate is refused too, looking like any other failure.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await _connect(door.dsn("cert_only", "cert_only", password="x"))
    proxy.runtime.users.lockout = Lockout(5, 300.0, 300.0)  # lifted
    async with await _connect(door.dsn("cert_only", "cert_only")) as conn:
        assert await _who(door, conn) == "cert_only"


async def test_certificate_of_another_ca_fails_the_handshake(door: CertDoor) -> None:
    """A certificate the proxy does not trust ends the TLS handshake, for any user: it is
    never mistaken for no certificate."""
    for user, password in (("cert_only", ""), ("analyst", door.h.passwords["analyst"])):
        with pytest.raises(psycopg.OperationalError, match=r"SSL|certificate"):
            await _connect(door.dsn(user, user, signer="other-ca", password=password))
    assert door.h.server.active == 0


async def test_password_users_unaffected(door: CertDoor) -> None:
    """A password user logs in with its password, with or without a certificate (a
    certificate never replaces its password, whatever its CN)."""
    async with await _connect(door.dsn("analyst")) as conn:
        assert await _who(door, conn) == "analyst"
    async with await _connect(door.dsn("analyst", "analyst")) as conn:
        assert await _who(door, conn) == "analyst"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await _connect(door.dsn("analyst", "analyst", password="wrong"))
    async with await _connect(door.h.dsn("analyst")) as conn:  # no TLS at all
        assert await _who(door, conn) == "analyst"


async def test_asyncpg_with_a_certificate(door: CertDoor) -> None:
    cert, key = door.pki.client_cert("cert_only")
    ctx = ssl.create_default_context(cafile=str(door.pki.ca))
    ctx.load_cert_chain(str(cert), str(key))
    conn = await asyncio.wait_for(
        asyncpg.connect(host="localhost", port=door.h.port, user="cert_only", database="demo", ssl=ctx),
        HANG_S,
    )
    try:
        assert await conn.fetchval("SELECT current_setting('sqlproxy.user')") == "cert_only"
    finally:
        await conn.close()
    ctx = ssl.create_default_context(cafile=str(door.pki.ca))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncio.wait_for(
            asyncpg.connect(
                host="localhost", port=door.h.port, user="cert_only", password="x", database="demo", ssl=ctx
            ),
            HANG_S,
        )


async def test_raw_client_sees_no_password_prompt_only_with_the_right_certificate(door: CertDoor) -> None:
    ctx = door.pki.client_context()
    cert, key = door.pki.client_cert("cert_only")
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["postgresql"])
    raw = await RawClient.open_tls(door.h.port, ctx)
    msgs = await raw.login("cert_only", "")
    assert not any(isinstance(m, AuthenticationSASL) for m in msgs), msgs
    assert isinstance(msgs[-1], ReadyForQuery), msgs
    await raw.close()
    raw = await RawClient.open_tls(door.h.port, ctx)
    msgs = await raw.login("cert_pw", "wrong")
    assert isinstance(msgs[0], AuthenticationSASL)
    assert fatal(msgs).sqlstate == "28P01"
    await raw.close()


async def test_require_client_cert(wire_factory: WireFactory, door: CertDoor) -> None:
    """require_client_cert: no TLS handshake without a valid certificate, whoever the user;
    with one, password users still give their password."""
    h = await wire_factory(require_tls=True, require_client_cert=True)
    strict = CertDoor(h, door.pki, door.lockout)
    with pytest.raises(psycopg.OperationalError):
        await _connect(strict.dsn("analyst"))
    async with await _connect(strict.dsn("analyst", "analyst")) as conn:
        assert conn.pgconn.ssl_in_use
    async with await _connect(strict.dsn("cert_only", "cert_only")) as conn:
        assert conn.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="accepts only TLS"):
        await _connect(h.dsn("analyst", sslmode="disable"))


async def test_unreadable_client_ca_file_names_the_key(
    wire_factory: WireFactory, pki: Pki, tmp_path: Any
) -> None:
    for path in (tmp_path / "missing.crt", pki.key):  # absent; not a certificate
        with pytest.raises(ConfigError, match=r"wire\.client_ca_file: cannot load"):
            await wire_factory(tls_cert=str(pki.cert), tls_key=str(pki.key), client_ca_file=str(path))


async def _handshake_refused(dsn: str, caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """A client that connects with ``dsn`` fails the TLS handshake: (its error, the proxy's
    log of it)."""
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="sqlproxy.wire"),
        pytest.raises(psycopg.OperationalError, match=r"SSL|certificate") as ei,
    ):
        await _connect(dsn)
    return str(ei.value), "\n".join(r.getMessage() for r in caplog.records)


async def test_revoked_certificate_fails_the_handshake_like_an_untrusted_one(
    wire_factory: WireFactory, door: CertDoor, proxy: ProxyHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """With client_crl_file, a certificate its CRL revokes ends the TLS handshake exactly as
    one of an unknown CA does, for any user and either TLS negotiation: the same error for
    the client, no session, no audit record, no lockout count; the proxy's log says why.
    Another certificate of the same user, and a password user without one, still log in."""
    revoked = [door.pki.client_cert(cn, copy="revoked")[0] for cn in ("cert_only", "analyst")]
    h = await wire_factory(client_crl_file=str(door.pki.crl("leaf", *revoked)))
    crl_door = CertDoor(h, door.pki, door.lockout)
    seen = await _unauthenticated(proxy)
    for negotiation in ("postgres", "direct"):
        async with await _connect(crl_door.dsn("cert_only", "cert_only", sslnegotiation=negotiation)) as conn:
            assert await _who(crl_door, conn) == "cert_only"
        async with await _connect(crl_door.dsn("analyst", sslnegotiation=negotiation)) as conn:
            assert await _who(crl_door, conn) == "analyst"
        for user, password in (("cert_only", ""), ("analyst", h.passwords["analyst"])):
            failures: dict[str, tuple[str, str]] = {}
            for copy, signer in (("revoked", "ca"), ("", "other-ca")):
                dsn = crl_door.dsn(
                    user, user, signer=signer, copy=copy, password=password, sslnegotiation=negotiation
                )
                failures[signer] = await _handshake_refused(dsn, caplog)
            assert failures["ca"][0] == failures["other-ca"][0], failures
            assert "certificate revoked" in failures["ca"][1], failures
            assert "certificate revoked" not in failures["other-ca"][1], failures
    assert h.server.active == 0
    assert not h.server.sessions
    assert await _unauthenticated(proxy) == seen
    assert len(door.lockout) == 0


async def test_every_client_ca_needs_a_crl(
    wire_factory: WireFactory, door: CertDoor, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL checks a client certificate only against a CRL of its own CA: a CA of
    client_ca_file without one in client_crl_file has its certificates refused. One file may
    hold the CRLs of several CAs."""
    both_cas = pki.ca.parent / "both-cas.crt"
    both_cas.write_text(pki.ca.read_text() + pki.other_ca.read_text())
    revoked, _ = pki.client_cert("cert_only", signer="other-ca", copy="revoked")
    ca_crl = pki.crl("of-ca")
    h = await wire_factory(client_ca_file=str(both_cas), client_crl_file=str(ca_crl))
    d = CertDoor(h, pki, door.lockout)
    async with await _connect(d.dsn("cert_only", "cert_only")) as conn:
        assert await _who(d, conn) == "cert_only"
    _, log = await _handshake_refused(d.dsn("cert_only", "cert_only", signer="other-ca"), caplog)
    assert "unable to get certificate CRL" in log
    both_crls = pki.ca.parent / "both.crl"
    both_crls.write_text(ca_crl.read_text() + pki.crl("of-other-ca", revoked, signer="other-ca").read_text())
    h = await wire_factory(client_ca_file=str(both_cas), client_crl_file=str(both_crls))
    d = CertDoor(h, pki, door.lockout)
    for signer in ("ca", "other-ca"):
        async with await _connect(d.dsn("cert_only", "cert_only", signer=signer)) as conn:
            assert await _who(d, conn) == "cert_only"
    _, log = await _handshake_refused(
        d.dsn("cert_only", "cert_only", signer="other-ca", copy="revoked"), caplog
    )
    assert "certificate revoked" in log


async def test_unloadable_crl_file_names_the_key(
    wire_factory: WireFactory, door: CertDoor, pki: Pki, tmp_path: Any
) -> None:
    empty = tmp_path / "empty.crl"
    empty.write_text("")
    for path, reason in (
        (tmp_path / "missing.crl", "No such file"),
        (empty, "no certificate or crl found"),
        (pki.key, "no certificate or crl found"),
        (pki.other_ca, "it holds certificates"),  # it would have become a trusted client CA
    ):
        expected = rf"wire\.client_crl_file: cannot load {re.escape(str(path))}: .*{reason}"
        with pytest.raises(ConfigError, match=expected):
            await wire_factory(client_crl_file=str(path))
