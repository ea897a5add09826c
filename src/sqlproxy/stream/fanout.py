"""Cross-node fan-out of audit events through Redis streams.

Each node appends its sealed audit records to a stream of its own, ``{prefix}:audit:{node}``,
with the record's chain seq as the entry id (``<seq>-0``). That gives, for free:

- order per node (Redis refuses an id not above the last one),
- exact resume for another node's records (``XRANGE key (<seq>-0 +``), and
- detection of trimming (the first id returned is not seq + 1).

The publisher reads from the writer's listener batches while they are contiguous and falls
back to the node's own audit store after any break (Redis down, backlog over the bound), so a
Redis outage delays remote subscribers but never loses or reorders their events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sqlproxy.audit.record import AuditRecord
from sqlproxy.audit.sinks import AuditStore

log = logging.getLogger(__name__)

Deliver = Callable[[str, Sequence[AuditRecord]], None]

_PENDING_MAX = 10_000
_READ_BLOCK_MS = 1000
_PAGE = 500


class ResumeGap(Exception):
    """The records after the requested seq are no longer retained in Redis."""

    def __init__(self, node: str, after: int, first: int | None) -> None:
        super().__init__(f"records of node {node!r} after seq {after} are no longer retained")
        self.node, self.after, self.first = node, after, first


def _seq_of(entry_id: bytes | str) -> int:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-", 1)[0])


def _decode(fields: dict[Any, Any]) -> AuditRecord:
    raw = fields.get(b"r", fields.get("r"))
    if raw is None:
        raise ValueError("stream entry has no record")
    return AuditRecord.from_json(raw)


class RedisFanout:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        node_id: str,
        retention: int,
        store: AuditStore,
        deliver: Deliver,
    ) -> None:
        self.node_id = node_id
        self.prefix = prefix
        self.retention = retention
        self._store = store
        self._deliver = deliver
        # Two clients: the reader's blocking XREAD holds its connection for up to a second.
        # redis-py's async stubs type replies as unions of sync and async shapes; the replies
        # used here are checked where they are read.
        self._pub: Any = aioredis.Redis.from_url(url)
        self._sub: Any = aioredis.Redis.from_url(url)
        self._pending: deque[AuditRecord] = deque()
        self._broken = False  # pending lost its continuity; refill from the store
        self._wake = asyncio.Event()
        self._published = 0
        self._target = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Remote node -> last seq delivered from it.
        self.positions: dict[str, int] = {}
        self._first_scan_done = False
        self.connected = False

    def key(self, node: str) -> str:
        return f"{self.prefix}:audit:{node}"

    @property
    def nodes_key(self) -> str:
        return f"{self.prefix}:audit:nodes"

    async def start(self, written_seq: int) -> None:
        self._target = written_seq
        try:
            await self._pub.sadd(self.nodes_key, self.node_id)
            last = await self._pub.xrevrange(self.key(self.node_id), count=1)
            # A new stream starts at the present: history before this node joined stays local.
            self._published = _seq_of(last[0][0]) if last else written_seq
            await self._discover()
            self.connected = True
        except (RedisError, OSError) as e:
            log.warning("stream fan-out: Redis unavailable at start (%s); will retry", e)
            self._published = written_seq
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="stream-fanout-publish"),
            asyncio.create_task(self._read_loop(), name="stream-fanout-read"),
        ]
        if self._published < written_seq:
            self._broken = True
            self._wake.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for c in (self._pub, self._sub):
            with contextlib.suppress(Exception):
                await c.aclose()

    # -- publishing ------------------------------------------------------------------------------
    def notify(self, records: Sequence[AuditRecord]) -> None:
        """From the writer's listener: never blocks, never raises."""
        if not records:
            return
        self._target = max(self._target, records[-1].seq)
        if not self._broken:
            if len(self._pending) + len(records) > _PENDING_MAX:
                self._pending.clear()
                self._broken = True
            else:
                self._pending.extend(records)
        self._wake.set()

    async def _publish_loop(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while self._published < self._target:
                    batch = self._next_batch()
                    if batch is None:
                        batch = await self._store.get_after(self._published, _PAGE)
                        if not batch:
                            break
                    await self._xadd(batch)
                    self._published = batch[-1].seq
                delay = 0.05
            except (RedisError, OSError) as e:
                log.warning("stream fan-out: publishing failed (%s); retrying in %.2fs", e, delay)
                self._pending.clear()
                self._broken = True
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                self._wake.set()

    def _next_batch(self) -> list[AuditRecord] | None:
        """Records from the listener if they continue exactly where publishing stands."""
        while self._pending and self._pending[0].seq <= self._published:
            self._pending.popleft()
        if self._broken:
            # Everything up to the target is in the store; once caught up, the listener's
            # batches are contiguous again.
            self._pending.clear()
            self._broken = False
            return None
        if not self._pending or self._pending[0].seq != self._published + 1:
            self._pending.clear()
            return None
        n = min(_PAGE, len(self._pending))
        return [self._pending.popleft() for _ in range(n)]

    async def _xadd(self, batch: Sequence[AuditRecord]) -> None:
        key = self.key(self.node_id)
        async with self._pub.pipeline(transaction=False) as p:
            for r in batch:
                p.xadd(key, {"r": r.to_json()}, id=f"{r.seq}-0", maxlen=self.retention, approximate=True)
            await p.execute()

    # -- reading ---------------------------------------------------------------------------------
    async def _discover(self) -> None:
        members = await self._sub.smembers(self.nodes_key)
        for m in members:
            node = m.decode() if isinstance(m, bytes) else str(m)
            if node == self.node_id or node in self.positions:
                continue
            if not self._first_scan_done:
                # Known at start: only what comes next is live.
                last = await self._sub.xrevrange(self.key(node), count=1)
                self.positions[node] = _seq_of(last[0][0]) if last else 0
            else:
                # Joined since: all it has published is after our start.
                self.positions[node] = 0
        self._first_scan_done = True

    async def _read_loop(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._discover()
                self.connected = True
                if not self.positions:
                    await asyncio.sleep(_READ_BLOCK_MS / 1000)
                    continue
                streams: dict[Any, Any] = {self.key(n): f"{s}-0" for n, s in self.positions.items()}
                got = await self._sub.xread(streams, count=_PAGE, block=_READ_BLOCK_MS)
                for key, entries in got or []:
                    k = key.decode() if isinstance(key, bytes) else str(key)
                    node = k[len(self.prefix) + len(":audit:") :]
                    records = []
                    for _eid, fields in entries:
                        try:
                            records.append(_decode(fields))
                        except ValueError as e:
                            log.error("stream fan-out: undecodable entry from %s: %s", node, e)
                    if entries:
                        self.positions[node] = _seq_of(entries[-1][0])
                    if records:
                        self._deliver(node, records)
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                self.connected = False
                log.warning("stream fan-out: reading failed (%s); retrying in %.2fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def replay(self, node: str, after: int, limit: int = _PAGE) -> list[AuditRecord]:
        """Records of ``node`` after seq ``after`` still retained in Redis (up to ``limit``)."""
        # A node's sequence starts at 1, so "after 0" asks for everything it published: a stream
        # whose first entry is later than after + 1 was trimmed (or never held those records),
        # whichever cursor the subscriber resumes from.
        entries = await self._pub.xrange(self.key(node), min=f"({after}-0", max="+", count=limit)
        if entries and _seq_of(entries[0][0]) != after + 1:
            raise ResumeGap(node, after, _seq_of(entries[0][0]))
        if not entries:
            first = await self._pub.xrange(self.key(node), count=1)
            if first and _seq_of(first[0][0]) > after + 1:
                raise ResumeGap(node, after, _seq_of(first[0][0]))
        return [_decode(f) for _eid, f in entries]
