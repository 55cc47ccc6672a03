"""The one owner of the order in which the stages act on assign, revoke, lost, stop and close.

The worker only calls ``assigned``, ``revoked``, ``lost``, ``poll``, ``stop`` and ``close``; each asks
the stages, in this order (docs/delivery.md draws it as a table, each row with its tests):

- assigned(P): the committer tracks P under a new generation; the pausing stage gives P the current
  pause state.
- revoked(P) while running: the classify stage finishes P's holes and the passes in the model (until
  the revocation deadline); the gate lets its held dead letters through; the committer publishes,
  waits for P's acknowledgements and commits P's watermark (exactly-once: commits what is decided in
  offset order, beginning a transaction for it if none is open, or aborts and rewinds the partitions
  kept, whose stale work the stages then drop; none is left open); then every stage forgets P, also
  when the revocation failed.
- revoked(P) once stopping, stopped or failed: every stage forgets P; nothing is committed.
- lost(P): nothing of P's is committed; an open transaction aborts and the partitions kept are rewound;
  every stage forgets P.
- a rewind (the committer's poll returned ``True``): the stages drop the work of the old generations.
- stop(deadline): fetching is held; the classify stage finishes every hole and pass; the gate lets its
  held dead letters through; the committer waits for acknowledgements and commits (at-least-once: up
  to 1 s past the deadline, and only this commit's own result counts; exactly-once: past the deadline
  it aborts, or resumes a commit librdkafka is finishing, which may still commit). Records
  buffered above every decided one are forgotten: the next owner's, not an error.
- close: the model's thread stops; after a failure (no stop ran) at-least-once commits what is
  acknowledged (1 s at most) and exactly-once aborts an open transaction; nothing begins after.

"Holes" are buffered records below a decided one of their partition (batches cut by length decide out
of offset order): abandoning them would stop the commit below published records, and the next owner
would publish those again. A revocation inside ``consume()`` may come while finished passes wait to be
routed: the classify stage routes those first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from enum import Enum
from typing import Protocol

from confluent_kafka import Consumer, KafkaException, TopicPartition

from filter_worker.delivery.committer import TP, Committer
from filter_worker.delivery.gate import DeadLetterGate
from filter_worker.delivery.pausing import Pausing
from filter_worker.exit_codes import FailureSlot, FatalError
from filter_worker.logs import get_logger
from filter_worker.pipeline.records import InputRecord

log = get_logger(__name__)


class Finishing(Protocol):
    """What the lifecycle asks of the stage before delivery (``service/classify.py``)."""

    def finish(
        self,
        partitions: set[TP] | None,
        deadline: float,
        clock: Callable[[], float],
        highest: Callable[[TP, set[int]], int | None],
    ) -> bool: ...

    def forget(self, partitions: set[TP]) -> int: ...

    def discard(self, keep: Callable[[InputRecord, int], bool]) -> int: ...

    def close(self) -> None: ...


class State(Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CLOSED = "closed"


class Lifecycle:
    """Orders the classify stage, the dead-letter gate, the committer and the pausing stage; see the table."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        classify: Finishing,
        gate: DeadLetterGate,
        committer: Committer,
        pausing: Pausing,
        failures: FailureSlot,
        revoke_timeout_s: float,
        cooperative: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._classify = classify
        self._gate = gate
        self._committer = committer
        self._pausing = pausing
        self._failures = failures
        self._revoke_timeout_s = revoke_timeout_s
        self._cooperative = cooperative
        self._clock = clock
        self.state = State.RUNNING

    def assigned(self, partitions: list[TopicPartition]) -> list[TP]:
        """Take the partitions (assigned here, so the pause below is not undone by a later assign).

        Runs inside librdkafka's rebalance callback: never raises (a failure goes to the failure slot).
        """
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            if self._cooperative:
                self._consumer.incremental_assign(partitions)
            else:
                self._consumer.assign(partitions)
            self._committer.assign(tps)
            self._pausing.assigned(tps)
        except Exception as exc:  # noqa: BLE001 - never through librdkafka: the loop raises it
            self._failures.set(_fatal("taking the assigned partitions", exc))
        return tps

    def revoked(self, tps: list[TP]) -> tuple[bool, int]:
        """Finish and commit what ``tps`` must not abandon, then forget them; (in time, records dropped).

        Once stopping (or failed) there is nothing left to finish here: the stop did it, or the failure
        leaves it to the next owner. Runs inside librdkafka's rebalance callback, so it never raises: any
        error goes to the failure slot for the loop to raise.
        """
        if self.state is not State.RUNNING or self._failures.failure is not None:
            self._committer.forget(tps)
            return True, self._forget(tps)
        try:
            deadline = self._clock() + self._revoke_timeout_s
            highest = self._committer.tracker.highest_decided
            finished = self._classify.finish(set(tps), deadline, self._clock, highest)
            self._gate.open()
            finished = self._committer.revoke(tps, deadline) and finished  # it forgets them
            self._discard_stale()  # an abort inside the revocation rewound the partitions kept
        except Exception as exc:  # noqa: BLE001 - never through librdkafka: the loop raises it
            self._failures.set(_fatal("revoking", exc))
            self._committer.forget(tps)  # nothing of theirs is committed after a failed revocation either
            finished = False
        return finished, self._forget(tps)

    def lost(self, tps: list[TP]) -> None:
        """Another member may own them already: nothing of theirs is committed; an open transaction aborts."""
        try:
            if self._committer.lost(tps):  # it forgets them
                self._discard_stale()
        except Exception as exc:  # noqa: BLE001 - never through librdkafka: the loop raises it
            self._failures.set(_fatal("dropping lost partitions", exc))
            self._committer.forget(tps)
        self._forget(tps)

    def poll(self, caught_up: bool) -> None:
        """The committer's turn: serve deliveries, commit when due, and drop stale work after a rewind."""
        if self._committer.poll(caught_up):
            self._discard_stale()

    def stop(self, deadline: float) -> bool:
        """Graceful stop; ``False`` when ``deadline`` cut it short (the rest is the next owner's to read)."""
        self.state = State.STOPPING
        self._pausing.hold()
        finished = self._classify.finish(None, deadline, self._clock, self._committer.tracker.highest_decided)
        self._gate.open()
        committed = self._committer.finish(deadline)
        self.state = State.STOPPED
        return finished and committed

    def close(self) -> None:
        """Stop the model's thread; after a failure, leave nothing half-done. Never raises."""
        stopped = self.state is State.STOPPED
        self.state = State.CLOSED
        self._classify.close()
        if not stopped:
            with contextlib.suppress(KafkaException):  # a consumer failed for good cannot pause: nothing to fetch
                self._pausing.hold()
        self._committer.close()

    def _forget(self, tps: list[TP]) -> int:
        gone = set(tps)
        self._gate.discard(lambda item: (item.source.topic, item.source.partition) not in gone)
        return self._classify.forget(gone)

    def _discard_stale(self) -> None:
        """After a rewind: drop buffered work and held dead letters of the generations before it."""
        current = self._committer.is_current
        self._classify.discard(lambda record, generation: current((record.topic, record.partition), generation))
        self._gate.discard(lambda item: current((item.source.topic, item.source.partition), item.generation))


def _fatal(what: str, exc: Exception) -> FatalError:
    """``exc`` as the error the loop stops on (an unexpected one: exit 1), instead of raising it through
    librdkafka's callback."""
    return exc if isinstance(exc, FatalError) else FatalError(f"{what} failed: {type(exc).__name__}: {exc}")
