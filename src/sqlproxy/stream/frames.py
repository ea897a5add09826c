"""The stream door's frame protocol: JSON text frames with a ``type`` discriminator, and the
WebSocket close codes it uses. docs/stream.md is the schema a client author reads; this module
is what the server accepts.

Client frames are validated strictly (unknown keys are errors) so that a typo in a filter name
fails loudly instead of silently widening a subscription to everything.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sqlproxy.http.jsonenc import to_jsonable

PROTOCOL = "sqlproxy.stream.v1"

# RFC 6455 section 7.4.1 codes, plus the 4000-4999 private range for what is ours alone.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_UNSUPPORTED = 1003  # a binary frame: the protocol is JSON text only
CLOSE_POLICY = 1008  # authentication failed or timed out
CLOSE_TOO_BIG = 1009  # a client frame over stream.max_frame_bytes
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # stream.max_connections reached
CLOSE_LAGGING = 4008  # an audit subscriber fell stream.queue_records behind; resume from the cursor

# A resume cursor: the last audit seq seen from each node.
Cursor = dict[str, int]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_SubId = Annotated[str, Field(min_length=1, max_length=64)]


class AuthFrame(_Frame):
    type: Literal["auth"]
    token: Annotated[str, Field(min_length=1, max_length=512, repr=False)]


class AuditFilters(_Frame):
    user: str | None = None
    decision: str | None = None
    table: str | None = None
    kind: str | None = None


class SubscribeAudit(_Frame):
    type: Literal["subscribe"]
    channel: Literal["audit"]
    id: _SubId
    filters: AuditFilters = AuditFilters()
    # Resume: the cursor from the last frame seen ({node: seq}), or an int for this node's seq.
    resume: Cursor | Annotated[int, Field(ge=0)] | None = None
    # Without resume: first send the newest ``tail`` matching records from this node's store.
    tail: Annotated[int, Field(ge=0, le=1000)] = 0


class SubscribeQuery(_Frame):
    type: Literal["subscribe"]
    channel: Literal["query"]
    id: _SubId
    sql: str
    database: str | None = None
    params: list[Any] | None = None
    batch_rows: Annotated[int, Field(ge=1)] = 1000
    # Batches the client asks for up front; more come only after a "more" frame.
    credit: Annotated[int, Field(ge=0)] = 1
    max_rows: Annotated[int, Field(ge=1)] | None = None


class SubscribeMetrics(_Frame):
    type: Literal["subscribe"]
    channel: Literal["metrics"]
    id: _SubId
    interval_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 1000


class MoreFrame(_Frame):
    type: Literal["more"]
    id: _SubId
    batches: Annotated[int, Field(ge=1, le=1_000_000)] = 1


class CancelFrame(_Frame):
    type: Literal["cancel"]
    id: _SubId


class UnsubscribeFrame(_Frame):
    type: Literal["unsubscribe"]
    id: _SubId


class PingFrame(_Frame):
    type: Literal["ping"]
    data: Any = None


Subscribe = Annotated[SubscribeAudit | SubscribeQuery | SubscribeMetrics, Field(discriminator="channel")]
ClientFrame = (
    AuthFrame
    | MoreFrame
    | CancelFrame
    | UnsubscribeFrame
    | PingFrame
    | SubscribeAudit
    | SubscribeQuery
    | SubscribeMetrics
)

_SUBSCRIBE = TypeAdapter[SubscribeAudit | SubscribeQuery | SubscribeMetrics](Subscribe)
_BY_TYPE: dict[str, type[_Frame]] = {
    "auth": AuthFrame,
    "more": MoreFrame,
    "cancel": CancelFrame,
    "unsubscribe": UnsubscribeFrame,
    "ping": PingFrame,
}


class FrameError(Exception):
    """A client frame the server cannot act on; answered with an error frame, not a close."""

    def __init__(self, message: str, sub_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sub_id = sub_id


def parse_client_frame(text: str) -> ClientFrame:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FrameError(f"frame is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, dict):
        raise FrameError("frame must be a JSON object")
    ftype = data.get("type")
    sub_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        if ftype == "subscribe":
            if data.get("channel") not in ("audit", "query", "metrics"):
                raise FrameError("channel: must be one of audit, query, metrics", sub_id)
            return _SUBSCRIBE.validate_python(data)
        model = _BY_TYPE.get(ftype) if isinstance(ftype, str) else None
        if model is None:
            raise FrameError(f"type: unknown frame type {ftype!r}", sub_id)
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int) or first["loc"])
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise FrameError(f"{loc or 'frame'}: {msg}", sub_id) from None


def encode(frame: dict[str, Any]) -> str:
    """One server frame as JSON text. Values JSON cannot hold go through the query API's rules."""
    return json.dumps(frame, default=to_jsonable, ensure_ascii=False, separators=(",", ":"))


def error_frame(code: str, message: str, sub_id: str | None = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if sub_id is not None:
        frame["id"] = sub_id
    frame.update(extra)
    return frame
