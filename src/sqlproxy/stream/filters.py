"""Audit filters applied to live records. They must match exactly what ``AuditStore.query``
selects for the same arguments, since a resumed subscription replays with one and continues
with the other: a record one accepts and the other refuses would be a gap or a duplicate."""

from __future__ import annotations

from dataclasses import dataclass

from sqlproxy.audit.record import AuditRecord


@dataclass(frozen=True, slots=True)
class AuditFilter:
    user: str | None = None
    decision: str | None = None
    table: str | None = None
    kind: str | None = None

    def matches(self, r: AuditRecord) -> bool:
        if self.user is not None and r.user != self.user:
            return False
        if self.decision is not None and r.decision != self.decision:
            return False
        if self.table is not None and not self._table_matches(r):
            return False
        if self.kind is not None:
            want = self.kind.lower()
            if not any(k.lower() == want for k in r.statement_kinds):
                return False
        return True

    def _table_matches(self, r: AuditRecord) -> bool:
        assert self.table is not None
        want = self.table
        # Unqualified means "in any schema", as the store's query does it.
        suffix = None if "." in want else "." + want
        for rel in r.relations:
            t = rel.get("table") if isinstance(rel, dict) else None
            if not isinstance(t, str):
                continue
            if t == want or (suffix is not None and t.endswith(suffix)):
                return True
        return False

    def as_query_args(self) -> dict[str, str | None]:
        return {"user": self.user, "decision": self.decision, "table": self.table, "kind": self.kind}
