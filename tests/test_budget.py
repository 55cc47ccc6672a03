from __future__ import annotations

from filter_worker.delivery.budget import InFlightBudget


def test_spent_at_either_bound_and_refilled_below_half_of_both():
    budget = InFlightBudget(max_records=100, max_bytes=1000)
    assert not budget.spent(99, 999)
    assert budget.spent(100, 0) and budget.spent(0, 1000)
    assert not budget.refilled(50, 0) and not budget.refilled(0, 500)
    assert budget.refilled(49, 499)
