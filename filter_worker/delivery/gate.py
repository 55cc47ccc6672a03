"""The dead-letter gate: dead letters of a run that may still cross the limit are held back, unpublished.

``DeadLetterLimit`` tells "some bad input" from "this deploy can classify nothing" and stops the worker
(exit 5) when a run of consecutive dead letters reaches ``FILTER_DEAD_LETTER__MAX_CONSECUTIVE``. For
that stop to leave the failing run *uncommitted* (so a fixed deploy classifies it for real), none of
the run's dead letters may reach the committer while the run may still cross the limit. The gate
holds them, in order, and lets them through when the run ends (a record is classified), when input
goes quiet, on a graceful stop or a revocation. Both committers sit behind it, so neither knows about
dead-letter runs.

Held dead letters are bounded by the limit itself; with no consecutive limit nothing is held.
"""

from __future__ import annotations

from collections.abc import Callable

from filter_worker.config import DeadLetterSettings
from filter_worker.delivery.dead_letter_limit import DeadLetterLimit
from filter_worker.exit_codes import ExitCode, FatalError
from filter_worker.pipeline.records import Outgoing


class DeadLetterGate:
    def __init__(self, settings: DeadLetterSettings, release: Callable[[Outgoing], None]) -> None:
        self._limit = DeadLetterLimit(settings)
        self._holds = settings.max_consecutive > 0
        self._release = release
        self._held: list[Outgoing] = []

    def __len__(self) -> int:
        return len(self._held)

    def submit(self, item: Outgoing) -> None:
        """Count the record's outcome; pass it on, or hold it while its run of dead letters goes on."""
        dead = item.failure is not None
        exceeded = self._limit.exceeded_by(dead)
        if exceeded is not None:
            raise FatalError(
                f"dead-letter limit reached: {exceeded}; this looks like a bad deploy or configuration, "
                "not bad input. The failing records stay unpublished and uncommitted and are read again on restart",
                ExitCode.DEAD_LETTER_LIMIT,
            )
        if dead and self._holds:
            self._held.append(item)
            return
        self.open()
        self._release(item)

    def submit_many(self, items: list[Outgoing]) -> None:
        """``submit`` for a routed batch; a batch without dead letters ends any run and passes at once."""
        if any(item.failure is not None for item in items):
            for item in items:
                self.submit(item)
            return
        self._limit.succeeded(len(items))
        self.open()
        release = self._release
        for item in items:
            release(item)

    def open(self) -> None:
        """The run ended or stalled below the limit (or the worker stops): let its dead letters through."""
        held, self._held = self._held, []
        for item in held:
            self._release(item)

    def discard(self, keep: Callable[[Outgoing], bool]) -> None:
        """Drop held dead letters ``keep`` rejects (partitions revoked, lost or rewound).

        Held dead letters are the run's last outcomes; dropped, they leave the run too: their records
        are read again (by the next owner, or after the rewind) and counted then.
        """
        kept = [item for item in self._held if keep(item)]
        self._limit.withdraw(len(self._held) - len(kept))
        self._held = kept
