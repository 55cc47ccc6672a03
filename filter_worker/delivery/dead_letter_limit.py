"""The dead-letter limit: tell "some bad input" from "this worker can classify nothing".

Poison records are expected and go to the dead-letter topic one by one. But a bad deploy (a wrong
``FILTER_MESSAGE__TEXT_FIELD``, a broken model) fails *every* record, and dead-lettering the whole
stream would look like success on every dashboard. Two signals catch that: a run of consecutive dead
letters, and the share of dead letters among the last ``window`` records. Plain state, no clock, so
it is unit-tested directly.
"""

from __future__ import annotations

import itertools
from collections import deque

from filter_worker.config import DeadLetterSettings


class DeadLetterLimit:
    """Fed one outcome per record, in the order the worker decides them."""

    def __init__(self, settings: DeadLetterSettings) -> None:
        self._max_consecutive = settings.max_consecutive
        self._max_ratio = settings.max_ratio
        self._window: deque[bool] = deque(maxlen=settings.window)
        self._dead_in_window = 0
        self.consecutive = 0

    def succeeded(self, count: int) -> None:
        """``count`` records classified: a success never crosses a limit, so a batch is taken at once."""
        window = self._window
        assert window.maxlen is not None
        evicted = min(len(window), max(0, len(window) + count - window.maxlen))
        if evicted:
            self._dead_in_window -= sum(itertools.islice(window, evicted))
        window.extend(itertools.repeat(False, min(count, window.maxlen)))
        self.consecutive = 0

    def withdraw(self, count: int) -> None:
        """Forget the last ``count`` outcomes, all dead letters: held by the gate and dropped unpublished
        (revoked, lost or rewound), their records are read and counted again."""
        for _ in range(min(count, len(self._window))):
            self._dead_in_window -= self._window.pop()
        self.consecutive = max(0, self.consecutive - count)

    def exceeded_by(self, dead: bool) -> str | None:
        """Record one outcome; the reason if the limit is crossed with it, else ``None``."""
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._dead_in_window -= 1
        self._window.append(dead)
        self._dead_in_window += dead
        self.consecutive = self.consecutive + 1 if dead else 0
        if self._max_consecutive and self.consecutive >= self._max_consecutive:
            return (
                f"{self.consecutive} consecutive records failed "
                f"(FILTER_DEAD_LETTER__MAX_CONSECUTIVE={self._max_consecutive})"
            )
        full = len(self._window) == self._window.maxlen
        if full and self._max_ratio < 1.0 and self._dead_in_window / len(self._window) >= self._max_ratio:
            return (
                f"{self._dead_in_window} of the last {len(self._window)} records failed "
                f"(FILTER_DEAD_LETTER__MAX_RATIO={self._max_ratio}, FILTER_DEAD_LETTER__WINDOW={len(self._window)})"
            )
        return None
