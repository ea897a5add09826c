"""Routes of the stream door: the WebSocket at /api/v1/stream and the dashboard page built on it."""

from __future__ import annotations

from fastapi import FastAPI, WebSocket

from sqlproxy.http.dashboard import install_dashboard
from sqlproxy.runtime import Runtime
from sqlproxy.stream.connection import StreamConnection
from sqlproxy.stream.frames import CLOSE_TRY_AGAIN, PROTOCOL


def install_stream_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.websocket("/api/v1/stream")
    async def stream(ws: WebSocket) -> None:
        if not runtime.config.current.stream.enabled:
            # The subprotocol is selected when offered, as on an open door: a browser fails a
            # handshake that drops it (1006) and would never see the close code.
            offered = ws.scope.get("subprotocols") or []
            await ws.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
            await ws.close(CLOSE_TRY_AGAIN, "the stream door is disabled")
            return
        await StreamConnection(runtime, runtime.stream, ws).run()

    install_dashboard(app)
