"""Rolling figures over the audit events a hub sees (this node's and, with Redis, every node's):
what the metrics channel reports about requests, users and tables. Fed from audit records rather
than from the Prometheus counters because those are per node and carry no user or table."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlproxy.audit.record import AuditRecord
from sqlproxy.memo import IdMemo


class _Event(NamedTuple):  # a tuple: one is made per audit record
    t: float
    decision: str
    user: str | None
    tables: tuple[str, ...]
    duration_ms: float


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    # Nearest rank: a reported p99 is a latency some request really had.
    k = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[k], 3)


class RollingStats:
    def __init__(self, window_s: float = 60.0, max_events: int = 200_000, recent_denied: int = 20) -> None:
        self.window_s = window_s
        self._events: deque[_Event] = deque(maxlen=max_events)
        self._denied: deque[dict[str, Any]] = deque(maxlen=recent_denied)
        self.totals: Counter[str] = Counter()
        self.started = time.monotonic()
        self._tables_of: IdMemo[list[Any], tuple[str, ...]] = IdMemo()

    def _tables(self, relations: list[Any]) -> tuple[str, ...]:
        # Records of one statement shape share their relations list: its tables are read once.
        hit = self._tables_of.get(relations)
        if hit is not None:
            return hit
        tables = tuple(str(rel.get("table")) for rel in relations if isinstance(rel, dict))
        return self._tables_of.put(relations, tables)

    def add(self, node: str, records: Sequence[AuditRecord]) -> None:
        now = time.monotonic()
        append = self._events.append
        for r in records:
            append(_Event(now, r.decision, r.user, self._tables(r.relations), r.duration_ms))
            self.totals[r.decision] += 1
            if r.decision not in ("allow",):
                self._denied.append(
                    {
                        "node": node,
                        "seq": r.seq,
                        "ts": r.ts,
                        "user": r.user,
                        "decision": r.decision,
                        "rule": r.rule,
                        "reason": r.reason,
                        "sql": (r.sql[:200] if r.sql else None),
                    }
                )

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        ev = self._events
        while ev and ev[0].t < cutoff:
            ev.popleft()

    def snapshot(self, rate_window_s: float = 10.0, top: int = 8) -> dict[str, Any]:
        now = time.monotonic()
        self._prune(now)
        recent_cut = now - rate_window_s
        # A node up for 3 s has a 3 s rate window, not a 10 s one with 7 empty seconds.
        span = max(0.001, min(rate_window_s, now - self.started))
        by_decision: Counter[str] = Counter()
        recent: Counter[str] = Counter()
        users: Counter[str] = Counter()
        tables: Counter[str] = Counter()
        lat: list[float] = []
        for e in self._events:
            by_decision[e.decision] += 1
            if e.t >= recent_cut:
                recent[e.decision] += 1
            users[e.user or "(anonymous)"] += 1
            for t in e.tables:
                tables[t] += 1
            lat.append(e.duration_ms)
        lat.sort()
        return {
            "window_s": self.window_s,
            "rate_window_s": round(span, 3),
            "requests_per_s": {k: round(v / span, 3) for k, v in sorted(recent.items())},
            "requests_per_s_total": round(sum(recent.values()) / span, 3),
            "window_decisions": dict(sorted(by_decision.items())),
            "totals": dict(sorted(self.totals.items())),
            "latency_ms": {
                "p50": _percentile(lat, 0.50),
                "p95": _percentile(lat, 0.95),
                "p99": _percentile(lat, 0.99),
                "max": round(lat[-1], 3) if lat else None,
                "count": len(lat),
            },
            "top_users": [[u, n] for u, n in users.most_common(top)],
            "top_tables": [[t, n] for t, n in tables.most_common(top)],
            "recent_denied": list(reversed(self._denied)),
        }
