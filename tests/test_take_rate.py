"""The day take rate and its z against traffic of known truth (fixed seeds): bursty senders with nothing
changed, and a drop rate doubling from 1 % to 2 %."""

from __future__ import annotations

import numpy as np
import pytest

from filter_worker.config import RoutingSettings
from filter_worker.model.head import Head
from filter_worker.moderation.drift import DriftMonitor, reference_of
from filter_worker.moderation.drift_metrics import DriftExporter
from filter_worker.moderation.stats import two_proportion_z
from filter_worker.moderation.take_rate import FEWEST_MINUTES, DayCounts, day_z
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.routing import Router
from tests.clock import ManualClock
from tests.test_drift import take_rate_alert_numbers

HEAD = Head(("bad", "good"), "softmax")

DAY = 86_400  # records: one a second
REFERENCE = 5000


def bursty(rng: np.random.Generator, records: int, rate: float, tail: float | None) -> np.ndarray:
    """Whether each record in time order is taken. Senders send bursts of identical messages (all taken
    or none) whose sizes are Pareto with ``tail`` (None: every record its own sender)."""
    if tail is None:
        return rng.random(records) < rate
    sizes = np.minimum(np.floor(rng.pareto(tail, records) + 1).astype(np.int64), 5000)
    bursts = int(np.searchsorted(np.cumsum(sizes), records)) + 1
    return np.repeat(rng.random(bursts) < rate, sizes[:bursts])[:records]


def day_and_window_z(rng: np.random.Generator, live: float, reference: float, tail: float | None):
    """A day of traffic: the day z (per-minute counts), the old pooled z of its last 1000 records, the
    day's and the window's shares, and the reference's."""
    taken = bursty(rng, DAY, live, tail)
    reference_taken = int((rng.random(REFERENCE) < reference).sum())
    per_minute = taken.reshape(-1, 60).sum(axis=1).astype(np.float64)
    z = day_z(per_minute, np.full(len(per_minute), 60.0), reference_taken, REFERENCE)
    window = two_proportion_z(int(taken[-1000:].sum()), 1000, reference_taken, REFERENCE)
    return z, window, taken.mean(), taken[-1000:].mean(), reference_taken / REFERENCE


@pytest.mark.parametrize(("tail", "most_sd"), [(1.5, 1.35), (2.0, 1.2)])
def test_bursts_with_nothing_changed_leave_the_day_z_near_standard(tail, most_sd):
    """Pareto-sized bursts at a 10 % take rate, nothing changed, 200 days: the window's pooled z had a
    standard deviation of 5.2 (tail 1.5) and 2.0 (tail 2); the day z's 1.13 and 1.04, crossing 4 on
    no day (with tail 1.2, not tested here: 1.30, and 1 day in 200)."""
    rng = np.random.default_rng(70 + int(tail * 10))
    days = [day_and_window_z(rng, 0.10, 0.10, tail) for _ in range(200)]
    day, window = np.array([d[0] for d in days]), np.array([d[1] for d in days])
    assert window.std() > 1.5, "the old statistic, on the same traffic"
    assert day.std() <= most_sd, day.std()
    assert np.mean(np.abs(day) > 4) <= 0.01


def test_a_doubled_drop_rate_is_seen_within_a_day():
    """1 % to 2 %, independent records, 100 days: the alert's condition (|z| > 4 and half again the
    reference's rate) on the 1000-record window held at the end of 15 days; on the day rate, 97 of 100.
    Bursty (tail 1.5): 36 of 100, bounded here by 20: bursts hold less information than their records."""
    rng = np.random.default_rng(80)

    most_z, ratio = take_rate_alert_numbers()

    def caught(z: float, live: float, reference: float) -> bool:
        return abs(z) > most_z and (live > ratio * reference or live < reference / ratio)

    plain = [day_and_window_z(rng, 0.02, 0.01, None) for _ in range(100)]
    day = np.mean([caught(z, live, ref) for z, _, live, _, ref in plain])
    window = np.mean([caught(w, live, ref) for _, w, _, live, ref in plain])
    assert day >= 0.95 and window <= 0.5, (day, window)
    burst = [day_and_window_z(rng, 0.02, 0.01, 1.5) for _ in range(100)]
    assert np.mean([caught(z, live, ref) for z, _, live, _, ref in burst]) >= 0.2


def test_day_counts_keep_a_day_and_start_afresh_at_another_threshold():
    counts = DayCounts((("bad",), 0.9))
    for minute in range(FEWEST_MINUTES - 1):
        counts.add(np.array([0.95, 0.1, 0.2, 0.3]), minute * 60.0)
    assert counts.rate(100, 1000) is None, "too few minutes to estimate a variance"
    counts.add(np.array([0.95, 0.1, 0.2, 0.3]), (FEWEST_MINUTES - 1) * 60.0)
    rate = counts.rate(100, 1000)
    assert (rate.live, rate.taken, rate.records) == (0.25, FEWEST_MINUTES, 4 * FEWEST_MINUTES)
    counts.add(np.array([0.1]), (FEWEST_MINUTES + 1440) * 60.0)  # a day later: the old minutes left
    assert counts.rate(100, 1000) is None


def test_the_exporter_publishes_the_day_rate_and_restarts_it_when_the_threshold_changes():
    clock = ManualClock(0.0)
    rng = np.random.default_rng(81)
    reference = reference_of("m@1", "d", {"default": {"bad": (["bad"], np.where(rng.random(5000) < 0.1, 0.95, 0.2))}})
    rules = [{"action": "drop", "labels": ["bad"], "min_score": 0.9, "name": "bad"}]
    router = Router(RoutingSettings.model_validate({"rules": rules}), HEAD)
    metrics = Metrics()
    exporter = DriftExporter(metrics, DriftMonitor(reference, HEAD, window=500, clock=clock))
    labels = {"scope": "default", "rule": "bad"}
    for minute in range(FEWEST_MINUTES):
        clock.now = minute * 60.0
        bad = np.where(rng.random(60) < 0.1, 0.95, 0.2)
        exporter.publish(np.stack([bad, 1 - bad], axis=1), ["default"] * 60, router)
    day = metrics.registry.get_sample_value("filter_take_rate_day", labels)
    assert day == pytest.approx(0.1, abs=0.02)
    assert abs(metrics.registry.get_sample_value("filter_take_rate_day_zscore", labels)) < 4
    assert metrics.registry.get_sample_value("filter_score_psi_day", labels) < 0.05, "the same scores as the reference"
    clock.now += 900.1
    exporter.expire()
    assert metrics.registry.get_sample_value("filter_score_psi_day", labels) is None, "a quiet scope reports nothing"
    exporter.publish(np.array([[0.2, 0.8]]), ["default"], router)
    raised = Router(RoutingSettings.model_validate({"rules": [{**rules[0], "min_score": 0.96}]}), HEAD)
    exporter.publish(np.array([[0.97, 0.03]]), ["default"], raised)
    assert metrics.registry.get_sample_value("filter_take_rate_day", labels) is None, "another rule's rate now"
