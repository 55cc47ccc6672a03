"""Threshold calibration: hand-made scores with a known answer, then the keyword model end to end."""

from __future__ import annotations

import numpy as np
import pytest

from filter_worker.config import ModelSettings, RoutingSettings, Rule
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.routing import Router
from filter_worker.tools.calibration import calibrate, calibration_json, lowest_threshold, rule_scores
from filter_worker.tools.evaluation import pr_curve

# precision at each threshold: 0.9 -> 1, 0.8 -> 1, 0.7 -> 2/3, 0.6 -> 3/4, 0.5 -> 3/5, 0.4 -> 1/2
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
POSITIVE = np.array([True, True, False, True, False, False])


def test_the_lowest_threshold_reaching_the_target_wins_even_when_precision_is_not_monotonic():
    curve = pr_curve(SCORES, POSITIVE)
    assert curve.thresholds[lowest_threshold(curve, 0.75)] == 0.6
    assert curve.thresholds[lowest_threshold(curve, 0.9)] == 0.8
    result = calibrate(SCORES, POSITIVE, 0.75, resamples=200, seed=1)
    assert (result.threshold, result.precision, result.recall, result.taken) == (0.6, 0.75, 1.0, 4)
    result = calibrate(SCORES, POSITIVE, 0.9, resamples=0)
    assert (result.threshold, result.precision, result.recall) == (0.8, 1.0, pytest.approx(2 / 3))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    first = calibrate(SCORES, POSITIVE, 0.75, resamples=300, seed=7)
    again = calibrate(SCORES, POSITIVE, 0.75, resamples=300, seed=7)
    assert first.precision_interval == again.precision_interval and first.threshold_interval == again.threshold_interval
    low, high = first.precision_interval
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert first.threshold_interval[0] in SCORES and first.threshold_interval[1] in SCORES
    assert 0.0 < first.reached_share <= 1.0
    assert calibration_json(first, None)["bootstrap"]["precision"] == (low, high)


def test_an_unreachable_target_reports_the_best_precision_instead():
    result = calibrate(np.array([0.9, 0.8]), np.array([False, True]), 0.95, resamples=50)
    assert not result.meets_target
    assert (result.threshold, result.precision, result.recall) == (0.8, 0.5, 1.0)


def test_calibrated_rule_routes_live_scores_exactly_as_calibrated(keyword_model):
    model = Classifier.load(ModelSettings(name=str(keyword_model)))
    # gold: the first four are negative (positives); "broken" is a false alarm; the last is a miss.
    texts = ["you idiot", "what a loser", "so annoying", "an annoying bug", "the screen is broken"]
    texts += ["hello there", "see you tomorrow", "the meeting is at noon", "wonderful, it crashed again"]
    positive = np.array([True] * 4 + [False] * 4 + [True])
    probs, _ = model.classify(texts)
    labels = ["Very Negative", "Negative"]
    score = rule_scores(probs, model.head, labels)
    result = calibrate(score, positive, 0.8, resamples=100)
    # The five keyword texts score > 0.8, the rest < 0.1: taking the five gives 4/5 precision, 4/5 recall.
    assert result.threshold == score[:5].min() and result.threshold > 0.8
    assert (result.precision, result.recall, result.taken) == (pytest.approx(0.8), pytest.approx(0.8), 5)
    rule = Rule(action="quarantine", labels=labels, min_score=result.threshold)
    router = Router(RoutingSettings(rules=[rule]), model.head)
    assert [router.decide(row).action for row in probs] == ["quarantine"] * 5 + ["allow"] * 4
