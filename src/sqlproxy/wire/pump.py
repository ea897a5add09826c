"""The response pump: matches what a server sends against what the session told it to expect.

Every message the session writes upstream pushes one :class:`Exp` (expected response) onto the
pump's queue; replies are consumed in order, in ``data_received``, and either forwarded to the
client (one write per received chunk, DataRow runs copied as one block) or swallowed when the
proxy sent the message on its own behalf (re-preparing a statement, applying settings, a
reset). Messages the proxy answers itself (ParseComplete for a statement the server already
holds, a policy denial's ErrorResponse) are queued as ``SYNTH`` entries so they reach the
client exactly where the server's reply would have been.

After an ErrorResponse in the extended protocol the server skips everything until Sync; the
pump does the same with its queue, undoing the bookkeeping of the messages that were skipped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from sqlproxy.execute.upstream import StatementResult
from sqlproxy.pipeline.errors import UpstreamError
from sqlproxy.protocol.errors import error_response

if TYPE_CHECKING:
    from sqlproxy.pipeline.request import Request
    from sqlproxy.sql.model import CopyInfo
    from sqlproxy.wire.backend import BackendConnection

log = logging.getLogger(__name__)

# Expectation kinds.
SIMPLE: Final = 0  # the client's Query: forward everything up to ReadyForQuery
HIDDEN: Final = 1  # the proxy's Query: swallow everything up to ReadyForQuery
FAIL_SIMPLE: Final = 2  # the proxy's deliberately failing Query: swallow the error, forward 'Z'
PARSE: Final = 3
PARSE_HIDDEN: Final = 4
FAIL_PARSE: Final = 5  # a deliberately failing Parse: the server then skips to Sync, as we do
BIND: Final = 6
DESCRIBE_S: Final = 7
DESCRIBE_P: Final = 8
EXECUTE: Final = 9
CLOSE: Final = 10
SYNC: Final = 11
SYNTH: Final = 12

_D: Final = 0x44
_C: Final = 0x43
_E: Final = 0x45
_Z: Final = 0x5A
_S: Final = 0x53
_N: Final = 0x4E
_A: Final = 0x41
_T: Final = 0x54
_t: Final = 0x74
_n: Final = 0x6E
_I: Final = 0x49
_s: Final = 0x73
_G: Final = 0x47
_H: Final = 0x48
_d: Final = 0x64
_c: Final = 0x63
_W: Final = 0x57
_ONE: Final = 0x31
_TWO: Final = 0x32
_THREE: Final = 0x33

# For a Query or an Execute, take_frames_until passes RowDescription, DataRow, notices and
# notifications through as one block, unread; it stops at everything else, which the loop below
# looks at (and refuses when unexpected). During COPY TO STDOUT it stops at anything but CopyData.
_LOOKED_AT: Final = frozenset(range(256)) - {_T, _D, _N, _A}
_NOT_COPYDATA: Final = frozenset(range(256)) - {_d}
_U32 = struct.Struct("!I")
_ASYNC: Final = frozenset({_N, _A, _S})
_ROW_TAGS: Final = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "SELECT", "COPY", "MOVE", "FETCH"})


def row_count(tag: str) -> int:
    parts = tag.split()
    if len(parts) >= 2 and parts[0] in _ROW_TAGS and parts[-1].isdigit():
        return int(parts[-1])
    return 0


def error_fields(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


class CopyStats:
    """One COPY on the wire, for its audit record: direction, bytes of data, rows (from the
    ``COPY n`` tag), how long the data flowed, and how it failed if it did."""

    __slots__ = ("bytes", "client_fail", "direction", "ended", "error", "format", "rows", "started")

    def __init__(self, direction: str, fmt: int) -> None:
        self.direction = direction  # "in" (client to server) or "out"
        self.format = "binary" if fmt else "text"  # the overall format byte of 'G' / 'H'
        self.bytes = 0
        self.rows: int | None = None
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.error: dict[str, str] | None = None
        self.client_fail: str | None = None  # the client's CopyFail message

    def finish(self, tag: str | None = None, error: dict[str, str] | None = None) -> None:
        if self.ended is None:
            self.ended = time.perf_counter()
        if tag is not None:
            self.rows = row_count(tag)
        if error is not None and self.error is None:
            self.error = error

    def record(self, info: CopyInfo | None) -> dict[str, object]:
        """The audit record's ``extra["copy"]``; ``info`` is the analysed statement's COPY."""
        end = self.ended if self.ended is not None else time.perf_counter()
        out: dict[str, object] = {
            "direction": self.direction,
            # text and csv are both format 0 on the wire: the statement says which.
            "format": info.format if info is not None else self.format,
            "table": info.table.qualified if info is not None and info.table is not None else None,
            "columns": list(info.columns) if info is not None else [],
            "query": info is not None and info.table is None,
            "rows": self.rows,
            "bytes": self.bytes,
            "duration_ms": round((end - self.started) * 1000, 3),
        }
        if self.error is not None:
            out["error"] = self.error
        if self.client_fail is not None:
            out["client_fail"] = self.client_fail
        return out


class SimpleCall:
    """One Query in flight: command tags as they complete, the error if any, and a future that
    resolves at ReadyForQuery (or earlier, to let the session relay COPY FROM STDIN data)."""

    __slots__ = (
        "copies",
        "copy_in",
        "copying",
        "error",
        "event",
        "finished",
        "last_tag",
        "results",
        "status",
    )

    def __init__(self, results: list[StatementResult], loop: asyncio.AbstractEventLoop) -> None:
        self.results = results
        self.error: UpstreamError | None = None
        self.status = "I"
        self.finished = False
        self.copy_in = False
        # Every COPY of this Query in order, and the one whose data is flowing now.
        self.copies: list[CopyStats] = []
        self.copying: CopyStats | None = None
        self.last_tag = ""
        self.event: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        if not self.event.done():
            self.event.set_result(None)


class Exp:
    __slots__ = ("client_name", "data", "kind", "req", "server_name")

    def __init__(
        self,
        kind: int,
        data: object = None,
        *,
        client_name: bytes | None = None,
        server_name: str | None = None,
        req: Request | None = None,
    ) -> None:
        self.kind = kind
        self.data = data
        self.client_name = client_name
        self.server_name = server_name
        self.req = req


class PumpOwner:
    """What the pump calls back into (the client session, or the pool while resetting)."""

    client_transport: asyncio.Transport | None = None

    def backend_ready(self, status: str) -> None: ...

    def backend_lost(self) -> None: ...

    def statement_failed(self, exp: Exp) -> None: ...

    def execute_done(self, req: Request) -> None: ...

    def copy_in_started(self, stats: CopyStats) -> None:
        """The server entered COPY FROM STDIN for an extended-protocol Execute."""

    def copy_in_ended(self) -> None:
        """The server left COPY FROM STDIN (CommandComplete or ErrorResponse)."""


class ResponsePump:
    __slots__ = ("be", "fatal_forwarded", "owner", "queue", "skipping", "status")

    def __init__(self, be: BackendConnection) -> None:
        self.be = be
        # A FATAL from the server reached the client (the server is ending the connection).
        self.fatal_forwarded = False
        self.owner: PumpOwner | None = None
        self.queue: deque[Exp] = deque()
        # The server is skipping messages until Sync after an error in the extended protocol.
        self.skipping = False
        self.status = "I"

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    # -- session side ----------------------------------------------------------------------
    def expect(self, exp: Exp) -> None:
        self.queue.append(exp)

    def synth(self, data: bytes) -> None:
        """Send ``data`` to the client after every reply still owed; at once when none is."""
        if self.queue:
            self.queue.append(Exp(SYNTH, data))
        else:
            owner = self.owner
            if owner is not None and owner.client_transport is not None:
                owner.client_transport.write(data)

    # -- server side -----------------------------------------------------------------------
    def on_lost(self) -> None:
        for exp in self.queue:
            if isinstance(exp.data, SimpleCall):
                exp.data.error = exp.data.error or UpstreamError("upstream connection lost", sqlstate="08006")
                exp.data.finished = True
                exp.data.wake()
        self.queue.clear()
        if self.owner is not None:
            self.owner.backend_lost()

    def on_data(self) -> None:
        try:
            self._pump()
        except Exception:
            log.exception("upstream sent a reply the proxy cannot match; closing it")
            self.be.close()
            self.on_lost()

    def _pump(self) -> None:
        dec = self.be.decoder
        queue = self.queue
        out: list[bytes] = []
        owner = self.owner
        ready: str | None = None
        while True:
            if queue:
                exp = queue[0]
                kind = exp.kind
                if kind == SYNTH:
                    out.append(exp.data)  # type: ignore[arg-type]
                    queue.popleft()
                    continue
                if kind in (SIMPLE, EXECUTE):
                    data = exp.data
                    cs = data.copying if isinstance(data, SimpleCall) else data
                    if isinstance(cs, CopyStats) and cs.direction == "out":
                        # COPY TO STDOUT: runs of CopyData go through as one block, counted.
                        block = dec.take_frames_until(_NOT_COPYDATA)
                        if block:
                            cs.bytes += len(block) - 5 * dec.taken  # payload: headers left out
                            out.append(block)
                    else:
                        block = dec.take_frames_until(_LOOKED_AT)
                        if block:
                            out.append(block)
            else:
                kind = -1
                exp = None
            frame = dec.next_frame()
            if frame is None:
                break
            t, f = frame
            if t in _ASYNC:
                if t == _S:
                    parts = f[5:].split(b"\0")
                    if len(parts) >= 2:
                        self.be.parameters[parts[0].decode("utf-8", "replace")] = parts[1].decode(
                            "utf-8", "replace"
                        )
                out.append(f)
                continue
            if exp is None:
                raise RuntimeError(f"unexpected message {chr(t)!r} from the server")
            if t == _E:
                self._error(exp, f, out)
                continue
            if t == _Z:
                status = chr(f[5])
                self.status = status
                if kind == SIMPLE:
                    call: SimpleCall = exp.data  # type: ignore[assignment]
                    call.status = status
                    call.finished = True
                    out.append(f)
                    queue.popleft()
                    call.wake()
                elif kind in (SYNC, FAIL_SIMPLE):
                    out.append(f)
                    queue.popleft()
                    self.skipping = False
                elif kind == HIDDEN:
                    queue.popleft()
                    cb = exp.data
                    if cb is not None:
                        cb(exp)  # type: ignore[operator]
                else:
                    raise RuntimeError(f"ReadyForQuery while expecting kind {kind}")
                if not queue:
                    ready = status
                continue
            if t == _W and kind in (SIMPLE, EXECUTE):
                self._refuse_copy_both(out)
                return
            if kind == SIMPLE:
                out.append(f)
                call = exp.data  # type: ignore[assignment]
                if t == _C:
                    tag = f[5:-1].decode("utf-8", "replace")
                    call.last_tag = tag
                    call.results.append(StatementResult(command=tag, row_count=row_count(tag)))
                    if call.copying is not None:
                        call.copying.finish(tag)
                        call.copying = None
                elif t == _G:
                    call.copying = CopyStats("in", f[5])
                    call.copies.append(call.copying)
                    call.copy_in = True
                    call.wake()
                elif t == _H:
                    call.copying = CopyStats("out", f[5])
                    call.copies.append(call.copying)
                elif t == _d and call.copying is not None:
                    call.copying.bytes += len(f) - 5
                continue
            if kind in (HIDDEN, FAIL_SIMPLE):
                continue  # swallowed: the proxy's own statements
            if kind == EXECUTE:
                out.append(f)
                if t in (_C, _I):
                    queue.popleft()
                    req = exp.req
                    cs = exp.data
                    done_tag = f[5:-1].decode("utf-8", "replace") if t == _C else None
                    if isinstance(cs, CopyStats):
                        cs.finish(done_tag)
                        if owner is not None and cs.direction == "in":
                            owner.copy_in_ended()
                    if req is not None and owner is not None:
                        if done_tag is not None:
                            req.results.append(
                                StatementResult(command=done_tag, row_count=row_count(done_tag))
                            )
                        if isinstance(cs, CopyStats):
                            req.extra["copy"] = cs.record(_copy_info(req))
                        owner.execute_done(req)
                elif t == _s:
                    queue.popleft()  # the portal stays open; its request continues on the next Execute
                elif t == _G:
                    cs = CopyStats("in", f[5])
                    exp.data = cs
                    # Everything the session sent after this Execute reaches the server in
                    # copy-in mode, where Sync is ignored (libpq sends one right after Execute
                    # and another after CopyDone): those Syncs get no reply.
                    for later in [e for e in queue if e.kind == SYNC]:
                        queue.remove(later)
                    if owner is not None:
                        owner.copy_in_started(cs)
                elif t == _H:
                    exp.data = CopyStats("out", f[5])
                elif t == _d:
                    if isinstance(exp.data, CopyStats):
                        exp.data.bytes += len(f) - 5
                elif t not in (_c, _T):
                    raise RuntimeError(f"unexpected {chr(t)!r} during Execute")
                continue
            if kind == PARSE:
                if t != _ONE:
                    raise RuntimeError(f"expected ParseComplete, got {chr(t)!r}")
                out.append(f)
                queue.popleft()
            elif kind == PARSE_HIDDEN:
                if t != _ONE:
                    raise RuntimeError(f"expected ParseComplete, got {chr(t)!r}")
                queue.popleft()
            elif kind == BIND:
                if t != _TWO:
                    raise RuntimeError(f"expected BindComplete, got {chr(t)!r}")
                out.append(f)
                queue.popleft()
            elif kind == DESCRIBE_S:
                out.append(f)
                if t in (_T, _n):
                    queue.popleft()
                elif t != _t:
                    raise RuntimeError(f"unexpected {chr(t)!r} for Describe")
            elif kind == DESCRIBE_P:
                if t != _T and t != _n:
                    raise RuntimeError(f"unexpected {chr(t)!r} for Describe")
                out.append(f)
                queue.popleft()
            elif kind == CLOSE:
                if t != _THREE:
                    raise RuntimeError(f"expected CloseComplete, got {chr(t)!r}")
                out.append(f)
                queue.popleft()
            else:
                raise RuntimeError(f"unexpected {chr(t)!r} while expecting kind {kind}")
        if out and owner is not None and owner.client_transport is not None:
            owner.client_transport.write(b"".join(out) if len(out) > 1 else out[0])
        if owner is not None and (ready is not None or not queue):
            # Also when the replies owed ran out without a ReadyForQuery (after a Flush).
            owner.backend_ready(self.status if ready is None else ready)

    def _refuse_copy_both(self, out: list[bytes]) -> None:
        """CopyBothResponse (streaming replication): the proxy cannot inspect or audit a
        two-way stream, so it refuses it; the server connection is in a mode the proxy cannot
        take back, so it is closed (never reused)."""
        out.append(
            error_response("0A000", "COPY BOTH (streaming replication) is not supported through sqlproxy")
        )
        owner = self.owner
        if owner is not None and owner.client_transport is not None:
            owner.client_transport.write(b"".join(out))
        self.be.close()
        self.on_lost()

    def _error(self, exp: Exp, frame: bytes, out: list[bytes]) -> None:
        kind = exp.kind
        if kind not in (HIDDEN, FAIL_SIMPLE, FAIL_PARSE, PARSE_HIDDEN) and _is_fatal(frame):
            # Forwarded below: the client has the server's last word, and needs no other.
            self.fatal_forwarded = True
        if kind == SIMPLE:
            out.append(frame)
            call: SimpleCall = exp.data  # type: ignore[assignment]
            fields = error_fields(frame[5:])
            call.error = UpstreamError(fields.get("M", "error"), sqlstate=fields.get("C", "XX000"))
            if call.copying is not None:
                call.copying.finish(error=_error_summary(fields))
                call.copying = None
            return
        if kind == HIDDEN:
            fields = error_fields(frame[5:])
            log.warning("proxy statement failed upstream: %s", fields.get("M"))
            return
        if kind == FAIL_SIMPLE:
            return
        # Extended protocol: forward (unless it is our own deliberate failure), then skip
        # everything the server will skip, up to the Sync.
        if kind != FAIL_PARSE:
            out.append(frame)
        owner = self.owner
        cs = exp.data if kind == EXECUTE and isinstance(exp.data, CopyStats) else None
        if cs is not None:
            cs.finish(error=_error_summary(error_fields(frame[5:])))
            if cs.direction == "in" and owner is not None:
                owner.copy_in_ended()
        if kind == EXECUTE and exp.req is not None and owner is not None:
            fields = error_fields(frame[5:])
            exp.req.error = UpstreamError(fields.get("M", "error"), sqlstate=fields.get("C", "XX000"))
            if cs is not None:
                exp.req.extra["copy"] = cs.record(_copy_info(exp.req))
            owner.execute_done(exp.req)
        queue = self.queue
        queue.popleft()
        if owner is not None and kind in (PARSE, PARSE_HIDDEN):
            owner.statement_failed(exp)
        while queue and queue[0].kind != SYNC:
            skipped = queue.popleft()
            if owner is not None and skipped.kind in (PARSE, PARSE_HIDDEN, SYNTH):
                owner.statement_failed(skipped)
        if not queue:
            self.skipping = True


def _is_fatal(frame: bytes) -> bool:
    fields = error_fields(frame[5:])
    return fields.get("V", fields.get("S")) in ("FATAL", "PANIC")


def _error_summary(fields: dict[str, str]) -> dict[str, str]:
    return {"sqlstate": fields.get("C", "XX000"), "message": fields.get("M", "error")}


def _copy_info(req: Request) -> CopyInfo | None:
    a = req.analysis
    if a is None or not a.statements:
        return None
    return a.statements[0].copy


ReadyCallback = Callable[[Exp], None]
