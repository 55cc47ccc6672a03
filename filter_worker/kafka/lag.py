"""``filter_consumer_lag``: per owned partition, the high watermark minus the consumer's position.

While fetching flows, librdkafka's cached watermarks move with every fetch response, at no cost. While
fetching is paused (the budget is spent: exactly when lag matters) no fetch is sent and the cached
watermark freezes, so the meter then asks the broker itself (ListOffsets through the admin client).
The answer comes on a future and is read on a later turn: the loop never waits for it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future

from confluent_kafka import Consumer, IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from filter_worker.monitoring.metrics import Metrics

TP = tuple[str, int]
# How long one ListOffsets request may take; an answer not read by then is given up and asked again.
_REQUEST_TIMEOUT_S = 5.0


class LagMeter:
    def __init__(
        self, consumer: Consumer, admin: AdminClient, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._consumer = consumer
        self._admin = admin
        self._metrics = metrics
        self._clock = clock
        self._asked: dict[TopicPartition, Future] = {}  # ListOffsets answers not read yet
        self._asked_at = 0.0
        self._latest: dict[TP, int] = {}  # the broker's answers, used while paused

    def update(self, assigned: list[TP], paused: bool) -> None:
        """Set the gauge of every owned partition; while ``paused``, from the broker's answers."""
        self._admin.poll(0)  # serves the admin client's log lines
        self._read_answers()
        if paused and not self._asked:
            self._ask(assigned)
        positions = self._consumer.position([TopicPartition(t, p) for t, p in assigned])
        for tp in positions:
            if tp.offset < 0:
                continue
            key = (tp.topic, tp.partition)
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if paused:
                high = max(high, self._latest.get(key, -1))
            if high >= 0:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def forget(self, tps: list[TP]) -> None:
        for topic, partition in tps:
            self._latest.pop((topic, partition), None)
            with contextlib.suppress(KeyError):  # never set: nothing consumed from it
                self._metrics.lag.remove(topic, str(partition))

    def _ask(self, assigned: list[TP]) -> None:
        if not assigned:
            return
        request = {TopicPartition(t, p): OffsetSpec.latest() for t, p in assigned}
        try:
            self._asked = self._admin.list_offsets(
                request, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=_REQUEST_TIMEOUT_S
            )
        except KafkaException:
            self._asked = {}  # asked again on the next turn that needs it
        self._asked_at = self._clock()

    def _read_answers(self) -> None:
        if not self._asked:
            return
        if not all(future.done() for future in self._asked.values()):
            if self._clock() - self._asked_at > 2 * _REQUEST_TIMEOUT_S:
                self._asked = {}  # no answer: asked again on the next turn that needs it
            return
        asked, self._asked = self._asked, {}
        for tp, future in asked.items():
            with contextlib.suppress(KafkaException):  # unknown this time; asked again next interval
                self._latest[(tp.topic, tp.partition)] = future.result().offset
