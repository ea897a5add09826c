"""The three channels of the stream door.

audit    live audit records with filters; resumable from a cursor ({node: seq}) with no gap and
         no duplicate: the subscription attaches to the hub first (buffering), replays from the
         store (this node) or Redis (other nodes), then drains what it buffered, skipping what
         the replay already sent. seq is gap-free per node, so "skip seq <= last sent" is exact.
query    one request through the whole pipeline; the execute stage is this channel's executor,
         which reads a server-side cursor one batch per credit the client granted.
metrics  a snapshot of the hub's rolling figures and this node's state every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from sqlproxy.audit.record import AuditRecord
from sqlproxy.execute.upstream import ColumnInfo, StatementResult, request_connection, translate_error
from sqlproxy.http.jsonenc import to_jsonable
from sqlproxy.pipeline.errors import ProxyError, UpstreamUnavailable
from sqlproxy.pipeline.request import Request
from sqlproxy.pipeline.stages import may_change_session
from sqlproxy.sql.model import Access, StatementKind
from sqlproxy.stream.connection import Subscription
from sqlproxy.stream.fanout import ResumeGap
from sqlproxy.stream.filters import AuditFilter
from sqlproxy.stream.frames import (
    CLOSE_LAGGING,
    Cursor,
    SubscribeAudit,
    SubscribeMetrics,
    SubscribeQuery,
    error_frame,
)
from sqlproxy.stream.hub import UnknownNode

if TYPE_CHECKING:
    from sqlproxy.stream.connection import StreamConnection

T = TypeVar("T")

_REPLAY_PAGE = 500
_FRAME_RECORDS = 200
_SETUP_SQL = "SELECT set_config('statement_timeout', $1, true), set_config('sqlproxy.user', $2, true)"


class Cancelled(ProxyError):
    """A streamed query stopped by its client (cancel frame, disconnect, or no credit)."""

    code = "cancelled"
    http_status = 499
    sqlstate = "57014"  # query_canceled
    decision = "error"


def _record_json(node: str, r: AuditRecord) -> dict[str, Any]:
    d = r.to_dict()
    d["node"] = node
    return d


# ---------------------------------------------------------------------------------------- audit


class AuditSubscription(Subscription):
    channel = "audit"

    def __init__(self, conn: StreamConnection, frame: SubscribeAudit) -> None:
        super().__init__(conn, frame.id)
        self.frame = frame
        f = frame.filters
        self.filter = AuditFilter(user=f.user, decision=f.decision, table=f.table, kind=f.kind)
        self.cap = conn.cfg.queue_records
        self._queue: deque[tuple[str, AuditRecord]] = deque()
        self._wake = asyncio.Event()
        self._replaying = True
        self._overflowed = False
        self.lagging = False
        # Per node, the last seq this subscription has covered (sent, or replayed past).
        self.cursor: Cursor = {}

    # Called by the hub for every batch; must not block.
    def offer(self, node: str, records: Sequence[AuditRecord]) -> None:
        if self.lagging:
            return
        matching = [r for r in records if self.filter.matches(r)]
        if not matching:
            return
        if len(self._queue) + len(matching) > self.cap:
            self._queue.clear()
            if self._replaying:
                # Still catching up: everything dropped is in the store or Redis; replay again.
                self._overflowed = True
                return
            self.lagging = True
            self._wake.set()
            return
        self._queue.extend((node, r) for r in matching)
        self._wake.set()

    async def run(self) -> None:
        conn, hub = self.conn, self.conn.hub
        ident = conn.identity
        assert ident is not None
        if not conn.all_audit:
            if self.filter.user is not None and self.filter.user != ident.name:
                await conn.send(
                    error_frame("forbidden", "you may only watch your own audit records", self.id)
                )
                return
            self.filter = AuditFilter(
                user=ident.name, decision=self.filter.decision, table=self.filter.table, kind=self.filter.kind
            )
        hub.attach(self)
        try:
            await self._catch_up()
            await self._pump()
        finally:
            hub.detach(self)

    async def _catch_up(self) -> None:
        conn, hub = self.conn, self.conn.hub
        start = hub.positions()
        resume = self.frame.resume
        replay_from: Cursor = {}
        if resume is not None:
            replay_from = {hub.node_id: resume} if isinstance(resume, int) else dict(resume)
        self.cursor = {**start, **replay_from}
        await conn.send(
            {
                "type": "subscribed",
                "id": self.id,
                "channel": "audit",
                "node": hub.node_id,
                "cursor": dict(self.cursor),
                "filters": self.filter.as_query_args(),
            }
        )
        if resume is None and self.frame.tail:
            # The tail is history (seq at or below the start cursor), sent as is; the live part
            # then continues after whichever is later.
            start_local = self.cursor[hub.node_id]
            # Records newer than the start cursor come through the live queue, in order: a tail
            # record past it would move the cursor over live records still queued behind it.
            tail = [r for r in await hub.tail(self.filter, self.frame.tail) if r.seq <= start_local]
            if tail:
                self.cursor[hub.node_id] = 0
                await self._send_records(hub.node_id, tail)
                self.cursor[hub.node_id] = max(start_local, self.cursor[hub.node_id])
        while True:
            self._overflowed = False
            for node in list(replay_from):
                try:
                    while True:
                        recs, covered, done = await hub.replay(
                            node, self.cursor[node], self.filter, _REPLAY_PAGE
                        )
                        if recs:
                            await self._send_records(node, recs)
                        self.cursor[node] = max(self.cursor[node], covered)
                        if done:
                            break
                except (UnknownNode, ResumeGap) as e:
                    extra = {"node": node}
                    if isinstance(e, ResumeGap):
                        extra["first_available"] = e.first  # type: ignore[assignment]
                    await conn.send(
                        error_frame(
                            "resume_unavailable", f"cannot resume node {node!r}: {e}", self.id, **extra
                        )
                    )
                    self.cursor[node] = max(self.cursor[node], start.get(node, 0))
                    replay_from.pop(node, None)
            if not self._overflowed:
                # No await between this check and the switch: nothing can slip in between.
                self._replaying = False
                break
        await conn.send({"type": "live", "id": self.id, "cursor": dict(self.cursor)})

    async def _send_records(self, node: str, records: Sequence[AuditRecord]) -> None:
        last = self.cursor.get(node, 0)
        fresh = [r for r in records if r.seq > last]
        for i in range(0, len(fresh), _FRAME_RECORDS):
            chunk = fresh[i : i + _FRAME_RECORDS]
            ok = await self.conn.send(
                {
                    "type": "data",
                    "id": self.id,
                    "channel": "audit",
                    "records": [_record_json(node, r) for r in chunk],
                }
            )
            if not ok:
                raise asyncio.CancelledError
            self.cursor[node] = chunk[-1].seq

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.lagging:
                await self.conn.send(
                    error_frame(
                        "lagging",
                        f"more than {self.cap} audit records behind; reconnect and resume from the cursor",
                        self.id,
                        resume=dict(self.cursor),
                    )
                )
                await self.conn.close(CLOSE_LAGGING, "lagging")
                return
            while self._queue:
                node = self._queue[0][0]
                batch: list[AuditRecord] = []
                # One frame holds one node's records, in order.
                while self._queue and self._queue[0][0] == node and len(batch) < _FRAME_RECORDS:
                    batch.append(self._queue.popleft()[1])
                await self._send_records(node, batch)
                if self.lagging:
                    break
            if self.lagging:
                self._wake.set()


# ---------------------------------------------------------------------------------------- query


class QuerySubscription(Subscription):
    channel = "query"

    def __init__(self, conn: StreamConnection, frame: SubscribeQuery) -> None:
        super().__init__(conn, frame.id)
        self.frame = frame
        cfg = conn.cfg
        self.batch_rows = min(frame.batch_rows, cfg.query_max_batch_rows)
        caps = [c for c in (frame.max_rows, cfg.query_max_rows) if c is not None]
        self.max_rows = min(caps) if caps else None
        self.credit = frame.credit
        self._credit_event = asyncio.Event()
        self._cancel_event = asyncio.Event()
        self._cancel_reason = ""
        self.batches_sent = 0
        self.rows_sent = 0

    def grant(self, batches: int) -> None:
        self.credit += batches
        self._credit_event.set()

    def cancel(self, reason: str) -> None:
        if not self._cancel_event.is_set():
            self._cancel_reason = reason
            self._cancel_event.set()

    async def stop(self) -> None:
        # Not task.cancel(): the pipeline must see a ProxyError so the audit record says why.
        self.cancel("client disconnected")
        if self.task is not None and self.task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        conn = self.conn
        f = self.frame
        req = Request(
            door="ws",
            sql=f.sql,
            source_ip=conn.source_ip,
            source_port=conn.source_port,
            database=f.database,
            identity=conn.identity,
            params=f.params,
            extra={"channel": "query"},
        )
        req.executor = self._execute
        await conn.send({"type": "subscribed", "id": self.id, "channel": "query", "request_id": req.id})
        try:
            await conn.rt.handle(req)
        except ProxyError as e:
            await conn.send(
                {
                    "type": "error",
                    "id": self.id,
                    "request_id": req.id,
                    **e.to_json(),
                    "rows_sent": self.rows_sent,
                }
            )
            return
        merged: dict[str, list[str]] = {}
        for per in req.classifications:
            for col, labels in per.items():
                if labels:
                    merged[col] = sorted(set(merged.get(col, [])) | set(labels))
        d = req.decision
        await conn.send(
            {
                "type": "complete",
                "id": self.id,
                "request_id": req.id,
                "statements": [
                    {"command": r.command, "row_count": r.row_count, "capped": r.truncated}
                    for r in req.results
                ],
                "row_count": self.rows_sent,
                "classifications": merged,
                "decision": {"rule": d.rule if d else None, "rules": list(d.rules_used) if d else []},
                "rewritten": req.rewritten,
                "duration_ms": round(req.elapsed_ms, 3),
            }
        )

    async def _cancellable(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless the client cancels first; then stop it (asyncpg sends PostgreSQL a
        cancel request for a running statement) and raise Cancelled."""
        if self._cancel_event.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            raise Cancelled(f"query {self._cancel_reason}")
        work = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._cancel_event.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise Cancelled(f"query {self._cancel_reason}")

    async def _wait_credit(self) -> None:
        timeout = self.conn.cfg.query_idle_timeout_s
        while self.credit <= 0:
            self._credit_event.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._cancellable(self._credit_event.wait())
            except TimeoutError:
                self.cancel(f"cancelled: no credit for {timeout:g}s")
                raise Cancelled(f"query {self._cancel_reason}") from None

    async def _send(self, frame: dict[str, Any]) -> None:
        if not await self.conn.send(frame):
            self.cancel("cancelled: client disconnected")
            raise Cancelled("query cancelled: client disconnected")

    async def _execute(self, req: Request) -> None:
        assert req.upstream is not None and req.identity is not None and req.analysis is not None
        up = req.upstream
        pool = up.pool
        if pool is None:
            raise UpstreamUnavailable("upstream unavailable: no connection pool")
        classifier = self.conn.rt.classifier
        results: list[StatementResult] = []
        leaves_state = may_change_session(req.analysis)
        try:
            async with request_connection(pool, up.config.connect_timeout_s, leaves_state) as pg:
                await self._run_statements(req, pg, classifier, results)
        except ProxyError:
            raise
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            raise translate_error(e) from e
        finally:
            req.results = results

    async def _run_statements(
        self, req: Request, pg: asyncpg.Connection, classifier: Any, results: list[StatementResult]
    ) -> None:
        assert req.upstream is not None and req.identity is not None and req.analysis is not None
        up = req.upstream
        async with pg.transaction():
            await pg.execute(_SETUP_SQL, str(up.config.statement_timeout_ms), req.identity.name)
            args = tuple(req.params) if req.params and len(req.statements) == 1 else ()
            for i, sql in enumerate(req.statements):
                st = req.analysis.statements[i]
                stmt = await self._cancellable(pg.prepare(sql))
                attrs = stmt.get_attributes()
                if not attrs:
                    await self._cancellable(stmt.fetch(*args))
                    tag = stmt.get_statusmsg() or ""
                    res = StatementResult(command=tag, row_count=_count(tag))
                    results.append(res)
                    await self._send(
                        {
                            "type": "statement",
                            "id": self.id,
                            "statement": i,
                            "command": tag,
                            "row_count": res.row_count,
                        }
                    )
                    continue
                writes = st.kind is not StatementKind.SELECT or any(
                    r.access is not Access.READ for r in st.relations
                )
                await self._stream_rows(pg, stmt, args, i, st.outputs, classifier, results, writes)

    async def _stream_rows(
        self,
        pg: asyncpg.Connection,
        stmt: Any,
        args: tuple[Any, ...],
        index: int,
        outputs: Any,
        classifier: Any,
        results: list[StatementResult],
        writes: bool,
    ) -> None:
        cols = [ColumnInfo(a.name, a.type.name) for a in stmt.get_attributes()]
        # Appended first and updated as rows go out, so a cancelled stream is audited with the
        # rows the client did receive.
        res = StatementResult(command="SELECT 0", columns=cols)
        results.append(res)
        cursor = await self._cancellable(stmt.cursor(*args, prefetch=None))
        total = 0
        capped = False
        sent_columns = False
        while True:
            want = self.batch_rows
            if self.max_rows is not None:
                left = self.max_rows - self.rows_sent
                if left <= 0:
                    capped = True
                    if writes and not sent_columns:
                        # Binding does not run the statement: a write (INSERT ... RETURNING, a
                        # data-modifying CTE) past the cap must still happen; its rows are not
                        # sent. The first fetch runs it to the end. A read past the cap does
                        # not run at all.
                        await self._cancellable(cursor.fetch(1))
                    break
                want = min(want, left)
            await self._wait_credit()
            rows = await self._cancellable(cursor.fetch(want))
            out = [tuple(r.values()) for r in rows]
            if not sent_columns:
                # Value-based labels need rows; the first batch is the sample, as the HTTP door's.
                sample = out[: classifier.sample_rows] if classifier.enabled else []
                res.rows = sample
                labels = classifier.classify_positional(outputs, sample) if outputs else [[] for _ in cols]
                await self._send(
                    {
                        "type": "columns",
                        "id": self.id,
                        "statement": index,
                        "columns": [
                            {"name": c.name, "type": c.type, "classifications": lab}
                            for c, lab in zip(cols, labels, strict=False)
                        ],
                    }
                )
                sent_columns = True
            self.credit -= 1
            self.batches_sent += 1
            total += len(out)
            self.rows_sent += len(out)
            res.row_count, res.command = total, f"SELECT {total}"
            last = len(out) < want
            await self._send(
                {
                    "type": "data",
                    "id": self.id,
                    "channel": "query",
                    "statement": index,
                    "batch": self.batches_sent,
                    "rows": [[to_jsonable(v) for v in row] for row in out],
                    "last": last,
                }
            )
            if last:
                break
        res.truncated = capped


def _count(tag: str) -> int:
    parts = tag.split()
    return int(parts[-1]) if parts and parts[-1].isdigit() else 0


# -------------------------------------------------------------------------------------- metrics


class MetricsSubscription(Subscription):
    channel = "metrics"

    def __init__(self, conn: StreamConnection, frame: SubscribeMetrics) -> None:
        super().__init__(conn, frame.id)
        self.interval_s = max(frame.interval_ms, conn.cfg.metrics_min_interval_ms) / 1000.0

    async def run(self) -> None:
        conn = self.conn
        await conn.send(
            {
                "type": "subscribed",
                "id": self.id,
                "channel": "metrics",
                "interval_ms": round(self.interval_s * 1000),
            }
        )
        while True:
            if not await conn.send(
                {"type": "data", "id": self.id, "channel": "metrics", "snapshot": await conn.hub.snapshot()}
            ):
                return
            await asyncio.sleep(self.interval_s)
