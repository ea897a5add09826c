"""Audit records, the HMAC chain, key handling and in-memory verification."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from sqlproxy.audit.chain import Chain, ChainState, compute_hash, load_or_create_key
from sqlproxy.audit.record import GENESIS_HASH, AuditRecord, normalize_ts
from sqlproxy.audit.verify import ProblemKind, verify

KEY = bytes.fromhex("11" * 32)


def rec(n: int = 0, **kw: object) -> AuditRecord:
    base: dict[str, object] = {
        "user": "alice",
        "roles": ["analyst"],
        "source": "127.0.0.1:5000",
        "door": "http",
        "database": "demo",
        "sql": f"SELECT {n}",
        "fingerprint": "fp",
        "statement_kinds": ["select"],
        "relations": [{"table": "public.orders", "access": "read", "columns": ["id"]}],
        "columns": ["id"],
        "decision": "allow",
        "rows": 1,
        "duration_ms": 1.5,
    }
    base.update(kw)
    return AuditRecord.new(**base)  # type: ignore[arg-type]


def chain_of(n: int) -> list[AuditRecord]:
    c = Chain(KEY)
    return [c.append(rec(i)) for i in range(n)]


# -- records ----------------------------------------------------------------------------------


def test_new_record_has_id_and_fixed_width_utc_timestamp() -> None:
    r = rec()
    assert len(r.id) == 32 and int(r.id, 16) >= 0
    assert r.ts.endswith("Z") and len(r.ts) == len("2024-01-01T00:00:00.000000Z")
    assert r.seq == 0 and r.hash == "" and r.prev_hash == ""


def test_json_roundtrip_is_exact() -> None:
    r = chain_of(1)[0]
    back = AuditRecord.from_json(r.to_json())
    assert back == r
    assert back.to_json() == r.to_json()


def test_from_json_rejects_added_and_retyped_fields() -> None:
    r = chain_of(1)[0]
    d = json.loads(r.to_json())
    with pytest.raises(ValueError, match="unknown keys"):
        AuditRecord.from_dict({**d, "note": "x"})
    with pytest.raises(ValueError, match="roles"):
        AuditRecord.from_dict({**d, "roles": "analyst"})
    with pytest.raises(ValueError, match="missing keys"):
        AuditRecord.from_dict({k: v for k, v in d.items() if k != "sql"})


def test_secret_like_keys_are_dropped_from_extra_at_any_depth() -> None:
    r = rec(
        extra={
            "copy": {"direction": "out", "bytes": 1234, "Api_Key": "k1"},
            "password": "hunter2",
            "apiKey": "k2",
            "access_token": "t",
            "client_secret": "s",
            "items": [{"db_password": "p", "keep": 1}],
        }
    )
    assert r.extra == {"copy": {"direction": "out", "bytes": 1234}, "items": [{"keep": 1}]}
    dumped = r.to_json()
    for secret in ("hunter2", "k1", "k2", '"t"', '"s"', '"p"'):
        assert secret not in dumped


def test_extra_is_normalised_so_stored_equals_hashed() -> None:
    r = rec(extra={"t": (1, 2), 3: "int key"})
    assert r.extra == {"t": [1, 2], "3": "int key"}


def test_non_finite_duration_is_refused() -> None:
    with pytest.raises(ValueError):
        rec(duration_ms=float("nan"))


def test_normalize_ts_orders_as_strings() -> None:
    assert normalize_ts("2024-05-01") == "2024-05-01T00:00:00.000000Z"
    assert normalize_ts("2024-05-01T02:00:00+02:00") == "2024-05-01T00:00:00.000000Z"
    with pytest.raises(ValueError):
        normalize_ts("yesterday")


# -- chain ------------------------------------------------------------------------------------


def test_hash_is_hmac_over_prev_hash_and_canonical_json_without_hash() -> None:
    first, second = chain_of(2)
    assert first.seq == 1 and first.prev_hash == GENESIS_HASH == "0" * 64
    assert second.seq == 2 and second.prev_hash == first.hash
    d = first.to_dict()
    del d["hash"]
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    expected = hmac.new(KEY, GENESIS_HASH.encode() + canonical, hashlib.sha256).hexdigest()
    assert first.hash == expected


def test_canonical_form_keeps_non_ascii_text_as_utf8() -> None:
    r = rec(sql="SELECT 'é'")
    assert "SELECT 'é'".encode() in r.canonical()


def test_chain_resumes_from_state() -> None:
    records = chain_of(3)
    c = Chain(KEY, ChainState(records[-1].seq, records[-1].hash))
    more = c.append(rec(99))
    assert more.seq == 4 and more.prev_hash == records[-1].hash
    assert verify([*records, more], KEY, c.state).ok


def test_different_key_fails_every_record() -> None:
    records = chain_of(3)
    report = verify(records, b"another key of 16+ bytes")
    assert [p.kind for p in report.problems] == [ProblemKind.MODIFIED] * 3


# -- verification of in-memory sequences --------------------------------------------------------


def test_intact_chain_verifies_with_head() -> None:
    records = chain_of(5)
    report = verify(records, KEY, ChainState(5, records[-1].hash))
    assert report.ok and report.records == 5 and (report.first_seq, report.last_seq) == (1, 5)


def test_modified_record_detected() -> None:
    records = chain_of(4)
    records[2] = replace(records[2], sql="SELECT 'harmless'")
    report = verify(records, KEY)
    assert [(p.seq, p.kind) for p in report.problems] == [(3, ProblemKind.MODIFIED)]


def test_deleted_record_detected() -> None:
    records = chain_of(5)
    del records[1:3]
    report = verify(records, KEY)
    assert [(p.seq, p.kind) for p in report.problems] == [(2, ProblemKind.DELETED)]
    assert "2..3" in report.problems[0].detail


def test_duplicated_record_detected() -> None:
    records = chain_of(3)
    records.insert(2, records[1])
    assert [(p.seq, p.kind) for p in verify(records, KEY).problems] == [(2, ProblemKind.DUPLICATE)]


def test_reordered_records_detected() -> None:
    records = chain_of(4)
    records[1], records[2] = records[2], records[1]
    kinds = verify(records, KEY).kinds()
    assert ProblemKind.REORDERED in kinds


def test_record_replaced_with_a_correctly_hashed_foreign_record_breaks_the_link() -> None:
    # Even a record sealed with the right key does not fit another chain position.
    records = chain_of(3)
    forged = Chain(KEY, ChainState(1, "ab" * 32)).append(rec(8))  # seq 2 of another chain
    assert forged.seq == 2 and verify([forged], KEY, require_genesis=False).ok
    records[1] = forged
    report = verify(records, KEY)
    assert [(p.seq, p.kind) for p in report.problems] == [
        (2, ProblemKind.BROKEN_LINK),
        (3, ProblemKind.BROKEN_LINK),
    ]


def test_truncation_detected_against_head() -> None:
    records = chain_of(5)
    head = ChainState(5, records[-1].hash)
    report = verify(records[:3], KEY, head)
    assert [(p.seq, p.kind) for p in report.problems] == [(4, ProblemKind.TRUNCATED)]
    assert verify([], KEY, head).kinds() == {ProblemKind.TRUNCATED}


def test_records_beyond_head_and_wrong_head_hash_detected() -> None:
    records = chain_of(3)
    assert verify(records, KEY, ChainState(2, records[1].hash)).kinds() == {ProblemKind.BEYOND_HEAD}
    assert verify(records, KEY, ChainState(3, "f" * 64)).kinds() == {ProblemKind.HEAD_MISMATCH}


def test_missing_start_detected_only_when_genesis_required() -> None:
    records = chain_of(4)[2:]
    assert verify(records, KEY).kinds() == {ProblemKind.DELETED}
    report = verify(records, KEY, require_genesis=False)
    assert report.ok and report.first_seq == 3


# -- key --------------------------------------------------------------------------------------


def test_generated_key_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit" / "chain.key"
    k1 = load_or_create_key(env_var=None, key_file=None, default_path=path, env={})
    assert len(k1) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == k1.hex()
    k2 = load_or_create_key(env_var=None, key_file=None, default_path=path, env={})
    assert k2 == k1
    assert [p.name for p in path.parent.iterdir()] == ["chain.key"]  # no temp file left behind


def test_key_from_environment_variable_wins(tmp_path: Path) -> None:
    default = tmp_path / "chain.key"
    key = load_or_create_key(
        env_var="AUDIT_KEY", key_file=None, default_path=default, env={"AUDIT_KEY": "ab" * 32}
    )
    assert key == bytes.fromhex("ab" * 32)
    assert not default.exists()
    passphrase = load_or_create_key(
        env_var="AUDIT_KEY", key_file=None, default_path=default, env={"AUDIT_KEY": "not hex but long enough"}
    )
    assert passphrase == b"not hex but long enough"


def test_named_but_missing_key_source_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    default = tmp_path / "chain.key"
    with pytest.raises(ValueError, match="AUDIT_KEY"):
        load_or_create_key(env_var="AUDIT_KEY", key_file=None, default_path=default, env={})
    with pytest.raises(ValueError, match="hmac_key_file"):
        load_or_create_key(env_var=None, key_file=tmp_path / "absent", default_path=default, env={})
    assert not default.exists()


def test_key_file_is_read_and_short_keys_refused(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("cd" * 32 + "\n")
    assert load_or_create_key(env_var=None, key_file=f, default_path=tmp_path / "d", env={}) == bytes.fromhex(
        "cd" * 32
    )
    f.write_text("abcd")
    with pytest.raises(ValueError, match="shorter"):
        load_or_create_key(env_var=None, key_file=f, default_path=tmp_path / "d", env={})


def test_compute_hash_depends_on_every_field() -> None:
    r = chain_of(1)[0]
    for change in (
        {"user": None},
        {"seq": 2},
        {"decision": "deny"},
        {"extra": {"a": 1}},
        {"prev_hash": "1" * 64},
        {"duration_ms": 1.25},
    ):
        assert compute_hash(KEY, replace(r, **change)) != r.hash, change


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"sql": "SELECT 'é \u2028 \"q\" \\\\ \x01'", "user": None, "database": None, "rows": None},
        {"extra": {"b": {"z": 1, "a": [1.5, None, True, -0.0]}, "a": "ü"}, "rows": 10**30},
        {"classifications": {"email": ["PII.Email"], "a": []}, "duration_ms": 1e20},
        {"relations": [], "columns": [], "roles": [], "reason": "r", "error": "e", "sqlstate": "42501"},
    ],
)
def test_sealed_encoding_is_the_canonical_json(change: dict[str, object]) -> None:
    # seal() builds the hashed bytes and the JSONL line from each field's JSON text once; they
    # must be exactly what json.dumps(sort_keys=True) makes of the record.
    chain = Chain(KEY)
    chain.append(rec(0))
    sealed = chain.append(rec(1, **change))
    dumps = json.dumps(
        sealed.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    assert sealed.to_json() == dumps
    assert compute_hash(KEY, sealed) == sealed.hash
    assert AuditRecord.from_json(sealed.to_json()) == sealed
    fresh = replace(sealed)  # a copy carries no cached encoding, and encodes the same
    assert fresh.to_json() == dumps and fresh.field_json() == sealed.field_json()
    changed = replace(sealed, sql="SELECT 'other'")
    assert '"sql":"SELECT \'other\'"' in changed.to_json()


def test_ids_are_uuid4_hex_and_timestamps_fixed_width_utc() -> None:
    import uuid
    from datetime import UTC, datetime

    from sqlproxy.audit.record import format_ts, new_id, utc_now_iso

    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        u = uuid.UUID(hex=i)
        assert u.hex == i and u.version == 4 and u.variant == uuid.RFC_4122
    before = format_ts(datetime.now(UTC))
    now = utc_now_iso()
    after = format_ts(datetime.now(UTC))
    assert len(now) == len(before) == 27 and now.endswith("Z")
    assert before[:19] <= now[:19] <= after[:19]  # same clock, to the second
    assert normalize_ts(now) == now
