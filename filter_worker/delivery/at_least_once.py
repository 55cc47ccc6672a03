"""At-least-once: produce at once, commit each partition up to its lowest unacknowledged record.

Commits during the run are asynchronous: a synchronous commit waits for the group coordinator, and
with the coordinator unreachable (an outage) each one stalled the loop for seconds (measured: 6 s per
attempt), starving heartbeats, delivery reports and stop requests. The result arrives in ``committed``
(librdkafka's ``on_commit``, served by the consumer's poll).

A revocation commits synchronously, inside librdkafka's rebalance callback: the partitions change
hands right after, and the consumer cannot be polled from there to wait for an asynchronous result.
The stop and the close commit asynchronously and poll for the result until their deadline: a stop
whose commit did not complete in time says so (exit 6) instead of blocking on the coordinator.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from filter_worker.delivery.committer import TP, Committer
from filter_worker.delivery.publisher import REVIEW, count_published, log_fallback, unpublishable
from filter_worker.logs import get_logger
from filter_worker.pipeline.records import Outgoing

log = get_logger(__name__)

# An asynchronous commit whose result never came (librdkafka reports every one, so this is a safety
# net): after this long another commit may be sent.
_COMMIT_RESULT_WAIT_S = 60.0
# While a stop waits for its commit's result, how long one poll of the consumer may block.
_RESULT_POLL_S = 0.05
# How long the stop's commit may take past the stop's deadline, and how long the close may take after a
# failure: committing what is acknowledged is always safe, and every record it covers is not repeated.
COMMIT_GRACE_S = 1.0


class AtLeastOnce(Committer):
    _commit_sent: float | None = None  # when the asynchronous commit in flight was sent
    _ended = False  # stopped: the close commits nothing more
    # The commit a stop or a close waits for (its offsets), and its result once it arrived.
    _awaited: dict[TP, int] | None = None
    _awaited_result: bool | None = None

    def publish(self, item: Outgoing) -> None:
        self._deliver(item)

    def poll(self, caught_up: bool) -> bool:
        self._publisher.poll(0)
        settled = caught_up and self.tracker.in_flight() == 0
        if self.commit_due(settled) and not self._commit_in_flight():
            self._commit_async()
        return False

    def acknowledged(self, items: list[Outgoing]) -> None:
        super().acknowledged(items)
        count_published(self._metrics, items)

    def refused(self, item: Outgoing, err: KafkaError, queued: bool = True) -> None:
        source = item.source
        if not self.tracker.is_current((source.topic, source.partition), item.generation):
            return  # revoked meanwhile: the next owner reads the record again
        if item.action == REVIEW:
            if self._review_refused(item, err):
                self.tracker.ack((source.topic, source.partition), source.offset, item.generation)
            else:
                self._failures.set(unpublishable(item, err))
            return
        fallback = self._publisher.fallback(item, err)
        if fallback is None:
            self._failures.set(unpublishable(item, err))
            return
        log_fallback(item, fallback, err)
        self._publisher.send(fallback)

    def committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit result (``on_commit``), for asynchronous and synchronous commits alike."""
        self._commit_sent = None
        awaited = self._awaited
        if awaited is not None:
            got = {(p.topic, p.partition): p.offset for p in partitions}
            if all(got.get(tp, -1) >= offset for tp, offset in awaited.items()):  # its result (or a later one's)
                self._awaited_result = err is None and all(p.error is None for p in partitions)
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

    def _commit_async(self, offsets: dict[TP, int] | None = None) -> bool:
        """Send a commit of ``offsets`` (default: every watermark that moved); ``False`` if it could not be sent."""
        self._last_commit = self._clock()
        offsets = self.tracker.committable() if offsets is None else offsets
        if not offsets:
            return True
        try:
            self._consumer.commit(offsets=self._partitions(offsets), asynchronous=True)
        except KafkaException as exc:  # e.g. no longer a group member; the next one retries
            self._metrics.commit_failures.inc()
            log.warning("commit failed; will retry", error=str(exc))
            return False
        self._commit_sent = self._clock()
        return True

    def _commit_and_wait(self, deadline: float) -> bool:
        """Commit every watermark that moved and poll for *this* commit's result until ``deadline``;
        ``True`` once it succeeded (a rebalance served by the same poll does not pass for it)."""
        offsets = self.tracker.committable()
        if not offsets:
            return True
        self._awaited, self._awaited_result = offsets, None
        try:
            if not self._commit_async(offsets):
                return False
            while self._clock() < deadline:
                self._consumer.poll(_RESULT_POLL_S)  # serves on_commit; fetching is paused while stopping
                if self._awaited_result is not None:
                    return self._awaited_result
        finally:
            self._awaited = None
        log.warning(
            "the commit's result did not arrive in time", offsets={f"{t}/{p}": o for (t, p), o in offsets.items()}
        )
        return False

    def revoke(self, tps: list[TP], deadline: float) -> bool:
        undelivered = self._publisher.flush(max(0.0, deadline - self._clock()))
        if undelivered:
            log.warning("revoked with outputs unacknowledged; their records are read again", undelivered=undelivered)
        committed = self._commit_now(tps)
        self.forget(tps)
        return committed and not undelivered

    def _commit_now(self, tps: list[TP]) -> bool:
        """A synchronous commit (inside a rebalance callback); a failure is logged: the records are repeated."""
        offsets = self.tracker.committable(tps)
        if not offsets:
            return True
        try:
            results = self._consumer.commit(offsets=self._partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            self._metrics.commit_failures.inc()
            log.warning("commit failed; the next owner re-reads from the last commit", error=str(exc))
            return False
        self.committed(None, list(results or []))
        return True

    def lost(self, tps: list[TP]) -> bool:
        """Forget ``tps``; their outputs still waiting for room in librdkafka's queue are dropped (the next
        owner publishes them). Those already queued cannot be taken back: they are published (allowed
        repeats) and count against the in-flight budget until librdkafka is done with them."""
        self.forget(tps)
        gone = set(tps)
        self._publisher.drop_backlog(lambda item: (item.source.topic, item.source.partition) not in gone)
        return False

    def finish(self, deadline: float) -> bool:
        """Graceful stop: wait for acknowledgements until ``deadline``, then commit what they settled
        (taking up to ``COMMIT_GRACE_S`` past the deadline)."""
        undelivered = self._publisher.flush(max(0.0, deadline - self._clock()))
        committed = self._commit_and_wait(max(deadline, self._clock() + COMMIT_GRACE_S))
        self._ended = True
        return committed and undelivered == 0

    def close(self) -> None:
        """After a failure (no stop ran): commit what is acknowledged, within ``COMMIT_GRACE_S``. Never raises."""
        if self._ended:
            return
        self._ended = True
        try:
            self._publisher.flush(COMMIT_GRACE_S / 2)
            self._commit_and_wait(self._clock() + COMMIT_GRACE_S / 2)
        except (KafkaException, RuntimeError) as exc:
            log.warning("could not commit on close; the next owner repeats from the last commit", error=str(exc))
