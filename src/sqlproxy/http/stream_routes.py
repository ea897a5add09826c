"""Routes of the stream door: the WebSocket at /api/v1/stream and the dashboard page built on it."""

from __future__ import annotations

from fastapi import FastAPI, WebSocket

from sqlproxy.http.dashboard import install_dashboard
from sqlproxy.runtime import Runtime
from sqlproxy.stream.connection import StreamConnection
from sqlproxy.stream.frames import CLOSE_TRY_AGAIN


def install_stream_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.websocket("/api/v1/stream")
    async def stream(ws: WebSocket) -> None:
        if not runtime.config.current.stream.enabled:
            await ws.accept()
            await ws.close(CLOSE_TRY_AGAIN, "the stream door is disabled")
            return
        await StreamConnection(runtime, runtime.stream, ws).run()

    install_dashboard(app)
