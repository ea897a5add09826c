"""One audit record: what happened to one request, whatever door it came in by.

Callers never pass passwords, API keys or other credentials into a record; the record holds what
the pipeline decided, not how the client proved who it is. As a second line of defence, keys in
``extra`` that look like credentials are dropped before the record exists (``drop_secrets``).

A record is sealed by the writer (``seq``, ``prev_hash``, ``hash``); everything else is fixed
when the record is made. Lists and dicts are normalised through JSON at construction so that the
bytes hashed are exactly the bytes any store reads back.
"""

from __future__ import annotations

import json
import json.encoder
import logging
import math
import operator
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64

# The decisions the pipeline reports today. Not enforced on construction: a new kind of outcome
# must still be audited rather than fail the request that produced it.
DECISIONS = frozenset({"allow", "deny", "error", "rate_limited", "unauthenticated", "bad_request"})
DOORS = frozenset({"http", "wire", "ws"})

# Substrings of a key name that mark a credential. Matching is on the lowercased key, so
# "apiKey", "DB_PASSWORD" and "access_token" are all caught; a false positive only loses an
# informational field, a false negative would store a secret forever in a tamper-evident log.
_SECRET_KEY = re.compile(r"passw(or)?d|pwd|secret|token|api[_\-]?key|private[_\-]?key|credential")


def drop_secrets(value: Any) -> Any:
    """A copy of ``value`` without dict keys that look like credentials, at any depth."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            ks = str(k)
            if _SECRET_KEY.search(ks.lower()):
                # The key name is not secret; saying which one was dropped points at the caller.
                log.warning("audit: dropped a credential-like key %r from a record's extra", ks)
                continue
            out[ks] = drop_secrets(v)
        return out
    if isinstance(value, (list, tuple)):
        return [drop_secrets(v) for v in value]
    return value


def _escape_text(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escape_text(k): _escape_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_text(v) for v in value]
    return value


def escaped_record(record: AuditRecord) -> AuditRecord:
    """``record`` with text UTF-8 cannot hold (lone surrogates) backslash-escaped, so it can be
    encoded and hashed."""
    data = {name: _escape_text(getattr(record, name)) for name in _FIELD_NAMES}
    return AuditRecord(**data)


def utc_now_iso() -> str:
    """``format_ts(datetime.now(UTC))``; the text up to the seconds is made once per second."""
    global _ts_cache
    now = time.time()
    sec = int(now)
    cached = _ts_cache
    if cached[0] != sec:
        cached = _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
    # %d truncates the float as int() does; a third faster than an f-string with int().
    return "%s%06dZ" % (cached[1], (now - sec) * 1_000_000)  # noqa: UP031


_ts_cache: tuple[int, str] = (-1, "")


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits, like ``uuid.uuid4().hex`` without building a
    UUID object. The random bytes come from os.urandom 4 KiB at a time: one system call per
    256 ids instead of one per id (every request has an id)."""
    global _random_pos, _random_buf
    pos = _random_pos
    if pos >= len(_random_buf):
        _random_buf = os.urandom(_RANDOM_CHUNK)
        pos = 0
    _random_pos = pos + 16
    n = int.from_bytes(_random_buf[pos : pos + 16], "big")
    return "%032x" % ((n & _UUID_CLEAR) | _UUID_V4)


_RANDOM_CHUNK = 4096
_random_buf = b""
_random_pos = 0


def _reseed_after_fork() -> None:
    # A forked child must not hand out the ids its parent has handed out or will.
    global _random_buf, _random_pos
    _random_buf, _random_pos = b"", 0


os.register_at_fork(after_in_child=_reseed_after_fork)


# Version 4 (bits 76-79) and the RFC 4122 variant (bits 62-63), as uuid.UUID(version=4) sets them.
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID_V4 = (0x4000 << 64) | (0x8000 << 48)


def format_ts(dt: datetime) -> str:
    """Fixed-width UTC ISO-8601 with microseconds and ``Z``: string order is time order."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalize_ts(text: str) -> str:
    """Any ISO-8601 date or timestamp (naive means UTC) in the stored form; ValueError if not one."""
    return format_ts(datetime.fromisoformat(text.strip()))


_NOT_PLAIN = object()


def _plain_copy(value: Any) -> Any:
    """A copy of ``value`` if it is plain JSON data already (dicts with str keys, lists, exact
    str/int/bool/None, finite floats), which a JSON round trip returns unchanged; else
    ``_NOT_PLAIN``. Exact types only: enums, tuples, NaN and the like take the JSON path."""
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return value
    if t is float:
        return value if math.isfinite(value) else _NOT_PLAIN
    if t is list:
        out = []
        for v in value:
            c = _plain_copy(v)
            if c is _NOT_PLAIN:
                return _NOT_PLAIN
            out.append(c)
        return out
    if t is dict:
        d: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                return _NOT_PLAIN
            c = _plain_copy(v)
            if c is _NOT_PLAIN:
                return _NOT_PLAIN
            d[k] = c
        return d
    return _NOT_PLAIN


def _json_roundtrip(value: Any) -> Any:
    # default=str keeps the audit path from failing on a stray datetime/Decimal in extra; the
    # stored text is then what gets hashed, so verification stays exact. This runs three times
    # per request, and what the runtime passes is nearly always plain JSON data already: that
    # is copied directly (5x faster than dumps + loads for a relation list, the same result).
    copied = _plain_copy(value)
    if copied is not _NOT_PLAIN:
        return copied
    return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False, default=str))


# The C string encoder json uses with ensure_ascii=False: the same text dumps makes of a str.
_ENCODE_STR = json.encoder.encode_basestring


def _not_serializable(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _make_encode() -> Callable[[Any], str]:
    """``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)`` as one function. JSONEncoder.encode builds the C encoder on every call
    (half its cost for a small value); here it is built once. Without circular-reference
    markers: what is encoded is plain JSON data, which AuditRecord.__post_init__ made sure of
    (a cycle fails there)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the pure-Python encoder
        return json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode
    c_encode = make(None, _not_serializable, _ENCODE_STR, None, ":", ",", True, False, False)

    def encode(v: Any) -> str:
        return "".join(c_encode(v, 0))

    return encode


_ENCODE = _make_encode()


def canonical_json(data: dict[str, Any]) -> bytes:
    return _ENCODE(data).encode("utf-8")


def json_value(v: Any) -> str:
    """``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)``, with the common scalars and empty containers done without the encoder."""
    t = type(v)
    if t is str:
        return _ENCODE_STR(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return int.__repr__(v)
    if t is float and math.isfinite(v):
        return float.__repr__(v)
    if t is list and not v:
        return "[]"
    if t is dict and not v:
        return "{}"
    return _ENCODE(v)


@dataclass(frozen=True, slots=True)
class Shared:
    """A list value as a record holds it (normalised as ``AuditRecord.__post_init__`` does), with
    its JSON text: made once and given to every ``AuditRecord.build`` of one statement shape or
    one set of roles. Neither ``value`` nor anything in it may change afterwards: records hold
    it as it is, and are sealed with ``text``."""

    value: Any
    text: str


def shared_strs(values: Any) -> Shared:
    """A ``Shared`` list of strings (roles, statement kinds, output columns): ``str`` of each."""
    value = [str(v) for v in values]
    return Shared(value, json_value(value))


def shared_list(values: Any) -> Shared:
    """A ``Shared`` list of JSON data (relations), normalised as the record normalises it."""
    value = _json_roundtrip(list(values))
    return Shared(value, json_value(value))


@dataclass(frozen=True, slots=True, eq=True)
class AuditRecord:
    id: str
    ts: str
    user: str | None
    roles: list[str]
    source: str
    door: str
    database: str | None
    sql: str | None
    fingerprint: str | None
    statement_kinds: list[str]
    relations: list[dict[str, Any]]
    columns: list[str]
    decision: str
    rule: str | None
    reason: str | None
    rows: int | None
    duration_ms: float
    classifications: dict[str, list[str]]
    sqlstate: str | None
    error: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""
    # Not part of the record: the JSONL line and the store row, set by ``seal`` from the same
    # text it hashes, so the sinks write what was hashed without serializing the record again.
    # Never copied by ``dataclasses.replace`` (a changed record is encoded afresh), not compared.
    # A tuple (line, row): the JSONL line (UTF-8, with its newline) and the store row
    # (``STORE_COLUMNS`` order, the JSON columns holding the text that was hashed).
    _json: tuple[bytes, tuple[Any, ...]] | None = field(default=None, init=False, repr=False, compare=False)
    # Not part of the record either: the JSON text of roles, statement_kinds, relations and
    # columns when ``build`` took them from ``Shared`` values, so sealing does not encode again
    # what every record of one statement shape holds. Same rules as ``_json``.
    _shared: tuple[str, str, str, str] | None = field(default=None, init=False, repr=False, compare=False)

    # A frozen dataclass with list fields would get a __hash__ that raises; say so up front.
    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not math.isfinite(self.duration_ms):
            raise ValueError("audit record: duration_ms must be finite")
        set_ = object.__setattr__
        set_(self, "duration_ms", float(self.duration_ms))
        set_(self, "roles", [str(r) for r in self.roles])
        set_(self, "statement_kinds", [str(k) for k in self.statement_kinds])
        set_(self, "columns", [str(c) for c in self.columns])
        set_(self, "relations", _json_roundtrip(list(self.relations)))
        # Empty dicts (nearly every request's classifications and extra) need no round trip.
        c = self.classifications
        set_(self, "classifications", {} if type(c) is dict and not c else _json_roundtrip(dict(c)))
        e = self.extra
        set_(self, "extra", {} if type(e) is dict and not e else _json_roundtrip(drop_secrets(dict(e))))

    @classmethod
    def new(
        cls,
        *,
        user: str | None,
        source: str,
        door: str,
        decision: str,
        duration_ms: float,
        id: str | None = None,
        ts: str | None = None,
        roles: list[str] | None = None,
        database: str | None = None,
        sql: str | None = None,
        fingerprint: str | None = None,
        statement_kinds: list[str] | None = None,
        relations: list[dict[str, Any]] | None = None,
        columns: list[str] | None = None,
        rule: str | None = None,
        reason: str | None = None,
        rows: int | None = None,
        classifications: dict[str, list[str]] | None = None,
        sqlstate: str | None = None,
        error: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> AuditRecord:
        """An unsealed record (seq 0, no hashes); ``AuditWriter.submit`` seals it."""
        return cls(
            id=id or new_id(),
            ts=ts or utc_now_iso(),
            user=user,
            roles=roles or [],
            source=source,
            door=door,
            database=database,
            sql=sql,
            fingerprint=fingerprint,
            statement_kinds=statement_kinds or [],
            relations=relations or [],
            columns=columns or [],
            decision=decision,
            rule=rule,
            reason=reason,
            rows=rows,
            duration_ms=duration_ms,
            classifications=classifications or {},
            sqlstate=sqlstate,
            error=error,
            extra=extra or {},
        )

    @classmethod
    def build(
        cls,
        id: str | None,
        ts: str | None,
        user: str | None,
        roles: Shared,
        source: str,
        door: str,
        database: str | None,
        sql: str | None,
        fingerprint: str | None,
        statement_kinds: Shared,
        relations: Shared,
        columns: Shared,
        decision: str,
        rule: str | None,
        reason: str | None,
        rows: int | None,
        duration_ms: float,
        classifications: dict[str, list[str]],
        sqlstate: str | None,
        error: str | None,
        extra: dict[str, Any],
    ) -> AuditRecord:
        """``new`` for the request path: the same record (equal, and sealed to the same bytes),
        with roles, statement_kinds, relations and columns given as ``Shared`` values, which were
        normalised when made and whose JSON text sealing reuses. The record holds the shared
        lists themselves: no one may change them. Arguments in field order."""
        if not math.isfinite(duration_ms):
            raise ValueError("audit record: duration_ms must be finite")
        # Each slot's own setter: a frozen dataclass refuses setattr, and object.__setattr__
        # looks the slot up by name each time (half again as slow, with 26 slots per record).
        (
            s_id, s_ts, s_user, s_roles, s_source, s_door, s_database, s_sql, s_fingerprint,
            s_kinds, s_relations, s_columns, s_decision, s_rule, s_reason, s_rows, s_duration,
            s_classifications, s_sqlstate, s_error, s_extra, s_seq, s_prev_hash, s_hash, s_json,
            s_shared,
        ) = _SLOT_SETTERS  # fmt: skip
        self = object.__new__(cls)
        s_id(self, id or new_id())
        s_ts(self, ts or utc_now_iso())
        s_user(self, user)
        s_roles(self, roles.value)
        s_source(self, source)
        s_door(self, door)
        s_database(self, database)
        s_sql(self, sql)
        s_fingerprint(self, fingerprint)
        s_kinds(self, statement_kinds.value)
        s_relations(self, relations.value)
        s_columns(self, columns.value)
        s_decision(self, decision)
        s_rule(self, rule)
        s_reason(self, reason)
        s_rows(self, rows)
        s_duration(self, float(duration_ms))
        # As __post_init__ normalises them.
        c = classifications
        s_classifications(self, {} if type(c) is dict and not c else _json_roundtrip(dict(c)))
        s_sqlstate(self, sqlstate)
        s_error(self, error)
        e = extra
        if type(e) is dict and not e:
            s_extra(self, {})
        else:
            s_extra(self, _small_extra(e) or _json_roundtrip(drop_secrets(dict(e))))
        s_seq(self, 0)
        s_prev_hash(self, "")
        s_hash(self, "")
        s_json(self, None)
        s_shared(self, (roles.text, statement_kinds.text, relations.text, columns.text))
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as one tuple of its slots (wire worker processes send their records to the
        # proxy's writer): the dataclass default goes through a dict of slot names and
        # object.__setattr__ per slot, which took 9 us per record to load, this about 2.
        return (_restore, (_ALL_SLOTS(self),))

    def with_chain(self, seq: int, prev_hash: str, hash: str) -> AuditRecord:
        # Not dataclasses.replace: that re-runs __post_init__, whose JSON normalisation has
        # already been done once for this record (it is on every request's path). Not
        # copy.copy either: on a slots dataclass it goes through __reduce_ex__, three times
        # slower than copying the slots here.
        new = object.__new__(AuditRecord)
        for name in _FIELD_NAMES:
            object.__setattr__(new, name, getattr(self, name))
        object.__setattr__(new, "seq", seq)
        object.__setattr__(new, "prev_hash", prev_hash)
        object.__setattr__(new, "hash", hash)
        object.__setattr__(new, "_json", None)
        object.__setattr__(new, "_shared", self._shared)
        return new

    def field_json(self) -> dict[str, str]:
        """The JSON text of each field (``json_value``), as ``to_json`` writes it."""
        return {name: json_value(getattr(self, name)) for name in _FIELD_NAMES}

    def store_row(self) -> tuple[Any, ...]:
        """The record as the SQLite store binds it, a row of ``STORE_COLUMNS``: the JSON columns
        as JSON text (for a sealed record, the text that was hashed), None as NaN (``_NULL``)."""
        enc = self._json
        if enc is not None:
            return enc[1]
        texts = self.field_json()
        return tuple(
            texts[c] if c in STORE_JSON_COLUMNS else _NULL if getattr(self, c) is None else getattr(self, c)
            for c in STORE_COLUMNS
        )

    def jsonl_line(self) -> bytes:
        """``to_json`` as a UTF-8 line with its newline, as the JSONL sink writes it."""
        enc = self._json
        if enc is not None:
            return enc[0]
        return (_ENCODE(self.to_dict()) + "\n").encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        # Shallow: the nested values were normalised to plain JSON data in __post_init__ and a
        # frozen record never changes them; asdict's deep copy cost more than the hashing.
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def hashed_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        del d["hash"]
        return d

    def canonical(self) -> bytes:
        """The bytes the chain HMAC covers: every field but ``hash``."""
        return canonical_json(self.hashed_dict())

    def to_json(self) -> str:
        """The record as one JSON object with sorted keys and no spaces (the JSONL line)."""
        enc = self._json
        if enc is not None:
            return enc[0][:-1].decode("utf-8")
        return _ENCODE(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        """Strict: a missing or unknown key is an error, since an added key would otherwise
        ride along unhashed."""
        names = set(_FIELD_NAMES)
        keys = set(data)
        if keys != names:
            missing, unknown = sorted(names - keys), sorted(keys - names)
            raise ValueError(f"audit record: missing keys {missing}, unknown keys {unknown}")
        for name, want in _FIELD_TYPES.items():
            v = data[name]
            if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
                raise ValueError(f"audit record: {name} has type {type(v).__name__}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> AuditRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("audit record: not a JSON object")
        return cls.from_dict(data)


_STR = (str,)
_OPT_STR = (str, type(None))
# What a decoded record's fields must be. Checked on reading so that a value that would only be
# coerced on construction (a string where a list belongs) is refused instead of hashing equal.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": _STR,
    "ts": _STR,
    "user": _OPT_STR,
    "roles": (list,),
    "source": _STR,
    "door": _STR,
    "database": _OPT_STR,
    "sql": _OPT_STR,
    "fingerprint": _OPT_STR,
    "statement_kinds": (list,),
    "relations": (list,),
    "columns": (list,),
    "decision": _STR,
    "rule": _OPT_STR,
    "reason": _OPT_STR,
    "rows": (int, type(None)),
    "duration_ms": (int, float),
    "classifications": (dict,),
    "sqlstate": _OPT_STR,
    "error": _OPT_STR,
    "extra": (dict,),
    "seq": (int,),
    "prev_hash": _STR,
    "hash": _STR,
}


_FIELD_NAMES = tuple(f.name for f in fields(AuditRecord) if not f.name.startswith("_"))
# The __set__ of each slot, in field order (AuditRecord.build unpacks them in this order).
_SLOT_SETTERS = tuple(AuditRecord.__dict__[f.name].__set__ for f in fields(AuditRecord))
if tuple(f.name for f in fields(AuditRecord)) != (*_FIELD_NAMES, "_json", "_shared"):
    raise AssertionError("AuditRecord fields changed: update AuditRecord.build")
_SET_SEQ, _SET_PREV_HASH, _SET_HASH, _SET_JSON = _SLOT_SETTERS[-5:-1]
# Every slot's value at once, in field order (one C call).
_ALL_SLOTS = operator.attrgetter(*(f.name for f in fields(AuditRecord)))
_SLOT_PAIRS = tuple(zip(_SLOT_SETTERS, range(len(_SLOT_SETTERS)), strict=True))


def _restore(values: tuple[Any, ...]) -> AuditRecord:
    """The record ``AuditRecord.__reduce__`` took apart."""
    self = object.__new__(AuditRecord)
    for setter, i in _SLOT_PAIRS:
        setter(self, values[i])
    return self


# Sorted as json.dumps(sort_keys=True) orders them, split around "hash" (not hashed).
_SORTED = sorted(_FIELD_NAMES)
_BEFORE_HASH = tuple(n for n in _SORTED if n < "hash")
_AFTER_HASH = tuple(n for n in _SORTED if n > "hash")
# The fields encode_linked takes from the record (seq and prev_hash come from the chain).
_LINKED_NAMES = tuple(n for n in _FIELD_NAMES if n not in ("seq", "prev_hash", "hash"))
_get_linked = operator.attrgetter(*_LINKED_NAMES)


# encode_linked writes the members out in this order; checked against the fields here so that a
# field added to AuditRecord cannot be left out of the hash unnoticed.
if _BEFORE_HASH != (
    "classifications",
    "columns",
    "database",
    "decision",
    "door",
    "duration_ms",
    "error",
    "extra",
    "fingerprint",
) or _AFTER_HASH != (
    "id",
    "prev_hash",
    "reason",
    "relations",
    "roles",
    "rows",
    "rule",
    "seq",
    "source",
    "sql",
    "sqlstate",
    "statement_kinds",
    "ts",
    "user",
):
    raise AssertionError("AuditRecord fields changed: update encode_linked")

# None in a store row. SQLite stores a bound NaN as NULL, and the sqlite3 module binds a float
# directly, where None goes through its adapter lookup first (~1 us per column, a tenth of an
# insert). No record holds NaN: it has no JSON form, so such a record cannot be sealed.
_NULL = math.nan

# The JSON text of short strings seen in records (most recur from record to record: the user,
# the client's address, the rule and reason of a decision) and of None. Only exact str keys are
# added: a lookup by an equal str subclass or number never happens (encode_linked checks the
# type first).
_TEXT_MEMO: dict[str | None, str] = {None: "null"}
_TEXT_MEMO_MAX = 4096
_TEXT_MEMO_LEN = 200


def _memo_text(v: str | None) -> str:
    """``json_value(v)``, kept in ``_TEXT_MEMO`` for a short ``v``."""
    text = json_value(v)
    if len(v or "") <= _TEXT_MEMO_LEN:
        if len(_TEXT_MEMO) >= _TEXT_MEMO_MAX:
            _TEXT_MEMO.clear()
            _TEXT_MEMO[None] = "null"
        _TEXT_MEMO[v] = text
    return text


# ``extra`` of a few scalar members recurs from request to request ({"protocol": "extended"} on
# every extended-protocol Execute): normalised and encoded once, then shared by the records
# (read-only, as every value a record holds). By content, and by the shared dict's id for its text.
_SMALL_EXTRA: dict[tuple[tuple[str, type, Any], ...], dict[str, Any]] = {}
_SMALL_EXTRA_TEXT: dict[int, tuple[dict[str, Any], str]] = {}
_SMALL_EXTRA_MAX = 256


def _small_extra(extra: Any) -> dict[str, Any] | None:
    if type(extra) is not dict or len(extra) > 4:
        return None
    # The type is part of the key: True == 1 and hash alike, but encode differently.
    items = tuple((k, type(v), v) for k, v in extra.items())
    for k, t, _v in items:
        if type(k) is not str or not (t is str or t is bool or t is int or t is type(None)):
            return None
    hit = _SMALL_EXTRA.get(items)
    if hit is not None:
        return hit
    cleaned: dict[str, Any] = _json_roundtrip(drop_secrets(dict(extra)))
    if len(_SMALL_EXTRA) >= _SMALL_EXTRA_MAX:
        _SMALL_EXTRA.clear()
        _SMALL_EXTRA_TEXT.clear()
    _SMALL_EXTRA[items] = cleaned
    _SMALL_EXTRA_TEXT[id(cleaned)] = (cleaned, json_value(cleaned))
    return cleaned


def encode_linked(record: AuditRecord, seq: int, prev_hash: str) -> tuple[bytes, bytes, tuple[Any, ...]]:
    """``record`` as it will be once linked at ``seq`` after ``prev_hash``, encoded: the UTF-8
    JSON object text before the ``hash`` member and after it, and the store row but its last
    column (the hash). The canonical bytes the chain hashes are ``head + b"," + tail``; the
    JSONL line is the same with the hash member between them. Both are exactly what
    ``json.dumps(sort_keys=True)`` makes of the record (members in key order, each value as
    ``json_value`` encodes it), which the tests pin. Raises ValueError (UnicodeEncodeError) for
    text UTF-8 cannot hold, as ``canonical`` does."""
    (
        id_,
        ts,
        user,
        roles,
        source,
        door,
        database,
        sql,
        fingerprint,
        kinds,
        relations,
        columns,
        decision,
        rule,
        reason,
        rows,
        duration,
        classifications,
        sqlstate,
        error,
        extra,
    ) = _get_linked(record)
    enc = _ENCODE_STR
    jv = json_value
    mg = _TEXT_MEMO.get
    mt = _memo_text
    shared = record._shared
    if shared is None:
        roles_j, kinds_j, rel_j, cols_j = jv(roles), jv(kinds), jv(relations), jv(columns)
    else:
        roles_j, kinds_j, rel_j, cols_j = shared
    # Each value as json_value encodes it, the usual types inline (a call per field costs more);
    # the text of short strings that recur (user, source, rule, ...) and None from the memo.
    cls_j = "{}" if type(classifications) is dict and not classifications else jv(classifications)
    if type(extra) is dict and not extra:
        extra_j = "{}"
    else:
        known = _SMALL_EXTRA_TEXT.get(id(extra))
        extra_j = known[1] if known is not None and known[0] is extra else jv(extra)
    # The members in key order (checked against the fields above), as f-strings: a third of
    # the time of "%" formatting.
    database_j = (mg(database) or mt(database)) if type(database) is str or database is None else jv(database)
    decision_j = (mg(decision) or mt(decision)) if type(decision) is str else jv(decision)
    door_j = (mg(door) or mt(door)) if type(door) is str else jv(door)
    duration_j = repr(duration) if type(duration) is float and duration - duration == 0.0 else jv(duration)
    error_j = (mg(error) or mt(error)) if type(error) is str or error is None else jv(error)
    fp_j = (
        (mg(fingerprint) or mt(fingerprint))
        if type(fingerprint) is str or fingerprint is None
        else jv(fingerprint)
    )
    head = (
        f'{{"classifications":{cls_j},"columns":{cols_j},"database":{database_j},'
        f'"decision":{decision_j},"door":{door_j},"duration_ms":{duration_j},"error":{error_j},'
        f'"extra":{extra_j},"fingerprint":{fp_j}'
    )
    id_j = enc(id_) if type(id_) is str else jv(id_)
    prev_j = enc(prev_hash) if type(prev_hash) is str else jv(prev_hash)
    reason_j = (mg(reason) or mt(reason)) if type(reason) is str or reason is None else jv(reason)
    rows_j = "null" if rows is None else repr(rows) if type(rows) is int else jv(rows)
    rule_j = (mg(rule) or mt(rule)) if type(rule) is str or rule is None else jv(rule)
    seq_j = repr(seq) if type(seq) is int else jv(seq)
    source_j = (mg(source) or mt(source)) if type(source) is str else jv(source)
    sql_j = "null" if sql is None else enc(sql) if type(sql) is str else jv(sql)
    sqlstate_j = (mg(sqlstate) or mt(sqlstate)) if type(sqlstate) is str or sqlstate is None else jv(sqlstate)
    ts_j = enc(ts) if type(ts) is str else jv(ts)
    user_j = (mg(user) or mt(user)) if type(user) is str or user is None else jv(user)
    tail = (
        f'"id":{id_j},"prev_hash":{prev_j},"reason":{reason_j},"relations":{rel_j},'
        f'"roles":{roles_j},"rows":{rows_j},"rule":{rule_j},"seq":{seq_j},"source":{source_j},'
        f'"sql":{sql_j},"sqlstate":{sqlstate_j},"statement_kinds":{kinds_j},"ts":{ts_j},'
        f'"user":{user_j}}}'
    )
    null = _NULL
    row = (
        seq,
        id_,
        ts,
        null if user is None else user,
        roles_j,
        source,
        door,
        null if database is None else database,
        null if sql is None else sql,
        null if fingerprint is None else fingerprint,
        kinds_j,
        rel_j,
        cols_j,
        decision,
        null if rule is None else rule,
        null if reason is None else reason,
        null if rows is None else rows,
        duration,
        cls_j,
        null if sqlstate is None else sqlstate,
        null if error is None else error,
        extra_j,
        prev_hash,
    )
    return head.encode("utf-8"), tail.encode("utf-8"), row


def set_chain(record: AuditRecord, seq: int, prev_hash: str, hash: str) -> None:
    """Link an unsealed ``record`` that no one else holds in place (``seal(in_place=True)``)."""
    _SET_SEQ(record, seq)
    _SET_PREV_HASH(record, prev_hash)
    _SET_HASH(record, hash)


def attach_json(record: AuditRecord, head: bytes, tail: bytes, row: tuple[Any, ...]) -> None:
    """Give a sealed ``record`` the encoding ``encode_linked`` made for it."""
    h = record.hash
    line = b"".join((head, b',"hash":', _ENCODE_STR(h).encode("utf-8"), b",", tail, b"\n"))
    _SET_JSON(record, (line, (*row, h)))


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A stored record that could not be read back (a corrupted line or row)."""

    seq: int | None
    location: str
    error: str


# Column order of audit_records; the JSON-typed ones are stored as JSON text.
STORE_COLUMNS = (
    "seq",
    "id",
    "ts",
    "user",
    "roles",
    "source",
    "door",
    "database",
    "sql",
    "fingerprint",
    "statement_kinds",
    "relations",
    "columns",
    "decision",
    "rule",
    "reason",
    "rows",
    "duration_ms",
    "classifications",
    "sqlstate",
    "error",
    "extra",
    "prev_hash",
    "hash",
)
STORE_JSON_COLUMNS = frozenset(
    {"roles", "statement_kinds", "relations", "columns", "classifications", "extra"}
)

# encode_linked builds the store row in this order.
if ("seq", *_LINKED_NAMES, "prev_hash", "hash") != STORE_COLUMNS:
    raise AssertionError("STORE_COLUMNS changed: update encode_linked")
