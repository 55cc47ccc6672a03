"""At-least-once: produce at once, commit each partition up to its lowest unacknowledged record.

Commits during the run are asynchronous: a synchronous commit waits for the group coordinator, and
with the coordinator unreachable (an outage) each one stalled the loop for seconds (measured: 6 s per
attempt), starving heartbeats, delivery reports and stop requests. The result arrives in ``committed``
(librdkafka's ``on_commit``, served by the consumer's poll). Revocation and the graceful stop commit
synchronously: the partitions change hands right after, so the commit must be done first.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from filter_worker.delivery.committer import TP, Committer
from filter_worker.delivery.publisher import log_fallback, unpublishable
from filter_worker.logs import get_logger
from filter_worker.pipeline.records import Outgoing

log = get_logger(__name__)

# An asynchronous commit whose result never came (librdkafka reports every one, so this is a safety
# net): after this long another commit may be sent.
_COMMIT_RESULT_WAIT_S = 60.0


class AtLeastOnce(Committer):
    _commit_sent: float | None = None  # when the asynchronous commit in flight was sent

    def publish(self, item: Outgoing) -> None:
        self._publisher.send(item)

    def poll(self, caught_up: bool) -> bool:
        self._publisher.poll(0)
        settled = caught_up and self.tracker.in_flight() == 0
        if self.commit_due(settled) and not self._commit_in_flight():
            self._commit_async()
        return False

    def refused(self, item: Outgoing, err: KafkaError) -> None:
        source = item.source
        if not self.tracker.is_current((source.topic, source.partition), item.generation):
            return  # revoked meanwhile: the next owner reads the record again
        fallback = self._publisher.fallback(item, err)
        if fallback is None:
            self._failures.set(unpublishable(item, err))
            return
        log_fallback(item, fallback, err)
        self._publisher.send(fallback)

    def committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit result (``on_commit``), for asynchronous and synchronous commits alike."""
        self._commit_sent = None
        if err is not None:
            if err.code() != KafkaError._NO_OFFSET:
                self._metrics.commit_failures.inc()
                log.warning("commit failed; will retry", error=err.str())
            return
        done = {(p.topic, p.partition): p.offset for p in partitions if p.error is None and p.offset >= 0}
        if done:
            self.tracker.committed(done)
            self._metrics.commits.inc()

    def _commit_in_flight(self) -> bool:
        return self._commit_sent is not None and self._clock() - self._commit_sent < _COMMIT_RESULT_WAIT_S

    def _commit_async(self) -> None:
        self._last_commit = self._clock()
        offsets = self.tracker.committable()
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=self._partitions(offsets), asynchronous=True)
        except KafkaException as exc:  # e.g. no longer a group member; the next one retries
            self._metrics.commit_failures.inc()
            log.warning("commit failed; will retry", error=str(exc))
            return
        self._commit_sent = self._clock()

    def _commit_now(self, tps: list[TP] | None) -> None:
        """A synchronous commit; a failure is logged (the records are read again: repeated, not lost)."""
        offsets = self.tracker.committable(tps)
        if not offsets:
            return
        try:
            results = self._consumer.commit(offsets=self._partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            self._metrics.commit_failures.inc()
            log.warning("commit failed; the next owner re-reads from the last commit", error=str(exc))
            return
        self.committed(None, list(results or []))

    def revoke(self, tps: list[TP], deadline: float) -> None:
        undelivered = self._publisher.flush(max(0.0, deadline - self._clock()))
        if undelivered:
            log.warning("revoked with outputs unacknowledged; their records are read again", undelivered=undelivered)
        self._commit_now(tps)
        self._forget(tps)

    def lost(self, tps: list[TP]) -> bool:
        self._forget(tps)
        return False

    def close(self) -> None:
        """Nothing is half-done: whatever was acknowledged is committed by the revocation on close."""

    def finish(self, deadline: float) -> bool:
        undelivered = self._publisher.flush(max(0.0, deadline - self._clock()))
        self._commit_now(None)
        return undelivered == 0
