"""How consumed offsets become committed: one interface, two implementations chosen once at start-up.

- ``AtLeastOnce`` (``delivery/at_least_once.py``): outputs are produced at once; a partition's offset
  is committed up to its lowest unacknowledged record (the tracker's watermark).
- ``Transactional`` (``delivery/transactional.py``): outputs are held and released into a Kafka
  transaction in offset order, and the transaction commits them together with the offsets; an aborted
  transaction rewinds to the first uncommitted record.

The classify stage hands every output to ``publish`` (through the dead-letter gate) and the loop calls
``poll`` once a turn; revocations, losses, the graceful stop and close reach the committer through the
lifecycle (``delivery/lifecycle.py``), which decides their order. Nothing outside these two classes
asks which mode is on.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, TopicPartition

from filter_worker.config import KafkaSettings
from filter_worker.delivery.offsets import OffsetTracker
from filter_worker.delivery.publisher import RECORD_REFUSALS, Publisher
from filter_worker.exit_codes import FailureSlot
from filter_worker.logs import get_logger
from filter_worker.monitoring.health import Health
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.records import InputRecord, Outgoing

TP = tuple[str, int]
log = get_logger(__name__)


class Committer(ABC):
    """What both modes share: the offset tracker, the publisher's delivery reports, the failure slot."""

    def __init__(
        self,
        settings: KafkaSettings,
        consumer: Consumer,
        publisher: Publisher,
        metrics: Metrics,
        health: Health,
        failures: FailureSlot,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._publisher = publisher
        self._metrics = metrics
        self._health = health
        self._failures = failures
        self._clock = clock
        self.tracker = OffsetTracker()
        self._interval_s = settings.commit_interval_ms / 1000
        self._last_commit = clock()
        # While the loop reads (``begin_read`` .. ``end_read``): partitions rewound by an abort inside a
        # rebalance callback, and the records of theirs dropped since (read before or after the seek).
        self._reading = False
        self._rewound_in_read: dict[TP, int] = {}
        self._dropped_in_read: set[TP] = set()
        publisher.listen(self)

    # -- partitions and records -------------------------------------------------------------------

    def assign(self, tps: list[TP]) -> None:
        for tp in tps:
            self.tracker.assign(tp)

    def begin_read(self) -> None:
        """The loop is about to call the consumer, whose rebalance callbacks may abort and rewind."""
        self._reading = True
        self._rewound_in_read.clear()
        self._dropped_in_read.clear()

    def end_read(self) -> None:
        """The records of that read are tracked: seek again the partitions whose records were dropped.

        A rewind inside the read (a revocation or loss that aborted) seeks the partitions kept, but the
        read may hold records of theirs fetched before the seek: tracked under the new generation, they
        would sit above the re-fetched ones (``consumed out of order``). Every record of such a partition
        in that read is dropped instead, and the partition is sought to the rewind's position again.
        """
        self._reading = False
        for tp in self._dropped_in_read:
            if self.tracker.generation(tp) is not None:
                self._consumer.seek(TopicPartition(tp[0], tp[1], self._rewound_in_read[tp]))
        self._rewound_in_read.clear()
        self._dropped_in_read.clear()

    def _rewound(self, positions: list[tuple[TP, int]]) -> None:
        """Partitions just sought back to ``positions`` (an abort's rewind)."""
        if self._reading:
            self._rewound_in_read.update(positions)

    def track(self, record: InputRecord) -> int | None:
        """Register a consumed record; its generation, or ``None`` if its partition is no longer owned
        (or was rewound while the record was being read: ``end_read``)."""
        tp = (record.topic, record.partition)
        if self.tracker.generation(tp) is None:  # revoked while the record sat in the fetch queue
            return None
        if tp in self._rewound_in_read:
            self._dropped_in_read.add(tp)
            return None
        size = len(record.value or b"") + len(record.key or b"")
        return self.tracker.track(tp, record.offset, size)

    def is_current(self, tp: TP, generation: int) -> bool:
        return self.tracker.is_current(tp, generation)

    def in_flight(self) -> tuple[int, int]:
        """What the in-flight budget counts: records (and their bytes) consumed and not yet acknowledged,
        and at least as many as librdkafka and the publisher still hold outputs for. Outputs of partitions
        lost meanwhile are no longer tracked but still take memory until librdkafka is done with them."""
        return max(self.tracker.in_flight(), self._publisher.outstanding), self.tracker.in_flight_bytes()

    def commit_due(self, caught_up: bool) -> bool:
        """Every commit interval under load; at once when everything consumed is settled."""
        return caught_up or self._clock() - self._last_commit >= self._interval_s

    # -- the loop ---------------------------------------------------------------------------------

    @abstractmethod
    def publish(self, item: Outgoing) -> None:
        """Take an output whose acknowledgement settles ``item.source``."""

    @abstractmethod
    def poll(self, caught_up: bool) -> bool:
        """Serve delivery reports and commit when due; ``True`` when partitions were rewound.

        ``caught_up``: nothing is buffered or in the model. After a rewind the lifecycle drops the
        stages' unfinished work of the old generations (``is_current`` says which).
        """

    def fetch_paused(self) -> bool:
        """Whether fetching must wait (a backoff after failed transactions)."""
        return False

    # -- revocation, loss, stop, close (called by the lifecycle, in its order) --------------------

    @abstractmethod
    def revoke(self, tps: list[TP], deadline: float) -> bool:
        """Commit what is done for ``tps`` (until ``deadline``), then forget them; ``True`` if committed in time."""

    @abstractmethod
    def lost(self, tps: list[TP]) -> bool:
        """Forget ``tps`` without committing (another member may own them); ``True`` when others were rewound."""

    @abstractmethod
    def finish(self, deadline: float) -> bool:
        """Graceful stop: publish, wait for acknowledgements, commit; ``False`` if it did not complete in time."""

    @abstractmethod
    def close(self) -> None:
        """Leave nothing half-done behind after a failure; nothing is committed or begun after this. Never raises."""

    def _deliver(self, item: Outgoing) -> None:
        """Hand ``item`` to the publisher; a record with a copy for review waits for both acknowledgements."""
        if item.review is not None:
            source = item.source
            self.tracker.expect_another((source.topic, source.partition), source.offset, item.generation)
        self._publisher.send(item)

    def _review_refused(self, item: Outgoing, err: KafkaError) -> bool:
        """A copy for review refused: ``True`` when it is dropped (refused for what it is), so the routed
        output alone settles its record; ``False`` for a refusal about the pipeline (the worker stops)."""
        if err.code() not in RECORD_REFUSALS:
            return False
        self._metrics.review_records.labels("refused").inc()
        log.warning(
            "the review topic refused a copy drawn for review; the record is published without it",
            source=item.source.source,
            topic=item.out.topic,
            error=err.str(),
        )
        return True

    def forget(self, tps: list[TP]) -> None:
        """Drop ``tps`` without committing anything more for them (after a revocation's commit, once
        stopping, or lost)."""
        for tp in tps:
            self.tracker.revoke(tp)
        gone = set(tps)
        self._publisher.forget_replacements(lambda key: (key[0], key[1]) not in gone)

    # -- delivery reports (from the publisher, on the loop thread) --------------------------------

    def acknowledged(self, items: list[Outgoing]) -> None:
        self._acknowledge(items)

    def _acknowledge(self, items: list[Outgoing], current: list[Outgoing] | None = None) -> None:
        """Acknowledge ``items`` in the tracker; those of the owned generations are appended to ``current``."""
        ack = self.tracker.ack
        for item in items:
            source = item.source
            if ack((source.topic, source.partition), source.offset, item.generation) and current is not None:
                current.append(item)
        self._health.broker_reachable = True

    @abstractmethod
    def refused(self, item: Outgoing, err: KafkaError, queued: bool = True) -> None:
        """The broker refused a queued output, or (``queued=False``) produce() refused a copy for review
        before queueing it: replace it, drop the copy, or stop."""

    @abstractmethod
    def committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's result of a consumer commit (``on_commit``)."""

    @staticmethod
    def _partitions(offsets: dict[TP, int]) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
