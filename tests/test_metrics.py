from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from filter_worker.metrics import observe_many

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
