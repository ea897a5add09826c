"""The /dashboard page: static HTML, CSS and JS served by the app. The page holds no data and no
secret; it logs in over the stream door with a key typed into it (kept in sessionStorage, never
in a URL) and renders the metrics and audit channels."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

_STATIC = resources.files("sqlproxy.http").joinpath("static")
_TYPES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# The page loads only its own script and style and talks only to its own origin's WebSocket.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _asset(name: str) -> Response:
    body = _STATIC.joinpath(name).read_bytes()
    return Response(
        body,
        media_type=_TYPES[name],
        headers={
            "Content-Security-Policy": _CSP,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


def install_dashboard(app: FastAPI) -> None:
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return _asset("dashboard.html")

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if name not in _TYPES or name == "dashboard.html":
            return Response(status_code=404)
        return _asset(name)
