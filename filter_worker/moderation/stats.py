"""Confidence bounds and tests for the numbers operators act on, without scipy.

Every moderation number shown to an operator (a rule's precision from reviewers' verdicts, recall and
prevalence from a random review sample, a take rate against a reference) is a proportion estimated
from a sample, and a point estimate alone invites acting on noise: 6 of 6 verdicts "abuse" is a
precision of 1.0 that the data cannot tell from 0.6. These functions say how far the truth may be.

- **Clopper–Pearson** (exact binomial) for whole counts: verdicts on a rule's decisions. Never
  narrower than the truth allows (coverage at least the confidence level for every true proportion),
  at the price of being a little wide. Computed from the beta distribution's quantiles, which need the
  regularized incomplete beta function and its inverse: ``betainc`` (a continued fraction, as in
  Numerical Recipes' ``betacf``) and ``beta_ppf`` (bisection on it, to 1e-12).
- **Wilson** (score interval) on Kish's effective sample size, where a weighted share has no whole count
  (the lowering path of ``calibrate --from-feedback``).
- **Korn–Graubard** for recall and prevalence from the random review sample: Clopper–Pearson on the
  effective size that the ratio (Hájek) estimate's linearised variance gives, honest at a dozen events.
- **Two-proportion z-test** for a live take rate against a reference sample, both of which are samples.

scipy would give the same numbers (``scipy.stats.beta.ppf``, ``binomtest``), but it is a 40 MB
dependency for a handful of functions; ``tests/test_stats.py`` checks these against closed forms and
simulations of known truth.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
_CF_ITERATIONS = 300
_CF_EPSILON = 3e-16
_TINY = 1e-300


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _CF_ITERATIONS + 1):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _CF_EPSILON:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0: the beta distribution's CDF."""
    if a <= 0 or b <= 0:
        raise ValueError("a and b must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The beta distribution's quantile: the x with I_x(a, b) = q, by bisection (the CDF is monotone)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be a probability")
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if betainc(a, b, middle) < q:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2


def at_least(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p): the binomial upper tail, through the beta CDF."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    return betainc(successes, trials - successes + 1, p)


@lru_cache(maxsize=65536)
def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided interval of a binomial proportion (each tail (1 - confidence) / 2).

    Cached: a precision window's (abuse, verdicts) pairs repeat, and a window of 200 has at most
    20 000 of them.
    """
    if trials <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2
    low = 0.0 if successes <= 0 else beta_ppf(tail, successes, trials - successes + 1)
    high = 1.0 if successes >= trials else beta_ppf(1.0 - tail, successes + 1, trials - successes)
    return low, high


def fewest_trials(target: float, confidence: float = CONFIDENCE) -> int:
    """How many trials, all successes, it takes for the Clopper–Pearson lower bound to reach ``target``.

    Fewer cannot show the target at all, whatever they say: the floor below which a calibration refuses.
    """
    if target >= 1.0:
        raise ValueError("no sample shows a proportion of 1 with confidence")
    if target <= 0.0:
        return 1
    tail = (1.0 - confidence) / 2
    n = max(1, math.ceil(math.log(tail) / math.log(target)))
    while clopper_pearson(n, n, confidence)[0] < target:  # ceil of a float quotient can fall one short
        n += 1
    return n


def z_value(confidence: float = CONFIDENCE) -> float:
    """The standard normal quantile for a two-sided interval at ``confidence`` (1.96 at 95 %)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(share: float, size: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``share`` over ``size`` trials (``size`` may be an
    effective, non-whole sample size). Unlike the normal (Wald) interval it stays inside [0, 1] and
    does not collapse to a point at 0 or 1."""
    if size <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    z2 = z * z
    centre = (share + z2 / (2 * size)) / (1 + z2 / size)
    half = z * math.sqrt(share * (1 - share) / size + z2 / (4 * size * size)) / (1 + z2 / size)
    # At a share of exactly 0 or 1 the bound is exactly 0 or 1; rounding would leave 0.9999999999999999.
    low = 0.0 if share <= 0.0 else max(0.0, centre - half)
    high = 1.0 if share >= 1.0 else min(1.0, centre + half)
    return low, high


def korn_graubard(
    share: float, variance: float, records: int, fallback: float, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Korn and Graubard's interval for a proportion estimated from a weighted sample: Clopper–Pearson
    on the effective size ``share (1 - share) / variance`` (``variance``: the estimate's, linearised),
    with ``share`` times it as the count; both may be fractional, which the beta quantiles take.

    The effective size is capped at ``records`` (the verdicts it rests on: weighting never adds
    information), and is ``fallback`` (Kish's) where the linearised variance says nothing: a share of
    0 or 1, or a variance of 0. Clopper–Pearson's tails, unlike Wilson's, stay honest with a dozen
    events: Wilson on Kish's size covered a recall 0.90 of the time with about 20 abuse verdicts drawn.
    """
    if records <= 0:
        return 0.0, 1.0
    size = share * (1.0 - share) / variance if variance > 0 and 0.0 < share < 1.0 else fallback
    size = min(max(size, 1e-9), float(records))
    hits = share * size
    tail = (1.0 - confidence) / 2
    low = 0.0 if hits <= 0 else beta_ppf(tail, hits, size - hits + 1)
    high = 1.0 if hits >= size else beta_ppf(1.0 - tail, hits + 1, size - hits)
    return low, high


def effective_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: as many equally weighted observations carry the
    same information. Equal weights give their count; a few heavy ones give less."""
    squares = float(np.square(weights).sum())
    return float(weights.sum()) ** 2 / squares if squares > 0 else 0.0


def two_proportion_z(successes: int, trials: int, reference_successes: int, reference_trials: int) -> float:
    """The pooled two-proportion z statistic of a live share against a reference share.

    Both are samples (the reference is a snapshot of a few thousand records), so the variance has both
    sizes in it; treating the reference share as exact would call chance differences significant.
    0 when neither sample has a success or every record is one (no variance to compare against).
    """
    if trials <= 0 or reference_trials <= 0:
        return 0.0
    pooled = (successes + reference_successes) / (trials + reference_trials)
    variance = pooled * (1 - pooled) * (1 / trials + 1 / reference_trials)
    if variance <= 0:
        return 0.0
    return (successes / trials - reference_successes / reference_trials) / math.sqrt(variance)
