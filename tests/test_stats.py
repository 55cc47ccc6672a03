"""The statistics behind every interval an operator reads: closed forms, then simulations of known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from filter_worker.moderation.stats import (
    at_least,
    beta_ppf,
    betainc,
    clopper_pearson,
    effective_size,
    fewest_trials,
    korn_graubard,
    two_proportion_z,
    wilson,
)


@pytest.mark.parametrize("x", [0.001, 0.2, 0.5, 0.77, 0.999])
def test_betainc_matches_its_closed_forms(x):
    assert betainc(1, 1, x) == pytest.approx(x, abs=1e-12)
    assert betainc(3.5, 1, x) == pytest.approx(x**3.5, rel=1e-10)
    assert betainc(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, rel=1e-10)
    assert betainc(2.5, 7, x) + betainc(7, 2.5, 1 - x) == pytest.approx(1.0, abs=1e-12), "symmetry"
    assert betainc(1, 1, 0.0) == 0.0 and betainc(1, 1, 1.0) == 1.0


@pytest.mark.parametrize(("n", "p"), [(10, 0.3), (200, 0.9), (150, 0.88), (1000, 0.01)])
def test_the_binomial_tail_equals_the_sum_of_its_terms(n, p):
    for k in sorted({0, 1, n // 3, int(n * p), n - 1, n}):
        direct = math.fsum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert at_least(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-15)
    assert at_least(n + 1, n, p) == 0.0


@pytest.mark.parametrize(("q", "a", "b"), [(0.025, 6, 1), (0.975, 1, 10), (0.5, 40, 3), (0.01, 0.5, 0.5)])
def test_beta_ppf_inverts_the_cdf(q, a, b):
    assert betainc(a, b, beta_ppf(q, a, b)) == pytest.approx(q, abs=1e-9)


def test_clopper_pearson_known_values():
    # The moderation docs' 6-verdict example: 6 of 6 abuse is not "precision 1.0 for sure".
    low, high = clopper_pearson(6, 6)
    assert low == pytest.approx(0.025 ** (1 / 6), abs=1e-9) and round(low, 2) == 0.54 and high == 1.0
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9))
    low, high = clopper_pearson(5, 10)  # published: [0.1871, 0.8129]
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129)
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def test_fewest_trials_is_the_first_all_success_count_whose_bound_reaches_the_target():
    for target in (0.5, 0.9, 0.95, 0.99):
        n = fewest_trials(target)
        assert clopper_pearson(n, n)[0] >= target > clopper_pearson(n - 1, n - 1)[0]
    assert fewest_trials(0.9) == 36
    with pytest.raises(ValueError):
        fewest_trials(1.0)


def test_wilson_known_values_and_bounds():
    low, high = wilson(0.5, 10)  # published: [0.2366, 0.7634]
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson(1.0, 6)[1] == 1.0 and 0.5 < wilson(1.0, 6)[0] < 0.65
    assert wilson(0.0, 3)[0] == 0.0
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_effective_size_counts_equal_weights_and_discounts_heavy_ones():
    assert effective_size(np.full(50, 2.0)) == pytest.approx(50)
    assert effective_size(np.array([1.0] * 99 + [100.0])) < 5
    assert effective_size(np.array([])) == 0.0


@pytest.mark.parametrize("p", [0.02, 0.3, 0.88, 0.95])
def test_clopper_pearson_covers_the_truth_at_least_as_often_as_it_says(p):
    rng = np.random.default_rng(1)
    trials = 120
    hits = rng.binomial(trials, p, size=2000)
    covered = np.mean([low <= p <= high for low, high in (clopper_pearson(int(x), trials) for x in hits)])
    assert covered >= 0.95, f"coverage {covered:.3f} at p={p}"


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_wilson_on_an_effective_size_covers_a_weighted_share(p):
    """Inverse-probability weights from two sampling rates, a share with a known truth: Wilson on
    Kish's effective size covers it close to the nominal 95 %."""
    rng = np.random.default_rng(2)
    covered = []
    for _ in range(1500):
        weights = np.where(rng.random(300) < 0.3, 10.0, 1.0)  # a third sampled ten times less often
        outcome = rng.random(300) < p
        share = float(np.sum(weights * outcome) / np.sum(weights))
        low, high = wilson(share, effective_size(weights))
        covered.append(low <= p <= high)
    assert np.mean(covered) >= 0.93


def test_two_proportion_z_is_zero_without_a_difference_and_standard_normal_under_the_null():
    assert two_proportion_z(100, 1000, 500, 5000) == 0.0
    assert two_proportion_z(0, 1000, 0, 5000) == 0.0
    assert two_proportion_z(250, 1000, 500, 5000) > 10, "a drop rate from 10 % to 25 %"
    rng = np.random.default_rng(3)
    z = [two_proportion_z(int(rng.binomial(1000, 0.1)), 1000, int(rng.binomial(5000, 0.1)), 5000) for _ in range(4000)]
    assert abs(np.mean(z)) < 0.06 and 0.95 < np.std(z) < 1.05
    assert np.mean(np.abs(z) > 1.96) == pytest.approx(0.05, abs=0.015)


@pytest.mark.parametrize(("hits", "size"), [(0, 12), (3, 12), (12, 12), (37, 200)])
def test_korn_graubard_is_clopper_pearson_for_an_unweighted_sample(hits, size):
    """Equal weights: the linearised variance is share (1 - share) / n, so the effective size is n and
    the interval is Clopper–Pearson's on the whole count (0 and n take the fallback size, also n)."""
    share = hits / size
    low, high = korn_graubard(share, share * (1 - share) / size, size, float(size))
    assert (low, high) == pytest.approx(clopper_pearson(hits, size), abs=1e-9)


def test_korn_graubard_never_takes_more_records_than_there_are():
    """A tiny linearised variance would claim an effective size far above the verdicts behind it."""
    assert korn_graubard(0.5, 1e-9, 20, 20.0) == pytest.approx(clopper_pearson(10, 20), abs=1e-9)
