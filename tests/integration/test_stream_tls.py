"""HTTPS and wss:// on the HTTP door: [server] tls_cert / tls_key, a client that verifies the
certificate streams audit records; a plain-text client and an untrusting client get nothing."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from tests.fix_stream import LiveProxy, start_live_proxy
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("http-tls"))


@pytest_asyncio.fixture(loop_scope="session")
async def tls_proxy(
    demo_dsn: str, tmp_path_factory: pytest.TempPathFactory, demo_keys: dict[str, str], pki: Pki
) -> AsyncIterator[LiveProxy]:
    proxy = await start_live_proxy(
        tmp_path_factory.mktemp("stream-tls"),
        demo_dsn,
        demo_keys,
        server_toml=f'tls_cert = "{pki.cert}"\ntls_key = "{pki.key}"\n',
        client_tls=pki.client_context(),
    )
    yield proxy
    await proxy.stop()


async def test_wss_streams_the_audit_channel(tls_proxy: LiveProxy) -> None:
    assert tls_proxy.ws_url.startswith("wss://")
    c = await tls_proxy.ws("admin")
    await c.ready()
    assert c.conn.transport.get_extra_info("ssl_object") is not None
    await c.send({"type": "subscribe", "channel": "audit", "id": "a", "filters": {"user": "developer"}})
    await c.recv_type("live", "a")
    r = await tls_proxy.query("developer", "SELECT 41 + 1 AS answer")
    assert r.status_code == 200 and r.json()["results"][0]["rows"] == [[42]]
    recs = await c.audit_until("a", lambda rec: rec["id"] == r.json()["id"])
    assert recs[-1]["user"] == "developer"
    await c.close()


async def test_plain_text_and_untrusted_clients_get_nothing(tls_proxy: LiveProxy, pki: Pki) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{tls_proxy.port}", timeout=10) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get("/health")
    untrusting = ssl.create_default_context(cafile=str(pki.other_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(tls_proxy.ws_url, ssl=untrusting, additional_headers=tls_proxy.auth("admin"))


def test_half_a_tls_pair_is_a_config_error() -> None:
    from sqlproxy.config.loader import ConfigError, parse_config

    with pytest.raises(ConfigError) as ei:
        parse_config({"server": {"tls_cert": "/x.pem"}})
    assert "tls_cert and tls_key go together" in str(ei.value)
    assert ei.value.problems[0].path.startswith("server")
