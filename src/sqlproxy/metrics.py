"""Prometheus metrics. One registry per runtime (not the global one) so that several proxies in
one test process do not collide."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from sqlproxy.pipeline.request import Request

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5)


class Metrics:
    def __init__(self) -> None:
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
        self.upstream_up = Gauge(
            "sqlproxy_upstream_up", "Upstream readiness (1 ready, 0 not)", ["database"], registry=r
        )
        self._requests: dict[tuple[str, str], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self._stage: dict[str, Histogram] = {}

    def observe_request(self, req: Request) -> None:
        # Runs for every request. prometheus_client's labels() validates and locks on each
        # call (about half the cost here), so the labelled children are looked up once.
        decision = req.error.decision if req.error is not None else "allow"
        key = (req.door, decision)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(req.door, decision)
        counter.inc()
        latency = self._latency.get(req.door)
        if latency is None:
            latency = self._latency[req.door] = self.latency.labels(req.door)
        latency.observe(req.elapsed_ms / 1000.0)
        stages = self._stage
        for stage, seconds in req.stage_seconds.items():
            child = stages.get(stage)
            if child is None:
                child = stages[stage] = self.stage.labels(stage)
            child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
