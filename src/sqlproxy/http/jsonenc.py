"""JSON for query results: real types (numbers as numbers, null as null), and a readable string for
the PostgreSQL types JSON has no form for."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import ipaddress
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

_IP_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)


def _decimal(d: decimal.Decimal) -> int | float | str:
    if not d.is_finite():
        return str(d)  # NaN / Infinity have no JSON number form
    if d == d.to_integral_value() and d.as_tuple().exponent >= 0:  # type: ignore[operator]
        return int(d)
    f = float(d)
    # Keep exactness visible: a numeric that a double cannot hold goes out as a string.
    return f if decimal.Decimal(repr(f)) == d.normalize() or abs(d.adjusted()) < 15 else str(d)


def to_jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, _IP_TYPES):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return str(value)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=to_jsonable, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
