"""Every known label combination exists at 0 from the start, and filter_ready follows readiness."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from filter_worker.config import TopicSettings
from filter_worker.monitoring.health import Health
from filter_worker.monitoring.metrics import DEAD_LETTER_ERRORS, Metrics, observe_many


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Label set -> value of the samples called ``name``."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_initialise_creates_every_known_series_at_zero():
    topics = TopicSettings(input=["in-a", "in-b", "^regex.*"])
    metrics = Metrics()
    metrics.initialise(topics.outputs(), topics.input, cache=True)
    r = metrics.registry

    published = samples(r, "filter_records_published_total")
    assert set(published) == {
        (("action", action), ("topic", topic))
        for action in ("allow", "quarantine", "drop", "dead_letter")
        for topic in ("in-a", "in-b")  # a regex subscription names no topic
    }
    assert set(samples(r, "filter_records_consumed_total")) == {(("topic", "in-a"),), (("topic", "in-b"),)}
    dead = samples(r, "filter_dead_letters_total")
    assert {labels[0][1] for labels in dead} == set(DEAD_LETTER_ERRORS)
    assert {"invalid_json", "empty_text", "model_error", "publish_rejected"} <= set(DEAD_LETTER_ERRORS)
    assert {k[0][1] for k in samples(r, "filter_rebalances_total")} == {"assign", "revoke", "lost"}
    assert {k[0][1] for k in samples(r, "filter_routing_reloads_total")} == {"applied", "refused"}
    assert {k[0][1] for k in samples(r, "filter_shadow_decisions_total")} == {"allow", "quarantine", "drop"}
    assert {k[0][1] for k in samples(r, "filter_cache_records_total")} == {"hit", "miss"}
    assert {k[0][1] for k in samples(r, "filter_forward_tokens_total")} == {"real", "padded"}
    every = [published, dead, samples(r, "filter_rebalances_total"), samples(r, "filter_cache_records_total")]
    assert all(value == 0.0 for series in every for value in series.values())


def test_initialise_without_the_cache_leaves_its_series_out_and_keeps_counts():
    metrics = Metrics()
    metrics.dead_letters.labels("invalid_json").inc(3)
    metrics.initialise(TopicSettings().outputs(), ["messages"], cache=False)
    assert samples(metrics.registry, "filter_cache_records_total") == {}
    assert samples(metrics.registry, "filter_dead_letters_total")[(("error", "invalid_json"),)] == 3.0


def test_filter_ready_follows_health_at_every_scrape():
    now = [0.0]
    health = Health(liveness_window_s=60, clock=lambda: now[0])
    metrics = Metrics()
    metrics.track_readiness(health.ready)
    assert samples(metrics.registry, "filter_ready") == {(): 0.0}
    health.model_ready = health.joined = health.broker_reachable = True
    assert samples(metrics.registry, "filter_ready") == {(): 1.0}
    health.broker_reachable = False
    assert samples(metrics.registry, "filter_ready") == {(): 0.0}


def test_process_metrics_show_restarts():
    assert samples(Metrics().registry, "process_start_time_seconds")


BUCKETS = (0.01, 0.1, 1.0, 10.0)
VALUES = [0.0, 0.01, 0.010001, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0, 11.0, 500.0]


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("h", "h", buckets=BUCKETS, registry=registry)


def test_observe_many_exposes_exactly_what_observe_does():
    one_by_one, histogram = _histogram()
    for value in VALUES:
        histogram.observe(value)
    batched, histogram = _histogram()
    observe_many(histogram, VALUES[:4])
    observe_many(histogram, VALUES[4:])
    observe_many(histogram, [])
    got, expected = _samples(batched), _samples(one_by_one)
    assert {k: v for k, v in got.items() if k != "h_sum"} == {k: v for k, v in expected.items() if k != "h_sum"}
    assert math.isclose(got["h_sum"], expected["h_sum"], rel_tol=1e-12), "the sum, up to addition order"


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    """Sample name with labels -> value, without the creation timestamp."""
    lines = generate_latest(registry).decode().splitlines()
    pairs = (line.rsplit(" ", 1) for line in lines if not line.startswith("#") and "_created" not in line)
    return {name: float(value) for name, value in pairs}
