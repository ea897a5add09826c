"""One request through the pipeline: what a door hands in, and what the stages fill in."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlproxy.audit.record import new_id

if TYPE_CHECKING:
    from sqlproxy.auth.users import Identity
    from sqlproxy.execute.upstream import StatementResult, Upstream
    from sqlproxy.pipeline.errors import ProxyError
    from sqlproxy.policy.engine import Decision
    from sqlproxy.sql.model import Analysis, OutputColumn


@dataclass(slots=True, eq=False)
class Request:
    door: str  # "http", "wire" or "ws"
    sql: str | None
    source_ip: str
    source_port: int | None = None
    database: str | None = None
    # HTTP and WebSocket credentials. Never logged, never audited.
    api_key: str | None = field(default=None, repr=False)
    # Set by a door that authenticated the client itself (the wire door at startup).
    identity: Identity | None = None
    params: list[Any] | None = None
    max_rows: int | None = None
    dry_run: bool = False
    # The wire session's search_path when it has changed it; None means the database default.
    search_path: tuple[str, ...] | None = None
    # An error found by the door before the pipeline (unparseable JSON, ...). It is raised after
    # authentication so the audit record names the user when there is one.
    preflight_error: ProxyError | None = None
    # A door that executes by itself (the wire door forwards to its own backend connection and
    # streams results to the client; the WebSocket door streams from a cursor) sets this. It
    # receives the request with ``statements`` rewritten and decided, and fills in ``results``
    # (row counts and command tags; rows only when the door wants them classified by value).
    executor: Callable[[Request], Awaitable[None]] | None = field(default=None, repr=False)
    # The cursors the session declared before this request, by name: the lineage of the rows a
    # FETCH of one of them returns (a wire session keeps them; see ClassifyStage).
    cursors: Mapping[str, tuple[OutputColumn, ...]] | None = field(default=None, repr=False)

    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)

    # Filled in by the stages.
    upstream: Upstream | None = None
    analysis: Analysis | None = None
    decision: Decision | None = None
    statements: list[str] = field(default_factory=list)
    rewritten: bool = False
    results: list[StatementResult] = field(default_factory=list)
    classifications: list[dict[str, list[str]]] = field(default_factory=list)
    error: ProxyError | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # ``source`` made once by a door that sends many requests from one peer (a wire session).
    source_text: str | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        if self.source_text is not None:
            return self.source_text
        return self.source_ip if self.source_port is None else f"{self.source_ip}:{self.source_port}"

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
