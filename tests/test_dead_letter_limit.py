"""The dead-letter limit: runs and ratios, exactly at their thresholds."""

from __future__ import annotations

import random

from filter_worker.config import DeadLetterSettings
from filter_worker.delivery.dead_letter_limit import DeadLetterLimit


def test_consecutive_run_trips_at_the_limit_and_a_success_resets_it():
    limit = DeadLetterLimit(DeadLetterSettings(max_consecutive=3, max_ratio=1.0))
    assert [limit.exceeded_by(True) for _ in range(2)] == [None, None]
    assert limit.exceeded_by(False) is None and limit.consecutive == 0
    assert limit.exceeded_by(True) is None and limit.exceeded_by(True) is None
    reason = limit.exceeded_by(True)
    assert reason is not None and "3 consecutive" in reason and "FILTER_DEAD_LETTER__MAX_CONSECUTIVE=3" in reason


def test_ratio_is_checked_only_over_a_full_window():
    limit = DeadLetterLimit(DeadLetterSettings(max_consecutive=0, max_ratio=0.5, window=4))
    assert limit.exceeded_by(True) is None  # 1 of 1, but the window is not full yet
    assert limit.exceeded_by(False) is None
    assert limit.exceeded_by(False) is None
    reason = limit.exceeded_by(True)  # 2 of 4
    assert reason is not None and "2 of the last 4" in reason


def test_ratio_window_slides():
    limit = DeadLetterLimit(DeadLetterSettings(max_consecutive=0, max_ratio=0.75, window=4))
    outcomes = [True, True, False, False, True, False, True, True]
    results = [limit.exceeded_by(dead) for dead in outcomes]
    # Windows once full: [T,T,F,F]=2, [T,F,F,T]=2, [F,F,T,F]=1, [F,T,F,T]=2, [T,F,T,T]=3 -> trips at the last.
    assert results[:-1] == [None] * 7
    assert results[-1] is not None and "3 of the last 4" in results[-1]


def test_no_limits_never_trip():
    limit = DeadLetterLimit(DeadLetterSettings(max_consecutive=0, max_ratio=1.0, window=2))
    assert all(limit.exceeded_by(True) is None for _ in range(100))


def test_a_batch_of_successes_counts_as_that_many_single_ones():
    rng = random.Random(3)
    settings = DeadLetterSettings(max_consecutive=0, max_ratio=0.9, window=50)
    one_by_one, batched = DeadLetterLimit(settings), DeadLetterLimit(settings)
    for _ in range(300):
        if rng.random() < 0.3:
            count = rng.choice([1, 7, 49, 50, 51, 120])
            for _ in range(count):
                one_by_one.exceeded_by(False)
            batched.succeeded(count)
        else:
            dead = rng.random() < 0.6
            assert one_by_one.exceeded_by(dead) == batched.exceeded_by(dead)
        assert (batched._dead_in_window, batched.consecutive) == (one_by_one._dead_in_window, one_by_one.consecutive)  # noqa: SLF001
