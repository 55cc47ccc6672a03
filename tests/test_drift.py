"""Score drift: the index itself, the sliding windows, the reference file, and the metrics they feed.

Scores are drawn from seeded Beta distributions, so every number here is the same on every run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import generate_latest

from filter_worker.config import ConfigError, RoutingSettings, load_settings
from filter_worker.metrics import Metrics
from filter_worker.pipeline.drift import (
    SCORE_EDGES,
    DriftMonitor,
    bins_of,
    histogram,
    load_reference,
    parse_reference,
    psi,
    reference_of,
)
from filter_worker.pipeline.observe import FLUSH_INTERVAL_S, FLUSH_RECORDS, Observer
from filter_worker.pipeline.routing import Router
from tests.clock import ManualClock

LABELS = ["bad", "good"]
ALERT_THRESHOLD = 0.2  # deploy/prometheus/moderation-alerts.yml


def probs_of(scores: np.ndarray) -> np.ndarray:
    """Two-label probabilities whose "bad" probability is ``scores``: a rule on ["bad"] scores exactly that."""
    return np.stack([scores, 1.0 - scores], axis=1).astype(np.float32)


def sample(a: float, b: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).beta(a, b, size=n)


def reference(scores: np.ndarray, scope: str = "default") -> object:
    return reference_of("m@1", "sample.jsonl", {scope: {"bad": (["bad"], scores.astype(np.float32))}})


def feed(monitor: DriftMonitor, scores: np.ndarray, scope: str = "default", batch: int = 32) -> list[float]:
    """Feed in worker-sized batches; the index after each batch once there is one."""
    seen = []
    for start in range(0, len(scores), batch):
        chunk = probs_of(scores[start : start + batch])
        indices = monitor.observe(chunk, [scope] * len(chunk))
        if indices:
            seen.append(indices[(scope, "bad")])
    return seen


def test_bins_are_closed_below_and_the_last_holds_one():
    scores = np.array([0.0, 0.0099, 0.01, 0.5, 0.99, 1.0, 1.0000001, -0.1])
    assert bins_of(scores, SCORE_EDGES).tolist() == [0, 0, 1, 7, 13, 13, 13, 0]
    assert histogram(scores, SCORE_EDGES).sum() == len(scores)


def test_psi_is_zero_for_equal_shares_and_finite_with_empty_bins():
    counts = np.array([10, 20, 70])
    assert psi(counts, counts * 3) == 0.0
    empty_reference_bin = psi(np.array([0, 50, 50]), np.array([10, 45, 45]))
    assert 0.0 < empty_reference_bin < 1.0, "an empty bin adds a large but finite term"
    assert psi(np.array([10, 45, 45]), np.array([0, 50, 50])) == pytest.approx(
        0.1 * np.log(0.1 / 1e-4) + 2 * (0.5 - 0.45) * np.log(0.5 / 0.45) - 1e-4 * np.log(0.1 / 1e-4), rel=1e-3
    )


def test_an_unshifted_stream_stays_below_the_threshold_and_a_shifted_one_crosses_it():
    base = reference(sample(1, 8, 5000, seed=1))
    unshifted = DriftMonitor(base, LABELS, window=1000)
    steady = feed(unshifted, sample(1, 8, 3000, seed=2))
    assert steady and max(steady) < 0.1, "same distribution, other seed: within the no-change band"

    drifting = DriftMonitor(base, LABELS, window=1000)
    before = feed(drifting, sample(1, 8, 1000, seed=3))
    after = feed(drifting, sample(2, 5, 1500, seed=4))  # the scores move up: mean 0.11 -> 0.29
    assert before[-1] < 0.1
    assert after[-1] > ALERT_THRESHOLD
    crossing = next(i for i, value in enumerate(after) if value > ALERT_THRESHOLD)
    assert 0 < crossing < len(after) - 1, "the index rises as shifted records fill the window"


def test_no_index_until_the_window_is_full_and_the_window_slides():
    base = reference(sample(1, 8, 2000, seed=5))
    monitor = DriftMonitor(base, LABELS, window=100)
    assert monitor.observe(probs_of(sample(1, 8, 99, seed=6)), ["default"] * 99) == {}
    assert set(monitor.observe(probs_of(sample(1, 8, 1, seed=7)), ["default"])) == {("default", "bad")}
    stream = sample(3, 3, 250, seed=8).astype(np.float32)
    feed(monitor, stream, batch=37)
    last_100 = psi(base.rules["default"]["bad"].counts, histogram(stream[-100:], SCORE_EDGES))
    assert monitor.observe(probs_of(stream[-1:]), ["default"])[("default", "bad")] != last_100, "one more record"
    # A batch larger than the window keeps only its newest records.
    fresh = DriftMonitor(base, LABELS, window=100)
    assert fresh.observe(probs_of(stream), ["default"] * 250)[("default", "bad")] == pytest.approx(last_100)


def test_scopes_have_their_own_windows_and_unknown_scopes_are_ignored():
    base = reference_of(
        "m@1",
        "d",
        {
            "default": {"bad": (["bad"], sample(1, 8, 1000, seed=9).astype(np.float32))},
            "kids": {"bad": (["bad"], sample(1, 8, 1000, seed=10).astype(np.float32))},
        },
    )
    monitor = DriftMonitor(base, LABELS, window=100)
    shifted = probs_of(sample(4, 2, 100, seed=11))
    calm = probs_of(sample(1, 8, 100, seed=12))
    both = monitor.observe(np.concatenate([shifted, calm]), ["kids"] * 100 + ["default"] * 100)
    assert both[("kids", "bad")] > 1.0 > 0.1 > both[("default", "bad")]
    assert monitor.observe(calm, ["adults"] * 100) == {}


def test_the_reference_file_round_trips_and_bad_files_name_the_setting(tmp_path):
    base = reference(sample(1, 8, 500, seed=13))
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(base.to_json()))
    loaded = load_reference(path)
    assert loaded.records == {"default": 500} and loaded.edges == SCORE_EDGES and loaded.model == "m@1"
    assert loaded.rules["default"]["bad"].counts.tolist() == base.rules["default"]["bad"].counts.tolist()

    def broken(**change: object) -> dict:
        return {**base.to_json(), **change}

    document = base.to_json()
    for bad, named in [
        (broken(version=2), "version"),
        (broken(format="something else"), "format"),
        (broken(edges=[0.0, 0.5, 0.4, 1.0]), "edges must rise strictly from 0 to 1"),
        (broken(scopes={"default": {**document["scopes"]["default"], "records": 499}}), "not records (499)"),
        (broken(scopes={"kids app": document["scopes"]["default"]}), "'kids app' is not a valid scope name"),
        ([1, 2], "input should be a valid dictionary"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_reference(bad, "ref.json")
        message = str(err.value)
        assert (
            message.startswith("FILTER_DRIFT__REFERENCE=ref.json: not a drift reference") and named in message.lower()
        )
    path.write_text("{oops")
    with pytest.raises(ConfigError, match=r"FILTER_DRIFT__REFERENCE=.*ref.json: not valid JSON"):
        load_reference(path)
    with pytest.raises(ConfigError, match=r"FILTER_DRIFT__REFERENCE=.*absent.json: No such file"):
        load_reference(tmp_path / "absent.json")
    with pytest.raises(
        ConfigError, match=r"scope 'default' rule 'bad' has label\(s\) \['bad'\] that the model does not"
    ):
        DriftMonitor(base, ["toxic", "clean"], window=100)


def test_observer_counts_decisions_and_fills_histograms_and_the_drift_gauge(tmp_path):
    base = reference(sample(1, 8, 1000, seed=14))
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(base.to_json()))
    settings = load_settings(drift={"reference": str(path), "window": 100})
    routing = RoutingSettings.model_validate(
        {"rules": [{"action": "drop", "labels": ["bad"], "min_score": 0.5, "name": "bad"}]}
    )
    router = Router(routing, LABELS)
    metrics = Metrics()
    observer = Observer.from_settings(metrics, settings, LABELS, model="m@1")
    scores = sample(4, 2, 100, seed=15)  # far above the reference
    probs = probs_of(scores)
    decisions = router.decide_batch(probs, ["default"] * 100)
    observer.observe(probs, decisions, router)
    observer.flush()
    registry = metrics.registry
    drops = int((scores.astype(np.float32) >= 0.5).sum())
    assert (
        registry.get_sample_value("filter_decisions_total", {"scope": "default", "action": "drop", "rule": "bad"})
        == drops
    )
    allowed = {"scope": "default", "action": "allow", "rule": "default"}
    assert registry.get_sample_value("filter_decisions_total", allowed) == 100 - drops
    assert registry.get_sample_value("filter_rule_score_count", {"scope": "default", "rule": "bad"}) == 100
    below_half = registry.get_sample_value("filter_rule_score_bucket", {"scope": "default", "rule": "bad", "le": "0.5"})
    assert below_half == int((scores.astype(np.float32) <= 0.5).sum())
    assert registry.get_sample_value("filter_top_label_probability_count", {"scope": "default"}) == 100
    index = registry.get_sample_value("filter_score_psi", {"scope": "default", "rule": "bad"})
    assert index == pytest.approx(
        psi(base.rules["default"]["bad"].counts, histogram(scores.astype(np.float32), SCORE_EDGES))
    )
    assert index > ALERT_THRESHOLD
    assert b"filter_score_psi" in generate_latest(registry)


def test_without_a_reference_there_is_no_drift_gauge():
    metrics = Metrics()
    router = Router(RoutingSettings(rules=[]), LABELS)
    observer = Observer.from_settings(metrics, load_settings(), LABELS, model="m@1")
    probs = probs_of(sample(1, 1, 10, seed=16))
    observer.observe(probs, router.decide_batch(probs, ["default"] * 10), router)
    observer.flush()
    assert (
        metrics.registry.get_sample_value(
            "filter_decisions_total", {"scope": "default", "action": "allow", "rule": "default"}
        )
        == 10
    )
    assert metrics.registry.get_sample_value("filter_top_label_probability_count", {"scope": "default"}) == 10
    assert "filter_score_psi{" not in generate_latest(metrics.registry).decode()


def test_histograms_take_held_rows_after_the_interval_when_caught_up_or_when_the_rules_change():
    metrics = Metrics()
    clock = ManualClock()
    observer = Observer(metrics, clock=clock)
    rules = RoutingSettings.model_validate({"rules": [{"action": "drop", "labels": ["bad"], "min_score": 0.99}]})
    router = Router(rules, LABELS)
    registry = metrics.registry

    def scored() -> float:
        return registry.get_sample_value("filter_top_label_probability_count", {"scope": "default"}) or 0.0

    def decided() -> float | None:
        return registry.get_sample_value(
            "filter_decisions_total", {"scope": "default", "action": "allow", "rule": "default"}
        )

    calm = probs_of(sample(1, 8, 10, seed=17))
    observer.observe(calm, router.decide_batch(calm, ["default"] * 10), router)
    assert decided() == 10, "decisions are counted at once"
    assert scored() == 0, "score rows are held"
    clock.now += FLUSH_INTERVAL_S / 2
    observer.flush_if_due(caught_up=False)
    assert scored() == 0
    clock.now += FLUSH_INTERVAL_S / 2
    observer.flush_if_due(caught_up=False)
    assert scored() == 10, "held no longer than the interval"

    observer.observe(calm, router.decide_batch(calm, ["default"] * 10), router)
    observer.flush_if_due(caught_up=True)
    assert scored() == 20, "caught up: nothing more is coming, so nothing is held"

    observer.observe(calm, router.decide_batch(calm, ["default"] * 10), router)
    reloaded = Router(RoutingSettings(rules=[]), LABELS)
    observer.observe(calm, reloaded.decide_batch(calm, ["default"] * 10), reloaded)
    assert scored() == 30, "rows decided under the old rules are scored under them before new ones are held"
    assert registry.get_sample_value("filter_rule_score_count", {"scope": "default", "rule": "rules[0]"}) == 30

    many = probs_of(sample(1, 8, FLUSH_RECORDS, seed=18))
    observer.observe(many, reloaded.decide_batch(many, ["default"] * FLUSH_RECORDS), reloaded)
    assert scored() == 40 + FLUSH_RECORDS, "a full hold is fed at once"
