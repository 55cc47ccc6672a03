"""Counts per minute over the last day: what the day take rate and the day drift index are taken over.

A window of the last records is what one burst can fill; a day at a record a second holds 86 400 of
them, and per-minute counts keep the order in time that a variance for dependent records needs.
Minutes without records count as empty; a minute more than a day old leaves.
"""

from __future__ import annotations

import numpy as np

DAY_MINUTES = 1440


class MinuteCounts:
    """``width`` counts per minute for the last ``DAY_MINUTES`` minutes (a ring)."""

    def __init__(self, width: int) -> None:
        self._counts = np.zeros((DAY_MINUTES, width))
        self._minute: int | None = None  # the newest minute counted

    def add(self, counts: np.ndarray, now: float) -> None:
        """Add ``counts`` to the minute of ``now`` (seconds); minutes passed since the newest are emptied."""
        minute = int(now // 60)
        if self._minute is None:
            self._minute = minute
        elif minute > self._minute:
            passed = self._minute + 1 + np.arange(min(minute - self._minute, DAY_MINUTES))
            self._counts[passed % DAY_MINUTES] = 0
            self._minute = minute
        self._counts[self._minute % DAY_MINUTES] += counts

    def minutes(self) -> np.ndarray:
        """The counts, oldest minute first (rows: minutes, columns: the counts)."""
        if self._minute is None:
            return self._counts[:0]
        return self._counts[(self._minute + 1 + np.arange(DAY_MINUTES)) % DAY_MINUTES]
