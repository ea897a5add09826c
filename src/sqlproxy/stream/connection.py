"""One WebSocket connection on /api/v1/stream: authentication, the frame loop, and its
subscriptions (audit, query, metrics). docs/stream.md describes the protocol for clients.

Sends from the subscriptions' tasks are serialised by one lock; every send awaits the socket, so
TCP back-pressure reaches the task that produced the frame and nothing else: a query stops
reading from its cursor, an audit subscription's bounded queue fills (and it is closed as
lagging), a metrics subscription just sends its next snapshot later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from sqlproxy.pipeline.errors import ProxyError, Unauthenticated
from sqlproxy.pipeline.request import Request
from sqlproxy.stream.frames import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN,
    CLOSE_UNSUPPORTED,
    PROTOCOL,
    AuthFrame,
    CancelFrame,
    FrameError,
    MoreFrame,
    PingFrame,
    SubscribeAudit,
    SubscribeMetrics,
    SubscribeQuery,
    UnsubscribeFrame,
    encode,
    error_frame,
    parse_client_frame,
)

if TYPE_CHECKING:
    from sqlproxy.auth.users import Identity
    from sqlproxy.runtime import Runtime
    from sqlproxy.stream.hub import StreamHub

log = logging.getLogger(__name__)

# What a failed send can raise once the peer is gone, depending on the ASGI server.
_SEND_ERRORS = (WebSocketDisconnect, OSError, RuntimeError)


class Subscription:
    """Base of the three channels: owned by one connection, stopped when it goes."""

    channel = ""

    def __init__(self, conn: StreamConnection, sub_id: str) -> None:
        self.conn = conn
        self.id = sub_id
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run_guarded(), name=f"stream-{self.channel}-{self.id}")

    async def _run_guarded(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream subscription %s (%s) failed", self.id, self.channel)
            await self.conn.send(error_frame("internal_error", "the subscription failed", self.id))
        finally:
            self.conn.forget(self)

    async def run(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class StreamConnection:
    def __init__(self, runtime: Runtime, hub: StreamHub, ws: WebSocket) -> None:
        self.rt = runtime
        self.hub = hub
        self.ws = ws
        self.cfg = runtime.config.current.stream
        client = ws.client
        self.source_ip = client.host if client else "unknown"
        self.source_port = client.port if client else None
        self.identity: Identity | None = None
        self.all_audit = False
        self.subs: dict[str, Subscription] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False
        self.close_code: int | None = None

    # -- sending ---------------------------------------------------------------------------------
    async def send(self, frame: dict[str, Any]) -> bool:
        """Send one frame; False once the connection is closed or closing."""
        if self.closed:
            return False
        text = encode(frame)
        async with self._send_lock:
            if self.closed:
                return False
            try:
                await self.ws.send_text(text)
            except _SEND_ERRORS:
                self.closed = True
                return False
        return True

    async def close(self, code: int, reason: str = "") -> None:
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
            self.close_code = code
            with contextlib.suppress(*_SEND_ERRORS):
                # A close reason is at most 123 bytes of UTF-8 (RFC 6455 section 5.5).
                await self.ws.close(code, reason.encode("utf-8")[:123].decode("utf-8", "ignore"))

    def forget(self, sub: Subscription) -> None:
        if self.subs.get(sub.id) is sub:
            del self.subs[sub.id]

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        offered = self.ws.scope.get("subprotocols") or []
        await self.ws.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
        if self.hub.connections >= self.cfg.max_connections:
            await self.send(error_frame("too_many_connections", "the stream connection limit is reached"))
            await self.close(CLOSE_TRY_AGAIN, "too many connections")
            return
        self.hub.connections += 1
        self.hub.live.add(self)
        heartbeat: asyncio.Task[None] | None = None
        try:
            if not await self._authenticate():
                return
            heartbeat = asyncio.create_task(self._heartbeat(), name="stream-heartbeat")
            await self._read_loop()
        finally:
            self.hub.connections -= 1
            self.hub.live.discard(self)
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            self.closed = True
            for sub in list(self.subs.values()):
                await sub.stop()

    async def shutdown(self) -> None:
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

    def _bearer(self) -> str | None:
        auth = self.ws.headers.get("authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    async def _authenticate(self) -> bool:
        token = self._bearer()
        if token is None:
            # Browsers cannot set headers on a WebSocket: the key comes as the first frame, so it
            # is never in a URL, a proxy's access log or the browser history.
            try:
                async with asyncio.timeout(self.cfg.auth_timeout_s):
                    msg = await self.ws.receive()
            except TimeoutError:
                return await self._auth_failed(Unauthenticated("authentication timed out"), "auth timeout")
            if msg["type"] == "websocket.disconnect":
                return False
            text = msg.get("text")
            frame: Any = None
            if isinstance(text, str) and not self._too_big(text):
                with contextlib.suppress(FrameError):
                    frame = parse_client_frame(text)
            if not isinstance(frame, AuthFrame):
                return await self._auth_failed(
                    Unauthenticated(
                        "missing credentials: send Authorization: Bearer <api key> or a first frame "
                        '{"type": "auth", "token": "<api key>"}'
                    ),
                    "authentication required",
                )
            token = frame.token
        result = self.rt.users.authenticate_api_key(token, self.source_ip)
        req = self._admin_request("stream_connect")
        if result.identity is None:
            return await self._auth_failed(Unauthenticated("invalid credentials"), "invalid credentials", req)
        self.identity = result.identity
        req.identity = result.identity
        await self.rt.audit_request(req)
        self.all_audit = self.rt.can_read_all_audit(result.identity.roles, result.identity.admin)
        await self.send(
            {
                "type": "ready",
                "protocol": PROTOCOL,
                "user": result.identity.name,
                "node": self.hub.node_id,
                "heartbeat_s": self.cfg.heartbeat_s,
                "audit_scope": "all" if self.all_audit else "own",
                "channels": ["audit", "query", "metrics"] if self.all_audit else ["audit", "query"],
            }
        )
        return True

    def _admin_request(self, action: str) -> Request:
        return Request(
            door="ws",
            sql=None,
            source_ip=self.source_ip,
            source_port=self.source_port,
            extra={"action": action},
        )

    async def _auth_failed(self, err: ProxyError, reason: str, req: Request | None = None) -> bool:
        req = req or self._admin_request("stream_connect")
        req.error = err
        await self.rt.audit_request(req)
        await self.send(error_frame(err.code, err.message))
        await self.close(CLOSE_POLICY, reason)
        return False

    async def _heartbeat(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.cfg.heartbeat_s)
            ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            if not await self.send({"type": "heartbeat", "ts": ts}):
                return

    def _too_big(self, text: str) -> bool:
        """Over ``max_frame_bytes`` in UTF-8, as the frame came (not in characters: one may be
        four bytes). Short texts are not encoded to be measured."""
        limit = self.cfg.max_frame_bytes
        n = len(text)
        return n > limit or (n * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit)

    async def _read_loop(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                await self.send(error_frame("unsupported_data", "frames are JSON text; binary is refused"))
                await self.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
                return
            if self._too_big(text):
                await self.send(
                    error_frame("frame_too_big", f"frames are limited to {self.cfg.max_frame_bytes} bytes")
                )
                await self.close(CLOSE_TOO_BIG, "frame too big")
                return
            try:
                await self._dispatch(parse_client_frame(text))
            except FrameError as e:
                await self.send(error_frame("bad_frame", e.message, e.sub_id))

    async def _dispatch(self, frame: Any) -> None:
        from sqlproxy.stream.channels import AuditSubscription, MetricsSubscription, QuerySubscription

        if isinstance(frame, PingFrame):
            await self.send({"type": "pong", "data": frame.data})
        elif isinstance(frame, AuthFrame):
            raise FrameError("already authenticated")
        elif isinstance(frame, SubscribeAudit | SubscribeQuery | SubscribeMetrics):
            if frame.id in self.subs:
                raise FrameError(f"id: subscription {frame.id!r} already exists", frame.id)
            if len(self.subs) >= self.cfg.max_subscriptions:
                raise FrameError(
                    f"at most {self.cfg.max_subscriptions} subscriptions per connection", frame.id
                )
            sub: Subscription
            if isinstance(frame, SubscribeAudit):
                sub = AuditSubscription(self, frame)
            elif isinstance(frame, SubscribeQuery):
                sub = QuerySubscription(self, frame)
            else:
                if not self.all_audit:
                    await self.send(
                        error_frame(
                            "forbidden", "the metrics channel needs an admin or audit_all role", frame.id
                        )
                    )
                    return
                sub = MetricsSubscription(self, frame)
            self.subs[frame.id] = sub
            sub.start()
        elif isinstance(frame, MoreFrame):
            q = self.subs.get(frame.id)
            if not isinstance(q, QuerySubscription):
                raise FrameError(f"id: no query subscription {frame.id!r}", frame.id)
            q.grant(frame.batches)
        elif isinstance(frame, CancelFrame | UnsubscribeFrame):
            s = self.subs.get(frame.id)
            if s is None:
                raise FrameError(f"id: no subscription {frame.id!r}", frame.id)
            if isinstance(s, QuerySubscription):
                # The query ends with its own error frame (code "cancelled") once it has stopped.
                s.cancel("cancelled by the client")
                return
            self.forget(s)
            await s.stop()
            await self.send({"type": "unsubscribed", "id": frame.id})
