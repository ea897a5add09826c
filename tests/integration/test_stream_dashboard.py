"""The dashboard page and its assets are served, with a strict content security policy."""

from __future__ import annotations

from tests.fix_stream import LiveProxy


async def test_dashboard_page_is_served_with_a_strict_csp(live: LiveProxy) -> None:
    r = await live.http.get("/dashboard")
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "/dashboard/dashboard.js" in r.text
    js = await live.http.get("/dashboard/dashboard.js")
    assert js.status_code == 200 and "WebSocket" in js.text
    assert (await live.http.get("/dashboard/secrets.txt")).status_code == 404
