"""Running the proxy: the runtime, the HTTP door on uvicorn, SIGHUP reload, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Mapping

import uvicorn
from fastapi import FastAPI

from sqlproxy.config.loader import ConfigError, ConfigHolder
from sqlproxy.gctune import tune_gc
from sqlproxy.http.app import create_app
from sqlproxy.runtime import Runtime
from sqlproxy.wire.listener import WireServer
from sqlproxy.wire.workers import WireWorkers

log = logging.getLogger("sqlproxy")


def build_app(
    holder: ConfigHolder, env: Mapping[str, str] | None = None, *, own_process: bool = False
) -> FastAPI:
    """The proxy as an ASGI app with the wire door alongside. ``own_process``: the app is the
    process (``sqlproxy serve``), so it may tune the process-wide garbage collector."""
    runtime = Runtime(holder, env)
    app = create_app(runtime)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            try:
                runtime.reload()
                log.info("configuration reloaded from %s", holder.path)
            except ConfigError as e:
                log.error("reload refused, running configuration unchanged:\n%s", e)

        # Before the wire door opens: once a client can connect, a SIGHUP must be a reload,
        # never its default action (the end of the process), even while wire workers start.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        wire = None
        try:
            wire = wire_door(runtime, env)
            if wire is not None:
                await wire.start()
                runtime.wire_status = wire.status
            if own_process:
                tune_gc()
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            if wire is not None:
                await wire.stop()  # finish transactions up to wire.shutdown_grace_s first
            await runtime.close()

    app.router.lifespan_context = lifespan
    return app


def wire_door(runtime: Runtime, env: Mapping[str, str] | None = None) -> WireServer | WireWorkers | None:
    """The wire door the configuration asks for: none, in this process, or worker processes."""
    wire = runtime.config.current.wire
    if not wire.enabled:
        return None
    if wire.workers > 1:
        return WireWorkers(runtime, wire.workers, env)
    return WireServer(runtime)


def uvicorn_config(app: FastAPI, holder: ConfigHolder, log_level: str = "info") -> uvicorn.Config:
    """The HTTP door's server settings from the proxy's config (serve() and the tests share it)."""
    srv = holder.current.server
    return uvicorn.Config(
        app,
        host=srv.http_host,
        port=srv.http_port,
        log_level=log_level,
        loop="uvloop",
        access_log=False,  # the audit log is the access log; uvicorn's would print query strings
        timeout_graceful_shutdown=10,
        ssl_certfile=srv.tls_cert,
        ssl_keyfile=srv.tls_key,
    )


class ProxyServer(uvicorn.Server):
    """uvicorn's server, telling stream clients it is going away (close 1001) before it closes
    their connections its own way (1012, "service restart")."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        runtime = getattr(getattr(self.config.app, "state", None), "runtime", None)
        if isinstance(runtime, Runtime):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runtime.stream.close_all(), 5.0)
        await super().shutdown(sockets)


def serve(holder: ConfigHolder, env: Mapping[str, str] | None = None, log_level: str = "info") -> None:
    app = build_app(holder, env, own_process=True)
    ProxyServer(uvicorn_config(app, holder, log_level)).run()
