"""Workers' registries merged into the primary's /metrics: one valid exposition, summed counters
and histograms, max for the gauges named so, min for creation times."""

from __future__ import annotations

import logging
import pickle

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sqlproxy.metrics import Metrics
from sqlproxy.metrics_merge import Families, families_from, merge, snapshot
from sqlproxy.pipeline.errors import Denied
from sqlproxy.pipeline.request import Request
from sqlproxy.ratelimit import RateLimitConfig, RateLimiter
from sqlproxy.ratelimit.config import DistributedRateLimitConfig

BUCKETS = (0.01, 0.1, 1.0)


def _registry(
    requests: dict[tuple[str, str], int],
    latencies: dict[str, list[float]],
    up: dict[str, int],
    connections: int,
) -> CollectorRegistry:
    """A registry shaped like the proxy's: labelled counter, labelled histogram, a max gauge and a
    summed gauge."""
    r = CollectorRegistry()
    c = Counter("t_requests", "Requests", ["door", "decision"], registry=r)
    for labels, n in requests.items():
        c.labels(*labels).inc(n)
    h = Histogram("t_seconds", "Latency", ["door"], buckets=BUCKETS, registry=r)
    for door, values in latencies.items():
        for v in values:
            h.labels(door).observe(v)
    g = Gauge("t_up", "Readiness", ["database"], registry=r)
    for db, v in up.items():
        g.labels(db).set(v)
    Gauge("t_connections", "Connections", registry=r).set(connections)
    return r


def _parse(text: bytes) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for fam in text_string_to_metric_families(text.decode()):
        assert fam.name not in out, f"family {fam.name} twice"
        out[fam.name] = fam
    return out


def _value(fams: dict[str, Metric], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in fams[family].samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (family, sample, labels, fams[family].samples)
    return found[0]


def _type_lines(text: bytes) -> list[str]:
    return [line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")]


def _merged(*registries: CollectorRegistry, max_gauges: frozenset[str] = frozenset({"t_up"})) -> bytes:
    first, *others = registries
    sources: list[list[Metric]] = [list(first.collect())]
    sources += [families_from(snapshot(r)) for r in others]
    return generate_latest(Families(merge(sources, max_gauges)))


@pytest.fixture
def three() -> tuple[CollectorRegistry, CollectorRegistry, CollectorRegistry]:
    primary = _registry({("http", "allow"): 2}, {"http": [0.005]}, {"main": 1}, connections=1)
    w1 = _registry(
        {("http", "allow"): 3, ("wire", "allow"): 10, ("wire", "deny"): 1},
        {"wire": [0.005, 0.05, 0.5, 5.0]},
        {"main": 0, "other": 0},
        connections=4,
    )
    w2 = _registry(
        {("wire", "allow"): 7},
        {"wire": [0.05, 0.05], "http": [0.5]},
        {"main": 1, "other": 0},
        connections=5,
    )
    only_w2 = Counter("t_worker_only", "Only the second worker has it", ["database"], registry=w2)
    only_w2.labels("main").inc(4)
    return primary, w1, w2


def test_snapshot_round_trip_keeps_families_and_samples(three: tuple[CollectorRegistry, ...]) -> None:
    r = three[1]
    fams = families_from(snapshot(r))
    assert fams == list(r.collect())
    assert generate_latest(Families(fams)) == generate_latest(r)


def test_prometheus_objects_pickle_too(three: tuple[CollectorRegistry, ...]) -> None:
    # The snapshot uses plain tuples for size and speed, not because Metric/Sample do not pickle.
    fams = list(three[1].collect())
    assert pickle.loads(pickle.dumps(fams)) == fams  # noqa: S301 - bytes made just above


def test_counters_are_summed_per_label_set(three: tuple[CollectorRegistry, ...]) -> None:
    fams = _parse(_merged(*three))
    assert _value(fams, "t_requests", "t_requests_total", door="http", decision="allow") == 5
    assert _value(fams, "t_requests", "t_requests_total", door="wire", decision="allow") == 17
    assert _value(fams, "t_requests", "t_requests_total", door="wire", decision="deny") == 1
    assert len([s for s in fams["t_requests"].samples if s.name == "t_requests_total"]) == 3


def test_histograms_sum_buckets_sum_and_count(three: tuple[CollectorRegistry, ...]) -> None:
    fams = _parse(_merged(*three))

    def bucket(door: str, le: str) -> float:
        return _value(fams, "t_seconds", "t_seconds_bucket", door=door, le=le)

    # wire: 0.005 0.05 0.5 5.0 (w1) and 0.05 0.05 (w2)
    assert [bucket("wire", le) for le in ("0.01", "0.1", "1.0", "+Inf")] == [1, 4, 5, 6]
    assert _value(fams, "t_seconds", "t_seconds_count", door="wire") == 6
    assert _value(fams, "t_seconds", "t_seconds_sum", door="wire") == pytest.approx(5.655)
    # http: 0.005 (primary) and 0.5 (w2)
    assert [bucket("http", le) for le in ("0.01", "0.1", "1.0", "+Inf")] == [1, 1, 2, 2]
    assert _value(fams, "t_seconds", "t_seconds_count", door="http") == 2
    assert _value(fams, "t_seconds", "t_seconds_sum", door="http") == pytest.approx(0.505)


def test_gauges_sum_by_default_and_max_when_named(three: tuple[CollectorRegistry, ...]) -> None:
    fams = _parse(_merged(*three))
    assert _value(fams, "t_connections", "t_connections") == 10
    assert _value(fams, "t_up", "t_up", database="main") == 1
    assert _value(fams, "t_up", "t_up", database="other") == 0
    # Not named: summed like any gauge.
    summed = _parse(_merged(*three, max_gauges=frozenset()))
    assert _value(summed, "t_up", "t_up", database="main") == 2


def test_family_only_in_a_worker_appears(three: tuple[CollectorRegistry, ...]) -> None:
    fams = _parse(_merged(*three))
    assert fams["t_worker_only"].documentation == "Only the second worker has it"
    assert _value(fams, "t_worker_only", "t_worker_only_total", database="main") == 4


def test_created_takes_the_earliest() -> None:
    a = list(CollectorRegistry().collect())  # nothing
    fam_a = CounterMetricFamily("t_c", "c", labels=["x"], created=200.0)
    fam_a.add_metric(["1"], 1, created=200.0)
    fam_b = CounterMetricFamily("t_c", "c", labels=["x"])
    fam_b.add_metric(["1"], 2, created=100.0)
    fam_c = CounterMetricFamily("t_c", "c", labels=["x"])
    fam_c.add_metric(["1"], 4, created=300.0)
    out = merge([a, [fam_a], [fam_b], [fam_c]])
    values = {s.name: s.value for s in out[0].samples}
    assert values == {"t_c_total": 7, "t_c_created": 100.0}


def test_created_of_real_counters_and_histograms(three: tuple[CollectorRegistry, ...]) -> None:
    want: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for r in three:
        for fam in r.collect():
            for s in fam.samples:
                if s.name.endswith("_created"):
                    key = (s.name, tuple(sorted(s.labels.items())))
                    want[key] = min(s.value, want.get(key, s.value))
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in merge([list(r.collect()) for r in three])
        for s in fam.samples
        if s.name.endswith("_created")
    }
    assert got == want


def test_one_valid_exposition_each_family_once(three: tuple[CollectorRegistry, ...]) -> None:
    text = _merged(*three)
    types = _type_lines(text)
    assert len(types) == len(set(types))
    assert set(types) == set(_type_lines(generate_latest(three[1])) + _type_lines(generate_latest(three[2])))
    # HELP and TYPE come from the first source with the family, samples follow their family.
    fams = _parse(text)
    assert fams["t_requests"].type == "counter"
    assert fams["t_seconds"].type == "histogram"
    assert fams["t_requests"].documentation == "Requests"


def test_help_from_the_first_source_with_the_family() -> None:
    a = GaugeMetricFamily("t_g", "from a", value=1)
    b = GaugeMetricFamily("t_g", "from b", value=2)
    c = GaugeMetricFamily("t_h", "only c", value=3)
    out = merge([[a], [b, c], [GaugeMetricFamily("t_h", "later c", value=4)]])
    assert [(f.name, f.documentation, [s.value for s in f.samples]) for f in out] == [
        ("t_g", "from a", [3]),
        ("t_h", "only c", [7]),
    ]


def test_sources_are_not_modified(three: tuple[CollectorRegistry, ...]) -> None:
    sources = [families_from(snapshot(r)) for r in three]
    before = [[list(f.samples) for f in fams] for fams in sources]
    merge(sources, {"t_up"})
    assert [[list(f.samples) for f in fams] for fams in sources] == before


def test_mismatched_type_keeps_the_first_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    primary = GaugeMetricFamily("t_mismatch_once", "a gauge here", value=1)
    worker = CounterMetricFamily("t_mismatch_once", "a counter there", value=5)
    with caplog.at_level(logging.WARNING, logger="sqlproxy.metrics_merge"):
        for _ in range(3):
            out = merge([[primary], [worker], [GaugeMetricFamily("t_mismatch_once", "", value=2)]])
            assert len(out) == 1
            assert out[0].type == "gauge"
            assert [(s.name, s.value) for s in out[0].samples] == [("t_mismatch_once", 3)]
    warnings = [r for r in caplog.records if "t_mismatch_once" in r.getMessage()]
    assert len(warnings) == 1


def test_info_is_not_summed() -> None:
    regs = [CollectorRegistry() for _ in range(3)]
    for r in regs:
        Info("t_build", "Build", registry=r).info({"version": "1"})
    fams = _parse(_merged(*regs))
    # The text parser names the family after its one sample (prometheus writes it as a gauge).
    assert _value(fams, "t_build_info", "t_build_info", version="1") == 1


def test_unversioned_snapshot_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        families_from(pickle.dumps((99, [])))


def test_custom_collector_samples_survive_the_snapshot() -> None:
    class _C(Collector):
        def collect(self) -> list[Metric]:
            g = GaugeMetricFamily("t_custom", "custom", labels=["level"])
            g.add_metric(["global"], 0.25)
            d = CounterMetricFamily("t_custom_decisions", "decisions", labels=["level", "result"])
            d.add_metric(["all", "admitted"], 9)
            return [g, d]

    r = CollectorRegistry()
    r.register(_C())
    assert families_from(snapshot(r)) == list(r.collect())


# The project's Metrics.


def _request(door: str, denied: bool = False) -> Request:
    req = Request(door=door, sql="SELECT 1", source_ip="127.0.0.1")
    req.stage_seconds = {"analyze": 0.00003, "execute": 0.0002}
    if denied:
        req.error = Denied("no", rule="r")
    return req


def test_render_without_sources_is_the_registry_exposition() -> None:
    m = Metrics()
    m.observe_request(_request("wire"))
    m.upstream_up.labels("main").set(1)
    text = m.render()
    assert text == generate_latest(m.registry)
    m.update_source("w1", Metrics().snapshot())
    m.forget_source("w1")
    assert m.render() == generate_latest(m.registry)
    m.forget_source("never there")


def test_metrics_merges_worker_snapshots() -> None:
    primary, w1, w2 = Metrics(), Metrics(), Metrics()
    for _ in range(3):
        primary.observe_request(_request("http"))
    for _ in range(5):
        w1.observe_request(_request("wire"))
    w1.observe_request(_request("wire", denied=True))
    for _ in range(2):
        w2.observe_request(_request("wire"))
    primary.upstream_up.labels("main").set(0)
    w1.upstream_up.labels("main").set(1)
    w2.upstream_up.labels("main").set(1)
    primary.pool_size.labels("main", "open").set(2)
    w1.pool_size.labels("main", "open").set(3)
    w2.pool_size.labels("main", "open").set(4)

    # snapshot() adds the buffered observations first (none of these reached _FLUSH_EVERY).
    primary.update_source(1, w1.snapshot())
    primary.update_source(2, w2.snapshot())
    text = primary.render()
    fams = _parse(text)
    types = _type_lines(text)
    assert len(types) == len(set(types))
    assert set(types) == set(_type_lines(generate_latest(primary.registry)))

    req = "sqlproxy_requests"
    assert _value(fams, req, req + "_total", door="http", decision="allow") == 3
    assert _value(fams, req, req + "_total", door="wire", decision="allow") == 7
    assert _value(fams, req, req + "_total", door="wire", decision="deny") == 1
    lat = "sqlproxy_request_seconds"
    assert _value(fams, lat, lat + "_count", door="wire") == 8
    assert _value(fams, lat, lat + "_bucket", door="wire", le="+Inf") == 8
    stage = "sqlproxy_stage_seconds"
    assert _value(fams, stage, stage + "_count", stage="analyze") == 11
    assert _value(fams, stage, stage + "_sum", stage="execute") == pytest.approx(11 * 0.0002)
    assert _value(fams, "sqlproxy_upstream_up", "sqlproxy_upstream_up", database="main") == 1
    pool = "sqlproxy_pool_connections"
    assert _value(fams, pool, pool, database="main", state="open") == 9

    # A worker's newer snapshot replaces its older one; a forgotten worker no longer counts.
    w2.observe_request(_request("wire"))
    primary.update_source(2, w2.snapshot())
    fams = _parse(primary.render())
    assert _value(fams, req, req + "_total", door="wire", decision="allow") == 8
    primary.forget_source(1)
    fams = _parse(primary.render())
    assert _value(fams, req, req + "_total", door="wire", decision="allow") == 3
    assert not [s for s in fams[req].samples if s.labels.get("decision") == "deny"]
    assert _value(fams, pool, pool, database="main", state="open") == 6
    primary.forget_source(2)
    assert primary.render() == generate_latest(primary.registry)


def test_other_collectors_on_the_registry_are_merged_too() -> None:
    # The rate limiter registers a collector on the same registry (runtime.py).
    primary, w1, w2 = Metrics(), Metrics(), Metrics()
    for i, m in enumerate((primary, w1, w2)):
        rl = RateLimiter(RateLimitConfig.model_validate({}), DistributedRateLimitConfig())
        rl.admitted = 10 * (i + 1)
        rl.register_metrics(m.registry)
    primary.update_source("a", w1.snapshot())
    primary.update_source("b", w2.snapshot())
    text = primary.render()
    fams = _parse(text)
    dec = "sqlproxy_ratelimit_decisions"
    assert _value(fams, dec, dec + "_total", level="all", result="admitted") == 60
    types = _type_lines(text)
    assert len(types) == len(set(types))


def test_a_retired_worker_keeps_its_counts_and_loses_its_gauges() -> None:
    primary, w1 = Metrics(), Metrics()
    for _ in range(4):
        w1.observe_request(_request("wire"))
    w1.pool_size.labels("main", "open").set(3)
    primary.update_source(1, w1.snapshot())
    primary.retire_source(1)
    primary.retire_source(1)  # once only: nothing left to retire
    # The worker's replacement starts counting from zero: the totals go on from 4.
    again = Metrics()
    again.observe_request(_request("wire"))
    primary.update_source(1, again.snapshot())
    fams = _parse(primary.render())
    req = "sqlproxy_requests"
    assert _value(fams, req, req + "_total", door="wire", decision="allow") == 5
    lat = "sqlproxy_request_seconds"
    assert _value(fams, lat, lat + "_count", door="wire") == 5
    pool = "sqlproxy_pool_connections"
    assert not [s for s in fams[pool].samples if s.labels.get("state") == "open"]
