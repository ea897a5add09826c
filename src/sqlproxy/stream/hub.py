"""The stream hub: one per runtime. It takes the audit writer's batches (and, with Redis, every
other node's), hands them to the live subscriptions without ever waiting on one, keeps the
rolling figures the metrics channel reports, and answers replays for resuming subscribers.

Delivery is synchronous and non-blocking: a subscription copies what matches into its own
bounded queue or marks itself lagging. So the audit writer, and with it the pipeline, never
waits for a WebSocket client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlproxy.audit.record import AuditRecord
from sqlproxy.stream.fanout import RedisFanout
from sqlproxy.stream.filters import AuditFilter
from sqlproxy.stream.frames import Cursor
from sqlproxy.stream.stats import RollingStats

if TYPE_CHECKING:
    from sqlproxy.runtime import Runtime
    from sqlproxy.stream.connection import StreamConnection

log = logging.getLogger(__name__)


class LiveSubscriber(Protocol):
    def offer(self, node: str, records: Sequence[AuditRecord]) -> None: ...


class UnknownNode(Exception):
    pass


def load_node_id(state_dir: Path, configured: str | None) -> str:
    """The configured id, or one made once per state directory: a node's audit chain lives in
    its state directory, so the id that names the chain must live there too."""
    if configured:
        return configured
    path = state_dir / "stream.node_id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "node"
    node = f"{host}-{secrets.token_hex(3)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(node)
    return node


class StreamHub:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        cfg = runtime.config.current.stream
        self.node_id = load_node_id(runtime.state_dir, cfg.node_id)
        self._subs: set[LiveSubscriber] = set()
        self.stats = RollingStats()
        self.connections = 0
        # Open connections (authenticating ones included), for a shutdown to say goodbye to.
        self.live: set[StreamConnection] = set()
        self.fanout: RedisFanout | None = None
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        cfg = self.rt.config.current.stream
        self.rt.audit.add_listener(self._on_local)
        if cfg.redis_url:
            self.fanout = RedisFanout(
                cfg.redis_url,
                prefix=cfg.redis_prefix,
                node_id=self.node_id,
                retention=cfg.redis_retention,
                store=self.rt.audit.store,
                deliver=self._on_remote,
            )
            await self.fanout.start(self.rt.audit.written_seq)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.rt.audit.remove_listener(self._on_local)
        if self.fanout is not None:
            await self.fanout.stop()
            self.fanout = None

    async def close_all(self) -> None:
        """Close every open stream connection with 1001 (going away): the server is shutting
        down. Called before the ASGI server closes its connections its own way (1012)."""
        conns = list(self.live)
        if conns:
            await asyncio.gather(*(c.shutdown() for c in conns), return_exceptions=True)

    # -- live ------------------------------------------------------------------------------------
    def attach(self, sub: LiveSubscriber) -> None:
        self._subs.add(sub)

    def detach(self, sub: LiveSubscriber) -> None:
        self._subs.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def _on_local(self, records: Sequence[AuditRecord]) -> None:
        if self.fanout is not None:
            self.fanout.notify(records)
        self._deliver(self.node_id, records)

    def _on_remote(self, node: str, records: Sequence[AuditRecord]) -> None:
        self._deliver(node, records)

    def _deliver(self, node: str, records: Sequence[AuditRecord]) -> None:
        self.stats.add(node, records)
        for sub in list(self._subs):
            try:
                sub.offer(node, records)
            except Exception:
                log.exception("stream subscriber %r failed on offer", sub)

    def positions(self) -> Cursor:
        """Per node, the last seq handed to live subscribers: where a new subscription starts."""
        out: Cursor = {self.node_id: self.rt.audit.written_seq}
        if self.fanout is not None:
            out.update(self.fanout.positions)
        return out

    # -- replay ----------------------------------------------------------------------------------
    async def replay(
        self, node: str, after: int, filt: AuditFilter, limit: int
    ) -> tuple[list[AuditRecord], int, bool]:
        """Matching records of ``node`` after seq ``after`` (at most ``limit``), the seq the
        replay has covered (past records the filter drops), and whether it has reached the end."""
        if node == self.node_id:
            # Read before the query: every record up to it was in the store when the query ran.
            written = self.rt.audit.written_seq
            recs = await self.rt.audit.store.query(after_seq=after, limit=limit, **filt.as_query_args())
            done = len(recs) < limit
            last = recs[-1].seq if recs else after
            return recs, (max(last, written) if done else last), done
        if self.fanout is None:
            raise UnknownNode(node)
        page = await self.fanout.replay(node, after, limit)
        covered = page[-1].seq if page else after
        return [r for r in page if filt.matches(r)], covered, len(page) < limit

    async def tail(self, filt: AuditFilter, n: int) -> list[AuditRecord]:
        if n <= 0:
            return []
        return await self.rt.audit.store.query(
            user=filt.user, decision=filt.decision, table=filt.table, kind=filt.kind, limit=n
        )

    # -- metrics ---------------------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        rt = self.rt
        pools = {name: up.pool_stats() for name, up in rt.upstreams.items()}
        snap: dict[str, Any] = {
            "node": self.node_id,
            **self.stats.snapshot(),
            "pools": pools,
            "audit": {
                "queue_depth": rt.audit.queue_depth,
                "written": rt.audit.written,
                "sink_failures": rt.audit.failures,
                "last_seq": rt.audit.written_seq,
            },
            "stream": {
                "connections": self.connections,
                "audit_subscribers": len(self._subs),
                "redis": None
                if self.fanout is None
                else {"connected": self.fanout.connected, "nodes": sorted(self.fanout.positions)},
            },
            "cache": {"hits": rt.analysis_cache.hits, "misses": rt.analysis_cache.misses},
            "rate_limit": await _rate_limit_state(rt),
        }
        return snap


async def _rate_limit_state(rt: Runtime) -> Any:
    # Rate limiting is another feature's: report what its own snapshot offers, never reach in.
    limiter = getattr(rt, "rate_limiter", None)
    snap = getattr(limiter, "snapshot", None)
    if not callable(snap):
        return None
    try:
        out = snap()
        if inspect.isawaitable(out):
            out = await out
    except Exception:
        log.exception("rate limiter snapshot failed")
        return None
    if isinstance(out, dict) and isinstance(out.get("buckets"), list) and len(out["buckets"]) > 50:
        out = {**out, "buckets": out["buckets"][:50], "buckets_total": len(out["buckets"])}
    return out
