"""Prometheus metrics. One registry per runtime (not the global one) so that several proxies in
one test process do not collide.

In multi-process mode each worker's ``Metrics.snapshot()`` is sent to the primary, whose
``update_source`` keeps the latest one per worker; the primary's ``render()`` then shows its own
registry and the workers' combined (sqlproxy/metrics_merge.py says how)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Collection, Hashable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from sqlproxy.metrics_merge import Families, families_from, merge, snapshot

if TYPE_CHECKING:
    from sqlproxy.pipeline.request import Request

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5)

# Gauges combined across processes with max, not summed: readiness flags (1 when any process sees
# the upstream, or Redis, up) and a count every process sees the same.
MAX_GAUGES = frozenset({"sqlproxy_upstream_up", "sqlproxy_ratelimit_redis_up", "sqlproxy_ratelimit_nodes"})


class Metrics:
    def __init__(self, max_gauges: Collection[str] = MAX_GAUGES) -> None:
        self.max_gauges = frozenset(max_gauges)
        # The latest families each other process (worker) sent, by the key it was given.
        self._sources: dict[Hashable, list[Metric]] = {}
        # What processes that ended had counted (retire_source).
        self._retired: list[Metric] = []
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sqlproxy_requests", "Requests by door and decision", ["door", "decision"], registry=r
        )
        self.latency = Histogram(
            "sqlproxy_request_seconds",
            "Request latency by door",
            ["door"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "sqlproxy_stage_seconds",
            "Time spent per pipeline stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.pool_size = Gauge(
            "sqlproxy_pool_connections", "Upstream pool connections", ["database", "state"], registry=r
        )
        self.audit_queue = Gauge(
            "sqlproxy_audit_queue_depth", "Audit records waiting for the sinks", registry=r
        )
        self.audit_written = Gauge(
            "sqlproxy_audit_records_written", "Audit records written since start", registry=r
        )
        self.audit_failures = Gauge(
            "sqlproxy_audit_sink_failures", "Audit sink write failures since start", registry=r
        )
        self.cache_hits = Gauge("sqlproxy_analysis_cache_hits", "Analysis cache hits since start", registry=r)
        self.cache_misses = Gauge(
            "sqlproxy_analysis_cache_misses", "Analysis cache misses since start", registry=r
        )
        self.reloads = Counter("sqlproxy_config_reloads", "Configuration reloads", ["result"], registry=r)
        self.wire_server_lost = Counter(
            "sqlproxy_wire_server_connections_lost",
            "Wire door server connections that went away without the proxy closing them "
            "(closed by the server, or a dead peer found by TCP keepalive or user timeout)",
            ["database"],
            registry=r,
        )
        self.wire_worker_restarts = Counter(
            "sqlproxy_wire_worker_restarts",
            "Wire worker processes started again after one exited unasked ([wire] workers > 1)",
            registry=r,
        )
        self.upstream_up = Gauge(
            "sqlproxy_upstream_up", "Upstream readiness (1 ready, 0 not)", ["database"], registry=r
        )
        self._requests: dict[tuple[str, str], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self._stage: dict[str, Histogram] = {}
        # Requests observed and not yet added to the prometheus objects: each observation there
        # takes a lock per value and walks the buckets, so they are added a batch at a time,
        # counted per bucket. render() adds what is buffered first, so a scrape is exact.
        self._buffer: list[tuple[str, str, float, dict[str, float]]] = []

    def observe_request(self, req: Request) -> None:
        # Runs for every request: only remembers what to observe.
        decision = req.error.decision if req.error is not None else "allow"
        buf = self._buffer
        buf.append((req.door, decision, req.elapsed_ms / 1000.0, req.stage_seconds))
        if len(buf) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Add the buffered observations to the prometheus metrics."""
        buf, self._buffer = self._buffer, []
        if not buf:
            return
        counts: dict[tuple[str, str], int] = {}
        latency: dict[str, list[float]] = {}
        stages: dict[str, list[float]] = {}
        for door, decision, seconds, per_stage in buf:
            key = (door, decision)
            counts[key] = counts.get(key, 0) + 1
            latency.setdefault(door, []).append(seconds)
            for stage, s in per_stage.items():
                stages.setdefault(stage, []).append(s)
        for key, n in counts.items():
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = self.requests.labels(*key)
            counter.inc(n)
        for door, values in latency.items():
            child = self._latency.get(door)
            if child is None:
                child = self._latency[door] = self.latency.labels(door)
            _observe_many(child, values)
        for stage, values in stages.items():
            child = self._stage.get(stage)
            if child is None:
                child = self._stage[stage] = self.stage.labels(stage)
            _observe_many(child, values)

    def snapshot(self) -> bytes:
        """This registry's families, buffered observations included, for another process's
        ``update_source``."""
        self.flush()
        return snapshot(self.registry)

    def update_source(self, key: Hashable, data: bytes) -> None:
        """Keep ``data`` (a ``snapshot()`` from another process) as ``key``'s contribution to
        ``render()``, replacing the one before. Decoded here, so a bad snapshot raises to the
        caller instead of in every scrape."""
        self._sources[key] = families_from(data)

    def forget_source(self, key: Hashable) -> None:
        """Drop ``key``'s contribution (nothing if there is none)."""
        self._sources.pop(key, None)

    def retire_source(self, key: Hashable) -> None:
        """``key``'s process has ended: its counters, histograms and summaries stay in the totals
        (a counter that went down would read as a reset), its gauges go."""
        families = self._sources.pop(key, None)
        if families is None:
            return
        kept = [f for f in families if f.type in _CUMULATIVE]
        self._retired = merge([self._retired, kept], self.max_gauges)

    def render(self) -> bytes:
        self.flush()
        sources = [self._retired, *self._sources.values()] if self._retired else list(self._sources.values())
        if not sources:
            return generate_latest(self.registry)
        return generate_latest(Families(merge([self.registry.collect(), *sources], self.max_gauges)))


_FLUSH_EVERY = 256
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})


def _observe_many(child: Histogram, values: list[float]) -> None:
    """``child.observe(v)`` for each value, adding each bucket's count and the sum once. Uses
    the labelled histogram's bucket values (prometheus_client 0.26, pinned); observes one by
    one if they are not there."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for v in values:
            child.observe(v)
        return
    per_bucket: dict[int, int] = {}
    for v in values:
        i = bisect_left(bounds, v)  # the first bound >= v, as Histogram.observe picks
        per_bucket[i] = per_bucket.get(i, 0) + 1
    total.inc(math.fsum(values))
    for i, n in per_bucket.items():
        buckets[i].inc(n)
