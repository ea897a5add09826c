"""The fast audit paths (``AuditRecord.build`` with ``Shared`` values, ``encode_linked`` in
``seal``) make exactly the bytes the generic definition does: canonical JSON =
json.dumps(record without hash, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False), hash = HMAC-SHA256(key, prev_hash || canonical)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import pickle
from typing import Any

import pytest

from sqlproxy.audit.chain import Chain, ChainState, KeyedMac
from sqlproxy.audit.record import (
    STORE_COLUMNS,
    STORE_JSON_COLUMNS,
    AuditRecord,
    escaped_record,
    shared_list,
    shared_strs,
)

KEY = bytes.fromhex("22" * 32)
PREV = "ab" * 32

ODD_TEXT = [
    "plain",
    "",
    'quote " and \\ backslash',
    "new\nline\ttab\rcr\x00nul\x01\x1f\x7f",
    "non-ASCII: é ß 中文 🙂",
    "line separators \u2028 \u2029",
    "</script>&<>'",
    "\\u0041 not an escape",
]


def dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def args(i: int, text: str) -> dict[str, Any]:
    return {
        "user": text or None,
        "roles": ["b", text, "a"],
        "source": f"127.0.0.1:{i}",
        "door": "wire",
        "database": None if i % 2 else text,
        "sql": f"SELECT '{text}' -- {i}",
        "fingerprint": None if i % 3 else "fp" + text,
        "statement_kinds": ["select", text],
        "relations": [
            {"table": "public." + text, "access": "read", "columns": ["a", text]},
            {"table": "s.t", "access": "write", "columns": []},
        ],
        "columns": [text, "x"],
        "decision": "allow" if i % 2 else "deny",
        "rule": None if i % 2 else text,
        "reason": text if i % 2 else None,
        "rows": [None, 0, 1, 2**40, -3][i % 5],
        "duration_ms": [0.412, 1e16, 0.1, -0.0, 5, 1e-7, 123456.789][i % 7],
        "classifications": {} if i % 2 else {text: ["email", "pii"], "c": ["x"]},
        "sqlstate": None if i % 2 else "42501",
        "error": None if i % 2 else "denied: " + text,
        "extra": {}
        if i % 3
        else {"k": text, "n": [1, 2.5, None, True, False], "d": {"z": 1, "a": {"é": "€"}}, "f": 0.1},
    }


def built(a: dict[str, Any], *, id: str, ts: str) -> AuditRecord:
    return AuditRecord.build(
        id,
        ts,
        a["user"],
        shared_strs(a["roles"]),
        a["source"],
        a["door"],
        a["database"],
        a["sql"],
        a["fingerprint"],
        shared_strs(a["statement_kinds"]),
        shared_list(a["relations"]),
        shared_strs(a["columns"]),
        a["decision"],
        a["rule"],
        a["reason"],
        a["rows"],
        a["duration_ms"],
        a["classifications"],
        a["sqlstate"],
        a["error"],
        a["extra"],
    )


def cases() -> list[tuple[int, str]]:
    return [(i, text) for i, text in enumerate(ODD_TEXT * 3)]


def assert_generic_bytes(r: AuditRecord, prev: str) -> None:
    """``r`` (sealed) carries exactly what the definition makes of it."""
    d = r.to_dict()
    assert r.prev_hash == prev
    unhashed = dict(d)
    del unhashed["hash"]
    canonical = dumps(unhashed).encode("utf-8")
    assert r.canonical() == canonical
    assert r.hash == hmac.new(KEY, prev.encode("ascii") + canonical, hashlib.sha256).hexdigest()
    assert r.to_json() == dumps(d)
    assert r.jsonl_line() == (dumps(d) + "\n").encode("utf-8")
    row = r.store_row()
    assert len(row) == len(STORE_COLUMNS)
    for c, v in zip(STORE_COLUMNS, row, strict=True):
        if c in STORE_JSON_COLUMNS:
            assert v == dumps(d[c]), c
        elif d[c] is None:  # SQLite stores the NaN as NULL
            assert type(v) is float and math.isnan(v), c
        else:
            assert v == d[c] and type(v) is type(d[c]), c
    # What a store reads back is the same record.
    assert AuditRecord.from_json(r.to_json()) == r


@pytest.mark.parametrize(("i", "text"), cases())
def test_sealed_generic_record_is_the_canonical_json(i: int, text: str) -> None:
    r = AuditRecord.new(**args(i, text))
    sealed = Chain(KEY, ChainState(i, PREV)).append(r)
    assert sealed.seq == i + 1
    assert_generic_bytes(sealed, PREV)
    # In place: the same bytes as the copy.
    in_place = Chain(KEY, ChainState(i, PREV)).append(AuditRecord.from_dict(r.to_dict()), in_place=True)
    assert in_place.jsonl_line() == sealed.jsonl_line() and in_place.store_row() == sealed.store_row()


@pytest.mark.parametrize(("i", "text"), cases())
def test_built_record_equals_new_and_seals_to_the_same_bytes(i: int, text: str) -> None:
    a = args(i, text)
    generic = AuditRecord.new(**a, id="i" * 32, ts="2024-01-02T03:04:05.000006Z")
    fast = built(a, id="i" * 32, ts="2024-01-02T03:04:05.000006Z")
    assert fast == generic
    assert fast.to_dict() == generic.to_dict()
    for name, v in fast.to_dict().items():
        assert type(v) is type(generic.to_dict()[name]), name
    s_generic = Chain(KEY, ChainState(7, PREV)).append(generic)
    s_fast = Chain(KEY, ChainState(7, PREV)).append(fast, in_place=True)
    assert s_fast.hash == s_generic.hash
    assert s_fast.jsonl_line() == s_generic.jsonl_line()
    assert s_fast.store_row() == s_generic.store_row()
    assert_generic_bytes(s_fast, PREV)


@pytest.mark.parametrize(("i", "text"), cases())
def test_a_pickled_record_seals_to_the_same_bytes(i: int, text: str) -> None:
    # Wire worker processes pickle their records to the proxy's process, which seals them.
    a = args(i, text)
    fast = built(a, id="i" * 32, ts="2024-01-02T03:04:05.000006Z")
    again = pickle.loads(pickle.dumps(fast, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: S301
    assert again == fast and again._shared == fast._shared and again._json is None
    s_fast = Chain(KEY, ChainState(7, PREV)).append(fast)
    s_again = Chain(KEY, ChainState(7, PREV)).append(again, in_place=True)
    assert s_again.hash == s_fast.hash and s_again.jsonl_line() == s_fast.jsonl_line()
    assert s_again.store_row() == s_fast.store_row()
    # A sealed record keeps its chain fields and its encoded text.
    sealed = pickle.loads(pickle.dumps(s_fast))  # noqa: S301
    assert (sealed.seq, sealed.prev_hash, sealed.hash) == (8, PREV, s_fast.hash)
    assert sealed.jsonl_line() == s_fast.jsonl_line()


def test_built_record_defaults_id_and_ts_and_copies_what_it_must() -> None:
    a = args(0, "x")
    extra, classifications = a["extra"], a["classifications"]
    r = built(a, id="", ts="")
    assert len(r.id) == 32 and r.ts.endswith("Z")
    assert r.extra == extra and r.extra is not extra
    assert r.classifications == classifications and r.classifications is not classifications
    empty = built({**a, "extra": {}, "classifications": {}}, id="x", ts="y")
    assert empty.extra == {} and empty.classifications == {}


def test_built_record_normalises_extra_and_drops_secrets() -> None:
    a = {**args(1, "x"), "extra": {"t": (1, 2), 3: "int key", "password": "hunter2", "n": {"api_key": "k"}}}
    r = built(a, id="x" * 32, ts="t")
    assert r.extra == {"t": [1, 2], "3": "int key", "n": {}}
    assert r == AuditRecord.new(**a, id="x" * 32, ts="t")
    assert "hunter2" not in Chain(KEY).append(r).to_json()


@pytest.mark.parametrize(
    "extra",
    [
        {"protocol": "extended"},
        {"x": 1},
        {"x": True},
        {"x": 0},
        {"x": False},
        {"x": None},
        {"a": "1", "b": 2, "c": True, "d": None},
        {"token": "secret", "protocol": "extended"},
        {"q": 'quote " and \\ backslash \u2028'},
    ],
)
def test_small_scalar_extra_is_shared_and_seals_like_the_generic_path(extra: dict[str, object]) -> None:
    """Small scalar ``extra`` dicts are normalised and encoded once and shared; 1 and True (equal
    and hashing alike in Python) must not share an entry."""
    for _ in range(2):  # the second time from the memo
        a = {**args(2, "x"), "extra": dict(extra)}
        generic = AuditRecord.new(**a, id="e" * 32, ts="t")
        fast = built(a, id="e" * 32, ts="t")
        assert fast == generic and fast.extra == generic.extra
        assert [type(v) for v in fast.extra.values()] == [type(v) for v in generic.extra.values()]
        s_generic = Chain(KEY, ChainState(3, PREV)).append(generic)
        s_fast = Chain(KEY, ChainState(3, PREV)).append(fast, in_place=True)
        assert s_fast.jsonl_line() == s_generic.jsonl_line()
        assert_generic_bytes(s_fast, PREV)
    assert "secret" not in built({**args(2, "x"), "extra": dict(extra)}, id="e" * 32, ts="t").to_json()


def test_built_record_refuses_a_non_finite_duration() -> None:
    with pytest.raises(ValueError):
        built({**args(1, "x"), "duration_ms": float("inf")}, id="x", ts="t")


def test_shared_values_are_normalised_like_the_record_does() -> None:
    s = shared_strs(x for x in ("b", 1, "a"))
    assert s.value == ["b", "1", "a"] and s.text == '["b","1","a"]'
    rel = shared_list(({"table": "t", "access": "read", "columns": ("a",)},))
    assert rel.value == [{"table": "t", "access": "read", "columns": ["a"]}]
    assert rel.text == dumps(rel.value)


def test_records_share_the_shared_lists_and_stay_equal() -> None:
    roles, kinds = shared_strs(["r"]), shared_strs(["select"])
    rel, cols = shared_list([]), shared_strs([])
    records = [
        AuditRecord.build(
            None, None, "u", roles, "s", "wire", None, f"SELECT {n}", None, kinds, rel, cols,
            "allow", None, None, 1, 0.5, {}, None, None, {},
        )
        for n in range(2)
    ]  # fmt: skip
    assert records[0].roles is records[1].roles is roles.value
    chain = Chain(KEY)
    sealed = [chain.append(r, in_place=True) for r in records]
    assert sealed[1].prev_hash == sealed[0].hash
    for r in sealed:
        assert_generic_bytes(r, r.prev_hash)


@pytest.mark.parametrize("where", ["sql", "user", "extra", "relations", "roles"])
def test_lone_surrogates_fail_the_fast_path_like_the_generic_one_and_escape_alike(where: str) -> None:
    bad = "x\udc80y"
    a = args(1, "ok")
    if where == "extra":
        a["extra"] = {"k": bad}
    elif where == "relations":
        a["relations"] = [{"table": bad, "access": "read", "columns": []}]
    elif where == "roles":
        a["roles"] = [bad]
    else:
        a[where] = bad
    fast = built(a, id="i" * 32, ts="t")
    generic = AuditRecord.new(**a, id="i" * 32, ts="t")
    with pytest.raises(UnicodeEncodeError):
        generic.canonical()
    chain = Chain(KEY, ChainState(3, PREV))
    with pytest.raises(ValueError):
        chain.append(fast, in_place=True)
    # Nothing half done: the record is not sealed and the chain did not move.
    assert fast.hash == "" and fast.seq == 0 and chain.state == ChainState(3, PREV)
    # The writer's fallback: the record with that text escaped, sealed as the generic path does.
    s_fast = chain.append(escaped_record(fast))
    s_generic = Chain(KEY, ChainState(3, PREV)).append(escaped_record(generic))
    assert s_fast.jsonl_line() == s_generic.jsonl_line()
    assert r"x\\udc80y" in s_fast.to_json()  # the backslash, escaped in JSON
    assert_generic_bytes(s_fast, PREV)


@pytest.mark.parametrize("key_len", [16, 32, 63, 64, 65, 200])
def test_keyed_mac_is_hmac_sha256(key_len: int) -> None:
    key = bytes((i * 7 + 1) % 256 for i in range(key_len))
    mac = KeyedMac(key)
    for msg in (b"", b"x", "é 🙂".encode() * 100):
        assert mac.hexdigest(msg) == hmac.new(key, msg, hashlib.sha256).hexdigest()


class Tagged(str):
    """A str subclass: encoded as its text, never looked up in the text memo."""


def test_recurring_and_odd_typed_text_encodes_like_json_dumps() -> None:
    long = "r" * 5000
    a = {**args(2, "x"), "rule": long, "reason": Tagged("tagged"), "user": Tagged("u")}
    for _ in range(3):  # the second and third time from the memo
        r = Chain(KEY, ChainState(0, PREV)).append(AuditRecord.new(**a))
        assert_generic_bytes(r, PREV)
