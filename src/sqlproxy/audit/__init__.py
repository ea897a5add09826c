"""Tamper-evident audit: records, the HMAC hash chain, sinks and stores, the writer, verification."""

from sqlproxy.audit.chain import Chain, ChainState, compute_hash, load_or_create_key
from sqlproxy.audit.pg_store import ChainConflict, PgStore
from sqlproxy.audit.record import AuditRecord, drop_secrets
from sqlproxy.audit.sinks import AuditStore, JsonlSink, Sink, SqliteStore
from sqlproxy.audit.verify import Problem, ProblemKind, VerifyReport, verify, verify_jsonl, verify_store
from sqlproxy.audit.writer import AuditWriter

__all__ = [
    "AuditRecord",
    "AuditStore",
    "AuditWriter",
    "Chain",
    "ChainConflict",
    "ChainState",
    "JsonlSink",
    "PgStore",
    "Problem",
    "ProblemKind",
    "Sink",
    "SqliteStore",
    "VerifyReport",
    "compute_hash",
    "drop_secrets",
    "load_or_create_key",
    "verify",
    "verify_jsonl",
    "verify_store",
]
