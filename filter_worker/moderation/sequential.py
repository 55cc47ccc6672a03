"""A Bernoulli CUSUM on each rule's verdicts: evidence that its precision fell below a floor, built
for being looked at every minute for weeks.

A confidence interval is right at one look. The precision alerts used to page when the upper end of
the 95 % interval over the last 200 verdicts fell below the floor, and Prometheus looks every minute:
per look that held 1.7 % of the time for a rule exactly at the floor, and over weeks it added up (a
rule at a 0.90 floor paged at least once a week in 14.7 % of simulated weeks at 100 verdicts a day,
30.6 % at 500; checking after every verdict, 86 % of streams paged within 5,000 verdicts).

Page's cumulative sum (CUSUM) is made for repeated looks. Each verdict adds its log-likelihood ratio
of "precision at ``shifted``" against "precision at the floor" (an "ok" verdict adds ``up``, an
"abuse" one ``down``, which is negative), and the sum is held at 0 from below:

    S = max(0, S + (up if ok else down))

It pages when ``S`` reaches ``limit``. The limit is chosen so that a rule exactly at its floor crosses
it on average once in ``false_page_verdicts`` verdicts (the in-control average run length): that is
the false-page budget, whatever the number of looks, since ``S`` changes only when a verdict arrives.
It is computed from the verdicts' Markov chain (Brook and Evans, 1972: ``S`` on a fine grid, the
expected steps to cross from each state solved as one linear system) and bisected on. A rule that
drops to ``shifted`` (the floor minus half its error: 0.85 for a 0.90 floor) gains on average
KL(shifted, floor) per verdict, 0.012 at 0.9, and pages after about ``limit`` / that many verdicts.

Pure: floats in, floats out. ``tests/test_feedback_service.py`` meets the budget and the detection
delay in simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# The chain's grid: an "abuse" verdict falls by the fewest steps (at most this many) that make the
# rise a whole number of steps to within 0.5 %: the run length then agrees with simulation (tests), in
# a system of a few hundred states.
_MOST_FALL_STEPS = 12


@dataclass(frozen=True, slots=True)
class Cusum:
    """The design: what an "ok" and an "abuse" verdict add, and the sum that pages."""

    floor: float
    shifted: float
    up: float
    down: float
    limit: float

    def step(self, value: float, abuse: bool) -> float:
        """The sum after one more verdict."""
        return max(0.0, value + (self.down if abuse else self.up))


def shifted_precision(floor: float) -> float:
    """The drop a rule's CUSUM is tuned to see at once: the floor minus half its error (0.90: 0.85)."""
    return floor - (1.0 - floor) / 2


def _steps(up: float, down: float) -> tuple[int, int, float]:
    """(rise, fall, grid): whole steps of a grid that ``up`` and ``-down`` are nearly multiples of."""
    ratio = up / -down

    def miss(b: int) -> float:
        return abs(max(1, round(ratio * b)) / (ratio * b) - 1)

    close = [b for b in range(1, _MOST_FALL_STEPS + 1) if miss(b) < 0.005]
    fall = close[0] if close else min(range(1, _MOST_FALL_STEPS + 1), key=miss)
    rise = max(1, round(ratio * fall))
    return rise, fall, (up / rise + -down / fall) / 2


def run_length(up: float, down: float, states: int, error: float) -> float:
    """The mean number of verdicts, from S = 0, until S climbs ``states`` grid steps when each is "ok"
    with probability ``error``: Brook and Evans' Markov chain, one linear system."""
    rise, fall, _ = _steps(up, down)
    index = np.arange(states)
    system = np.eye(states)
    system[index, np.maximum(index - fall, 0)] -= 1.0 - error
    inside = index + rise < states
    system[index[inside], index[inside] + rise] -= error
    return float(np.linalg.solve(system, np.ones(states))[0])


@lru_cache(maxsize=16)
def design(floor: float, false_page_verdicts: int) -> Cusum:
    """The CUSUM for a precision ``floor`` whose false pages at the floor come once in
    ``false_page_verdicts`` verdicts on average."""
    if not 0.0 < floor < 1.0:
        raise ValueError("a precision floor lies strictly between 0 and 1")
    shifted = shifted_precision(floor)
    error, worse = 1.0 - floor, 1.0 - shifted
    up, down = math.log(worse / error), math.log((1.0 - worse) / (1.0 - error))
    _, _, grid = _steps(up, down)

    def short(states: int) -> bool:
        return run_length(up, down, states, error) < false_page_verdicts

    # The run length grows about exponentially with the limit: widen, then bisect on whole steps.
    low, high = 1, 2
    while short(high):
        low, high = high, high * 3 // 2 + 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if short(middle) else (low, middle)
    return Cusum(floor, shifted, up, down, high * grid)
