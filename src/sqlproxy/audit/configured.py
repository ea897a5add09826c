"""Verifying the audit trail of a configuration: the store against its own head, and the JSONL
files against the store's head, with the same key the proxy uses."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlproxy.audit.chain import load_or_create_key
from sqlproxy.audit.pg_store import URL_SCHEMES, PgStore
from sqlproxy.audit.sinks import AuditStore, SqliteStore
from sqlproxy.audit.verify import VerifyReport, verify_jsonl, verify_store
from sqlproxy.config.models import ProxyConfig


@dataclass(frozen=True, slots=True)
class ConfiguredReport:
    store: VerifyReport
    jsonl: VerifyReport | None

    @property
    def ok(self) -> bool:
        return self.store.ok and (self.jsonl is None or self.jsonl.ok)

    def summary_lines(self) -> list[str]:
        lines: list[str] = []
        for name, rep in (("store", self.store), ("jsonl", self.jsonl)):
            if rep is None:
                continue
            state = "ok" if rep.ok else f"TAMPERING DETECTED ({len(rep.problems)} problem(s))"
            lines.append(f"{name}: {rep.records} record(s), seq {rep.first_seq}..{rep.last_seq}: {state}")
            lines.extend(f"  seq {p.seq}: {p.kind}: {p.detail}" for p in rep.problems)
        return lines


def state_path(config: ProxyConfig, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else Path(config.server.state_dir) / p


def audit_node_id(config: ProxyConfig) -> str:
    """The id naming this node's chain in a shared store: the stream door's node id, so a
    resume cursor and the chain it points into name the same thing."""
    # Imported here: the stream package pulls in Redis and HTTP code a SQLite setup never needs.
    from sqlproxy.stream.hub import load_node_id

    return load_node_id(Path(config.server.state_dir), config.stream.node_id)


def store_from_config(config: ProxyConfig) -> AuditStore:
    """The store ``audit.store`` names: ``sqlite:///PATH`` (relative to state_dir) or a
    ``postgresql://`` URL (this node's chain in it)."""
    url = config.audit.store
    if url.startswith("sqlite:///"):
        return SqliteStore(state_path(config, url[len("sqlite:///") :]))
    if url.startswith(URL_SCHEMES):
        return PgStore(url, audit_node_id(config))
    raise ValueError("audit.store: expected sqlite:///PATH or postgresql://...")


async def verify_configured_async(config: ProxyConfig, env: Mapping[str, str]) -> ConfiguredReport:
    a = config.audit
    key = load_or_create_key(
        env_var=a.hmac_key_env,
        key_file=state_path(config, a.hmac_key_file) if a.hmac_key_file else None,
        default_path=state_path(config, "audit/chain.key"),
        env=env,
    )
    store = store_from_config(config)
    try:
        store_report = await verify_store(store, key)
        head = await store.head()
    finally:
        await store.close()
    jsonl_report = None
    if a.jsonl_path:
        jsonl_report = await asyncio.to_thread(verify_jsonl, state_path(config, a.jsonl_path), key, head)
    return ConfiguredReport(store_report, jsonl_report)


def verify_configured(config: ProxyConfig, env: Mapping[str, str]) -> ConfiguredReport:
    return asyncio.run(verify_configured_async(config, env))
