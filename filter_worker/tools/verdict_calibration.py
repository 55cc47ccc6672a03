"""A rule's ``min_score`` from reviewers' verdicts, proposed only where the verdicts can support it.

Verdicts on what a rule took (score at or above the ``min_score`` in force when it was decided) say
how precise the rule is *there*, and nothing about records it never took. So:

- **Raising.** Only verdicts scoring at or above the ``min_score`` in force count (older ones, decided
  under a lower threshold, describe a rule that no longer exists). The proposal is the lowest threshold
  of a coarse grid (``GRID`` thresholds, at every tenth of the verdicts by score) where the lower end of
  the Clopper–Pearson interval of the precision reaches the target, each tested at ``LEVEL``, the 95 %
  interval's one-sided 2.5 % shared among the grid (Bonferroni): whatever the precision curve, a
  proposal whose true precision misses the target comes out in at most 2.5 % of samples. A point
  estimate would do on a lucky run of abuse (a true precision of 0.88 "reached" 0.9 on most samples of
  150 verdicts); the lowest passing threshold of a scan over every score, each at 2.5 %, still gave
  luck a chance per threshold, and claimed a true 0.895 in 9 to 11 % of samples. With fewer verdicts
  than it takes for even an unbroken run of abuse to pass, it refuses.
- **Lowering** needs verdicts on records *below* the threshold, which only random review sampling
  (``FILTER_REVIEW__*``) produces: each is weighted by the inverse of its probability of being drawn.
  A lower threshold is proposed only as far as the records it would add are, by themselves, abuse at
  the target precision (lower end of the Wilson interval on Kish's effective sample size, on the same
  kind of grid at the same ``LEVEL``), so the rule's precision cannot fall below the target by the change.
- **Bootstrap.** The verdicts are resampled with replacement and the whole choice, confidence bound
  included, is repeated on each resample: the spread of the proposed threshold, and how often any
  threshold passed at all. It says how much the proposal depends on the luck of the sample.

Pure: arrays in, a result out. ``tests/test_verdict_calibration.py`` measures how often a proposal
claims a target the truth misses (simulations of known truth).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from filter_worker.moderation.stats import CONFIDENCE, at_least, clopper_pearson, fewest_trials, wilson
from filter_worker.moderation.windows import Estimate
from filter_worker.tools.evaluation import Curve, pr_curve

_CHUNK = 100  # resamples drawn at once: bounds the memory of the bootstrap to _CHUNK x verdicts counts
# Thresholds tested: fewer keep more of the error budget for each (a grid of 10 still finds a threshold
# in every simulated sample where precision steps from 0.6 to 0.98), more would place it finer.
GRID = 10
# Each threshold's one-sided level: the 95 % interval's lower tail shared among the grid.
LEVEL = (1.0 - CONFIDENCE) / 2 / GRID
_CONFIDENCE = 1.0 - 2 * LEVEL  # the two-sided confidence whose lower end is at LEVEL


def grid(counts: np.ndarray) -> np.ndarray:
    """The thresholds tested, as indices into ``counts`` (records taken at each run end, increasing):
    the first run end taking at least j/GRID of the records, j = 1..GRID. The grid depends on the scores
    only, never on the verdicts, so the correction holds; the last point takes every record."""
    marks = np.ceil(counts[-1] * np.arange(1, GRID + 1) / GRID)
    return np.unique(np.searchsorted(counts, marks, side="left"))


@lru_cache(maxsize=64)
def _fewest_hits(target: float, largest: int) -> np.ndarray:
    """``table[n]``: the fewest abuse verdicts among ``n`` whose Clopper–Pearson lower bound at ``LEVEL``
    reaches ``target`` (``n + 1``: none do). Non-decreasing, and rising by at most one from ``n`` to
    ``n + 1``, so it is built in about two binomial tails per ``n``; cached, as the bootstrap and
    repeated calibrations ask for the same table."""
    tail = LEVEL
    table = np.empty(largest + 1, dtype=np.int64)
    table[0] = 1
    hits = 1
    for n in range(1, largest + 1):
        while hits <= n and at_least(hits, n, target) > tail:
            hits += 1
        table[n] = hits
    table.flags.writeable = False
    return table


def _run_ends(ranked: np.ndarray) -> np.ndarray:
    """Index of the last verdict of each run of equal scores (in descending order): a threshold takes a
    whole run or none of it."""
    return np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]


def _last_passing(taken: np.ndarray, hits: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per row, the index of the last run end whose verdicts pass (``hits >= table[taken]``), or -1."""
    passing = hits >= table[taken]
    last = passing.shape[-1] - 1 - np.argmax(passing[..., ::-1], axis=-1)
    return np.where(passing.any(axis=-1), last, -1)


@dataclass(frozen=True, slots=True)
class Lowering:
    """What the drawn verdicts below the threshold in force support: ``threshold`` (None: no lowering),
    how many drawn verdicts lie between it and the one in force, and their weighted precision."""

    threshold: float | None
    drawn: int
    added: int
    precision: Estimate | None


@dataclass(frozen=True, slots=True)
class VerdictCalibration:
    """The result. ``threshold``: the proposed ``min_score`` (``current``: keep it), or None when the
    verdicts cannot show the target anywhere. ``precision`` and ``recall`` (among the reviewed) are at
    the proposal, or at the best threshold when there is none."""

    target_precision: float
    current: float
    reviewed: int
    abuse: int
    needed: int
    threshold: float | None
    best: float
    precision: Estimate
    recall: Estimate
    taken: int
    caught: int
    resamples: int
    threshold_interval: tuple[float, float] | None
    passed_share: float
    lowering: Lowering | None
    curve: Curve

    @property
    def proposed(self) -> float | None:
        """The threshold the charts draw."""
        return self.threshold

    @property
    def refused(self) -> bool:
        """Too few verdicts at or above the threshold in force for any of them to show the target."""
        return self.reviewed < self.needed


def _clopper_pearson(hits: int, size: int) -> Estimate:
    low, high = clopper_pearson(hits, size)
    return Estimate(hits / size if size else 0.0, low, high, size)


def calibrate_verdicts(
    score: np.ndarray,
    abuse: np.ndarray,
    current: float,
    target: float,
    resamples: int = 1000,
    seed: int = 0,
    below: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> VerdictCalibration:
    """Propose a ``min_score`` from verdicts on the rule's decisions (``score``, ``abuse``: one per source,
    all at or above ``current``), and, when those support keeping ``current``, from drawn verdicts
    below it (``below``: their rule scores, abuse, and probabilities of being drawn)."""
    abuse = abuse.astype(bool)
    needed = fewest_trials(target, _CONFIDENCE)
    n = len(score)
    order = np.argsort(-score, kind="stable")
    ranked, hits = score[order], abuse[order].astype(np.int64)
    ends = _run_ends(ranked) if n else np.zeros(0, dtype=np.int64)
    ends = ends[grid(ends + 1)] if n else ends
    taken_at, hits_at = ends + 1, np.cumsum(hits)[ends] if n else np.zeros(0, dtype=np.int64)
    table = _fewest_hits(target, n)
    chosen = int(_last_passing(taken_at, hits_at, table)) if n else -1
    # Without a passing threshold: the one of the grid whose lower bound comes closest, for the report.
    bounds = [wilson(float(x) / float(k), float(k))[0] for x, k in zip(hits_at, taken_at, strict=True)]
    at = chosen if chosen >= 0 else int(np.argmax(bounds)) if bounds else -1
    threshold = None
    if chosen >= 0:
        threshold = current if chosen == len(ends) - 1 else float(ranked[ends[chosen]])
    best = float(ranked[ends[at]]) if at >= 0 else current
    taken = int(taken_at[at]) if at >= 0 else 0
    caught = int(hits_at[at]) if at >= 0 else 0
    total_abuse = int(abuse.sum())

    interval, passed = _bootstrap(ranked, hits, ends, table, current, resamples, seed)
    lowering = None
    if threshold == current and below is not None:
        lowering = lower_from_drawn(*below, current, target)
    return VerdictCalibration(
        target_precision=target,
        current=current,
        reviewed=n,
        abuse=total_abuse,
        needed=needed,
        threshold=threshold,
        best=best,
        precision=_clopper_pearson(caught, taken),
        recall=_clopper_pearson(caught, total_abuse),
        taken=taken,
        caught=caught,
        resamples=resamples,
        threshold_interval=interval,
        passed_share=passed,
        lowering=lowering,
        curve=pr_curve(score, abuse),
    )


def _bootstrap(
    ranked: np.ndarray,
    hits: np.ndarray,
    ends: np.ndarray,
    table: np.ndarray,
    current: float,
    resamples: int,
    seed: int,
) -> tuple[tuple[float, float] | None, float]:
    """The choice repeated on resamples of the verdicts: a resample is a count per verdict, so the
    verdicts stay in score order and each resample's cumulative counts are two matrix sums."""
    n = len(ranked)
    if not resamples or not n:
        return None, 0.0
    rng = np.random.default_rng(seed)
    thresholds = ranked[ends].copy()
    thresholds[-1] = current  # passing with every verdict: keep the threshold in force
    picked: list[np.ndarray] = []
    for start in range(0, resamples, _CHUNK):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, resamples - start))
        taken = np.cumsum(counts, axis=1)[:, ends]
        caught = np.cumsum(counts * hits, axis=1)[:, ends]
        picked.append(_last_passing(taken, caught, table))
    last = np.concatenate(picked)
    passed = last >= 0
    if not passed.any():
        return None, 0.0
    chosen = thresholds[last[passed]]
    low, high = np.quantile(chosen, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2], method="inverted_cdf")
    return (float(low), float(high)), float(passed.mean())


def lower_from_drawn(
    score: np.ndarray, abuse: np.ndarray, probability: np.ndarray, current: float, target: float
) -> Lowering:
    """The lowest threshold of the grid below ``current`` such that the drawn records between it and
    ``current`` are abuse at ``target`` precision by the lower end of their weighted interval at ``LEVEL``.

    ``score`` is the rule's score on each drawn record that the rule would take at a lower threshold
    (below ``current``, and not taken by an earlier rule of its scope); ``probability`` its chance of
    being drawn.
    """
    inside = score < current
    score, abuse, weight = score[inside], abuse[inside].astype(bool), 1.0 / probability[inside]
    if not len(score):
        return Lowering(None, 0, 0, None)
    order = np.argsort(-score, kind="stable")
    ranked, abuse, weight = score[order], abuse[order], weight[order]
    ends = _run_ends(ranked)
    ends = ends[grid(ends + 1)]
    mass = np.cumsum(weight)[ends]
    hit_mass = np.cumsum(weight * abuse)[ends]
    square_mass = np.cumsum(weight * weight)[ends]
    shares, sizes = hit_mass / mass, mass * mass / square_mass
    lows = np.array([wilson(float(p), float(s), _CONFIDENCE)[0] for p, s in zip(shares, sizes, strict=True)])
    passing = np.flatnonzero(lows >= target)
    if not len(passing):
        return Lowering(None, len(score), 0, None)
    at = int(passing[-1])
    low, high = wilson(float(shares[at]), float(sizes[at]))
    estimate = Estimate(float(shares[at]), low, high, float(sizes[at]))
    return Lowering(float(ranked[ends[at]]), len(score), int(ends[at] + 1), estimate)


def drawn_below(
    scores: Sequence[dict[str, float]], rule: str, earlier: Sequence[tuple[str, float]]
) -> np.ndarray:
    """Which drawn records a lower threshold of ``rule`` would move to it: those with a score for it
    and for every rule before it, none of which takes the record (first match wins)."""
    return np.array(
        [
            rule in s and all(name in s and s[name] < min_score for name, min_score in earlier)
            for s in scores
        ],
        dtype=bool,
    )


def _estimate_json(estimate: Estimate | None) -> dict[str, float] | None:
    if estimate is None:
        return None
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "size": estimate.size}


def verdict_calibration_json(result: VerdictCalibration, rule: dict[str, object] | None) -> dict[str, object]:
    """The machine-readable form (``--out-json``); the curve is left to the HTML report."""
    lowering = result.lowering
    return {
        "rule": rule,
        "target_precision": result.target_precision,
        "min_score_in_force": result.current,
        "min_score": result.threshold,
        "verdicts_at_or_above_min_score_in_force": result.reviewed,
        "abuse": result.abuse,
        "verdicts_needed": result.needed,
        "precision": result.precision.value,
        "precision_interval": [result.precision.low, result.precision.high],
        "recall_among_reviewed": _estimate_json(result.recall),
        "taken": result.taken,
        "bootstrap": {
            "resamples": result.resamples,
            "resampled": "the verdicts at or above the min_score in force, with replacement; the whole choice repeated",
            "min_score": result.threshold_interval,
            "passed": result.passed_share,
        },
        "lowering": None
        if lowering is None
        else {
            "min_score": lowering.threshold,
            "drawn_below": lowering.drawn,
            "added": lowering.added,
            "precision": _estimate_json(lowering.precision),
        },
    }
