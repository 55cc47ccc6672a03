"""The pausing stage: fetching waits while the in-flight budget is spent or the committer backs off.

The budget counts every record between consume and acknowledgement (``budget.py``), so memory stays
bounded whichever stage is slow: the model, the broker's acknowledgements, a transaction. A full batch
buffer does not pause: the loop stops reading instead, since a pause throws away what librdkafka has
prefetched (the loop's ``_read``).
"""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from filter_worker.delivery.budget import InFlightBudget
from filter_worker.delivery.committer import TP, Committer
from filter_worker.logs import get_logger
from filter_worker.monitoring.metrics import Metrics

log = get_logger(__name__)


class Pausing:
    """Owns the consumer's pause state; only the loop's thread (and its rebalance callbacks) call it."""

    def __init__(self, consumer: Consumer, budget: InFlightBudget, committer: Committer, metrics: Metrics) -> None:
        self._consumer = consumer
        self._budget = budget
        self._committer = committer
        self._metrics = metrics
        self.paused = False
        self._held = False  # stopping: paused for good

    def poll(self) -> None:
        """Pause or resume every owned partition as the budget and the committer say."""
        if self._held:
            return
        records, size = self._committer.in_flight()
        budget = not self._budget.refilled(records, size) if self.paused else self._budget.spent(records, size)
        pause = budget or self._committer.fetch_paused()
        if pause != self.paused:
            self._set(pause)
            log.debug("fetching paused" if pause else "fetching resumed", in_flight=records, in_flight_bytes=size)

    def assigned(self, partitions: list[TP]) -> None:
        """Give newly assigned partitions the current state, either way.

        librdkafka keeps a partition's pause across its revocation: one paused when it was revoked came
        back paused, and with fetching resumed meanwhile for the others it was never read again.
        """
        if partitions:
            tps = [TopicPartition(t, p) for t, p in partitions]
            (self._consumer.pause if self.paused else self._consumer.resume)(tps)

    def hold(self) -> None:
        """Stop fetching for good (the worker stops): nothing new is read while the rest is finished."""
        self._held = True
        if not self.paused:
            self._set(True)

    def _set(self, pause: bool) -> None:
        assignment = [TopicPartition(t, p) for t, p in self._committer.tracker.assigned()]
        (self._consumer.pause if pause else self._consumer.resume)(assignment)
        self.paused = pause
        self._metrics.fetch_paused.set(int(pause))
