"""Request metrics are buffered and added in batches; a scrape must read exactly what observing
each request at once would have given."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sqlproxy.metrics import _LATENCY_BUCKETS, _STAGE_BUCKETS, Metrics
from sqlproxy.pipeline.errors import Denied
from sqlproxy.pipeline.request import Request


def _requests(n: int) -> list[Request]:
    out = []
    for i in range(n):
        req = Request(door="wire" if i % 3 else "http", sql="SELECT 1", source_ip="127.0.0.1")
        req.stage_seconds = {"analyze": i * 0.00003, "policy": 0.00001 * (i % 5), "execute": 0.00025}
        if i % 7 == 0:
            req.error = Denied("no", rule="r")
        out.append(req)
    return out


def _reference(reqs: list[Request], elapsed: list[float]) -> dict[str, float]:
    r = CollectorRegistry()
    requests = Counter("sqlproxy_requests", "", ["door", "decision"], registry=r)
    latency = Histogram("sqlproxy_request_seconds", "", ["door"], buckets=_LATENCY_BUCKETS, registry=r)
    stage = Histogram("sqlproxy_stage_seconds", "", ["stage"], buckets=_STAGE_BUCKETS, registry=r)
    for req, seconds in zip(reqs, elapsed, strict=True):
        requests.labels(req.door, req.error.decision if req.error else "allow").inc()
        latency.labels(req.door).observe(seconds)
        for name, s in req.stage_seconds.items():
            stage.labels(name).observe(s)
    return _samples(generate_latest(r))


def _samples(text: bytes) -> dict[str, float]:
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("sqlproxy_") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _names(samples: dict[str, float]) -> set[str]:
    return {k.split("{")[0] for k in samples}


def test_buffered_observations_render_like_direct_ones() -> None:
    m = Metrics()
    reqs = _requests(600)  # more than one automatic flush, and a remainder for render()
    # Elapsed times spread over several latency buckets, each at least 0.1 ms from a bound.
    elapsed = [(i % 17) * 0.0007 for i in range(len(reqs))]
    for req, seconds in zip(reqs, elapsed, strict=True):
        req.started = time.perf_counter() - seconds
        m.observe_request(req)
    want = _reference(reqs, elapsed)
    got = {k: v for k, v in _samples(m.render()).items() if k.split("{")[0] in _names(want)}
    assert set(got) == set(want)
    for name, value in want.items():
        if name.startswith("sqlproxy_request_seconds_sum"):
            assert abs(got[name] - value) < 0.05, name  # the elapsed clock ran on a little
        elif "_sum" in name:
            assert abs(got[name] - value) < 1e-12, name  # added per batch: float rounding
        else:
            assert got[name] == value, name
    assert got['sqlproxy_requests_total{decision="deny",door="http"}'] == 29.0
