"""A rule's take rate over the last day, against the reference, with a variance that bursts cannot fool.

The window's take rate (``drift``) compares the last ``FILTER_DRIFT__WINDOW`` records with the
reference by a pooled two-proportion z, which assumes independent records. A sender who sends a burst
of near-identical messages makes them dependent, all taken or none: with Pareto-sized bursts and no
change at all, that z had a standard deviation of 2 to 4.7 instead of 1 and the alert condition held
in 2 to 22 % of evaluations. And 1000 records hold 10 drops at a 1 % drop rate: a doubling to 2 %
was caught in no 24-hour run.

Here each rule's records are counted per minute (taken, records) over the last day (``minutes``), at
the ``min_score`` in force (a change starts the count afresh). The share is the day's taken over its
records, and its variance is estimated from the minutes themselves: the ratio estimate's residuals
per minute, with their autocovariances up to ``LAGS`` minutes apart (Newey–West, Bartlett weights),
so a burst that fills a minute, or spans several, counts as the dependent lump it is. It is never
taken below the variance of independent records. The reference is a sample too, and its binomial
variance is added. ``tests/test_take_rate.py`` measures z under bursty traffic with nothing changed,
and a doubling from 1 % to 2 % within a day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from filter_worker.moderation.minutes import MinuteCounts

# Bursts up to about an hour long: minutes further apart are taken as independent.
LAGS = 60
# Minutes with records before a day z is shown: fewer leave the variance estimate itself too noisy.
FEWEST_MINUTES = 120


def day_z(taken: np.ndarray, records: np.ndarray, reference_taken: int, reference_records: int) -> float:
    """z of the share ``sum(taken) / sum(records)`` (per-minute counts, in time order) against the
    reference share, with the per-minute Newey–West variance (0 when nothing can be compared)."""
    total = float(records.sum())
    if total <= 0 or reference_records <= 0:
        return 0.0
    share = float(taken.sum()) / total
    residual = taken - share * records
    variance = float(residual @ residual)
    for lag in range(1, min(LAGS, len(residual) - 1) + 1):
        variance += 2 * (1 - lag / (LAGS + 1)) * float(residual[lag:] @ residual[:-lag])
    variance = max(variance, share * (1 - share) * total) / (total * total)
    reference = reference_taken / reference_records
    variance += reference * (1 - reference) / reference_records
    if variance <= 0:
        return 0.0
    return (share - reference) / math.sqrt(variance)


@dataclass(frozen=True, slots=True)
class DayRate:
    """The last day's take rate of a rule: ``taken`` of ``records``, and its z against the reference."""

    live: float
    z: float
    taken: int
    records: int


class DayCounts:
    """One rule's per-minute (taken, records) over the last day, at one ``min_score``."""

    def __init__(self, threshold: tuple[tuple[str, ...], float]) -> None:
        self.threshold = threshold
        self._minutes = MinuteCounts(2)

    def add(self, scores: np.ndarray, now: float) -> None:
        """A batch of the rule's scores, arrived at ``now`` (seconds)."""
        self._minutes.add(np.array([np.count_nonzero(scores >= self.threshold[1]), len(scores)]), now)

    def rate(self, reference_taken: int, reference_records: int) -> DayRate | None:
        """The day's rate; None until ``FEWEST_MINUTES`` minutes had records."""
        minutes = self._minutes.minutes()
        taken, records = minutes[:, 0], minutes[:, 1]
        if np.count_nonzero(records) < FEWEST_MINUTES:
            return None
        total = int(records.sum())
        z = day_z(taken, records, reference_taken, reference_records)
        return DayRate(float(taken.sum()) / total, z, int(taken.sum()), total)
