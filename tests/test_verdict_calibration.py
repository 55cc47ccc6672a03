"""``calibrate --from-feedback``'s statistics against reviewers whose truth is known (fixed seeds).

A simulated rule is in force at 0.75. Reviewers judge a random share of what it takes; a random review
sample (a uniform rate, and a higher one just below the threshold) brings verdicts on records it did
not take. Every claim the calibration makes ("this threshold reaches the target") is checked against
the truth that generated the verdicts.
"""

from __future__ import annotations

import numpy as np
import pytest

from filter_worker.moderation.stats import clopper_pearson
from filter_worker.tools.verdict_calibration import GRID, LEVEL, calibrate_verdicts, drawn_below, grid, lower_from_drawn

CURRENT = 0.75
TARGET = 0.9


def taken_verdicts(rng: np.random.Generator, n: int, precision: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` verdicts on the rule's decisions, abuse with ``precision`` at every score."""
    return rng.uniform(CURRENT, 1.0, n), rng.random(n) < precision


def test_a_precision_just_below_the_target_is_rarely_claimed():
    """True precision 0.88 everywhere, target 0.9, 150 verdicts: the point-estimate search claimed a
    threshold on most samples; requiring the interval's lower end does in at most a few percent."""
    claims = []
    for seed in range(400):
        score, abuse = taken_verdicts(np.random.default_rng(seed), 150, 0.88)
        claims.append(calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=0).threshold is not None)
    assert np.mean(claims) <= 0.05, np.mean(claims)


@pytest.mark.parametrize(("precision", "most"), [(0.85, 0.02), (0.90, 0.15)])
def test_no_change_in_truth_no_confident_claim(precision, most):
    """Below the target a claim is wrong; exactly at it, the claim "reaches 0.9" is true but the data
    can rarely show it (about one sample in ten: every threshold is a chance for a lucky run). Both are
    counted over 400 samples of 300 verdicts."""
    claims = []
    for seed in range(400):
        score, abuse = taken_verdicts(np.random.default_rng(1000 + seed), 300, precision)
        claims.append(calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=0).threshold is not None)
    assert np.mean(claims) <= most, np.mean(claims)


def step_truth(proposals: np.ndarray) -> np.ndarray:
    """The true precision at each proposed threshold where precision is 0.6 below 0.85 and 0.98 above."""
    above, band = 1.0 - np.maximum(proposals, 0.85), np.maximum(0.85 - proposals, 0.0)
    return (0.98 * above + 0.6 * band) / (above + band)


def step_proposals(seeds: range, verdicts: int) -> list[float | None]:
    proposals = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        score = rng.uniform(CURRENT, 1.0, verdicts)
        abuse = rng.random(verdicts) < np.where(score >= 0.85, 0.98, 0.6)
        result = calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=0)
        assert result.threshold is None or (result.threshold > CURRENT and result.precision.low >= TARGET)
        proposals.append(result.threshold)
    return proposals


def test_a_threshold_is_raised_to_where_the_truth_reaches_the_target():
    """Precision 0.6 below 0.85 and 0.98 above, 400 verdicts: the proposal rises from 0.75 in 199 of 200
    samples, and its true precision misses 0.9 in 1 of them (at most 2.5 % of all samples may)."""
    proposals = step_proposals(range(2000, 2200), 400)
    made = np.array([p for p in proposals if p is not None])
    assert len(made) >= 0.95 * len(proposals)
    assert np.mean(step_truth(made) < TARGET) * len(made) / len(proposals) <= 0.025


@pytest.mark.parametrize(("precision", "verdicts"), [(0.89, 300), (0.895, 300), (0.895, 1000)])
def test_a_precision_just_under_the_target_is_claimed_at_most_at_the_nominal_rate(precision, verdicts):
    """Every claim is wrong here: the scan over every score claimed a true 0.895 in 9 % (300 verdicts)
    to 11 % (1000) of samples, the error piling up over its many thresholds. The grid, corrected, holds
    the one-sided 2.5 % of the 95 % interval over all its thresholds together (0.75 % and none measured
    at 0.895, none at 0.89)."""
    claims = [
        calibrate_verdicts(
            *taken_verdicts(np.random.default_rng(7000 + seed), verdicts, precision), CURRENT, TARGET, resamples=0
        ).threshold
        is not None
        for seed in range(400)
    ]
    assert np.mean(claims) <= 0.025, np.mean(claims)


def test_the_grid_is_fixed_by_the_scores_and_shares_the_error_among_its_points():
    counts = np.arange(1, 101)  # 100 distinct scores
    assert grid(counts).tolist() == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99] and GRID == 10
    ties = np.array([50, 60, 100])  # a run of 50 equal top scores: a threshold takes all of it or none
    assert grid(ties).tolist() == [0, 1, 2]
    assert pytest.approx(0.025) == LEVEL * GRID


def test_too_few_verdicts_are_refused_and_the_interval_is_exact():
    result = calibrate_verdicts(np.full(6, 0.95), np.ones(6, dtype=bool), CURRENT, TARGET, resamples=50)
    assert result.refused and result.needed == 57 and result.threshold is None
    assert (round(result.precision.low, 2), result.precision.high) == (0.54, 1.0)
    assert result.precision.low == pytest.approx(clopper_pearson(6, 6)[0])


def test_the_bootstrap_repeats_the_whole_choice_and_is_seeded():
    rng = np.random.default_rng(3)
    score = rng.uniform(CURRENT, 1.0, 300)
    abuse = rng.random(300) < np.where(score >= 0.85, 0.99, 0.5)
    first = calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=300, seed=7)
    again = calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=300, seed=7)
    assert first.threshold_interval == again.threshold_interval and first.passed_share == again.passed_share
    low, high = first.threshold_interval
    assert low <= first.threshold <= high and low > CURRENT
    assert 0.5 < first.passed_share <= 1.0


# ---- lowering, from records drawn at random below the threshold ----

RATE, NEAR_RATE, MARGIN = 0.002, 0.05, 0.1


def drawn_stream(rng: np.random.Generator, abuse_below: float, records: int = 200_000):
    """A stream's records below the threshold that the sampler drew: their scores, verdicts and
    probabilities. Scores are uniform; below 0.6 a tenth is abuse, from 0.6 to 0.75 ``abuse_below``."""
    score = rng.uniform(0.0, CURRENT, records)
    probability = np.where(score >= CURRENT - MARGIN, NEAR_RATE, RATE)
    drawn = rng.random(records) < probability
    score, probability = score[drawn], probability[drawn]
    abuse = rng.random(len(score)) < np.where(score >= 0.6, abuse_below, 0.1)
    return score, abuse, probability


def band_truth(threshold: float, abuse_below: float) -> float:
    """The true precision of the records between ``threshold`` and 0.75."""
    upper = CURRENT - max(threshold, 0.6)
    lower = max(0.6 - threshold, 0.0)
    return (abuse_below * upper + 0.1 * lower) / (upper + lower)


def test_a_threshold_is_lowered_only_as_far_as_the_records_it_adds_reach_the_target():
    claims, truths = 0, []
    for seed in range(200):
        result = lower_from_drawn(*drawn_stream(np.random.default_rng(4000 + seed), 0.97), CURRENT, TARGET)
        if result.threshold is not None:
            claims += 1
            truths.append(band_truth(result.threshold, 0.97))
            assert result.threshold < CURRENT and result.precision.low >= TARGET
    assert claims >= 190, "abuse at 0.97 just below the threshold: lowering is found"
    assert np.mean(np.array(truths) >= TARGET) >= 0.95


@pytest.mark.parametrize(("abuse_below", "most"), [(0.89, 0.025), (0.85, 0.025), (0.5, 0.0)])
def test_no_lowering_where_the_records_below_miss_the_target(abuse_below, most):
    claims = [
        lower_from_drawn(*drawn_stream(np.random.default_rng(5000 + seed), abuse_below), CURRENT, TARGET).threshold
        is not None
        for seed in range(200)
    ]
    assert np.mean(claims) <= most, np.mean(claims)


def test_lowering_is_offered_only_when_the_threshold_in_force_is_kept():
    rng = np.random.default_rng(6)
    below = drawn_stream(rng, 0.97)
    score, abuse = taken_verdicts(rng, 400, 0.98)
    kept = calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=0, below=below)
    assert kept.threshold == CURRENT and kept.lowering is not None and kept.lowering.threshold < CURRENT
    score, abuse = taken_verdicts(rng, 400, 0.80)
    failing = calibrate_verdicts(score, abuse, CURRENT, TARGET, resamples=0, below=below)
    assert failing.lowering is None


def test_records_an_earlier_rule_takes_never_reach_the_rule_being_lowered():
    scores = [
        {"very-negative": 0.2, "negative": 0.7},
        {"very-negative": 0.95, "negative": 0.99},  # dropped by the earlier rule
        {"negative": 0.7},  # drawn before very-negative existed: cannot tell
        {"very-negative": 0.1},  # drawn before negative existed
    ]
    assert drawn_below(scores, "negative", [("very-negative", 0.9)]).tolist() == [True, False, False, False]
