"""Exactly-once: outputs and consumed offsets commit atomically in Kafka transactions.

Outputs are held per partition and released into the open transaction in offset order, so the offsets
sent with it are an exact cut: every record below them has its output in this or an earlier
transaction, none above. A transaction is committed every ``FILTER_KAFKA__COMMIT_INTERVAL_MS`` (or at
once when the worker has caught up), following the confluent-kafka transactional examples:

- a retriable error of a transactional call is retried (the next turn calls it again);
- an abortable one (a record the broker refused, a timed-out request) aborts the transaction, and
  every owned partition is rewound to its first uncommitted record (its last committed offset, or
  the first offset consumed since it was assigned: never where ``auto.offset.reset`` points);
- anything else (fenced by a newer incarnation, a fatal client error) stops the worker (exit 1).

A record refused for what it is comes back after the rewind and is replaced by its fallback (its dead
letter, cut to fit if need be: see ``publisher.py``). Aborts in a row are counted and backed off
(fetching paused, not ready); past ``FILTER_KAFKA__MAX_ABORTS`` the worker stops instead of looping.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from filter_worker.delivery.committer import TP, Committer
from filter_worker.exit_codes import FatalError
from filter_worker.logs import get_logger
from filter_worker.pipeline.records import InputRecord, Outgoing

log = get_logger(__name__)

# How long one transactional call (begin, send offsets, commit, abort) may block the loop. Not the
# transaction's own timeout (librdkafka's transaction.timeout.ms), and not the shutdown deadline.
CALL_TIMEOUT_S = 10.0
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0


class Transactional(Committer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_transaction = False
        self._held: dict[TP, dict[int, Outgoing]] = {}  # decided, waiting for their turn
        self._unreleased: dict[TP, deque[int]] = {}  # consumed offsets not yet released, in order
        self._released: dict[TP, int] = {}  # one past the last offset released into the open transaction
        # A delivery failed, so the open transaction must be aborted: the error and what failed.
        self._doomed: tuple[KafkaError, str] | None = None
        self._aborts = 0  # in a row, since the last successful commit
        self._resume_at = 0.0

    # -- records ----------------------------------------------------------------------------------

    def assign(self, tps: list[TP]) -> None:
        super().assign(tps)
        for tp in tps:
            self._held[tp], self._unreleased[tp] = {}, deque()

    def track(self, record: InputRecord) -> int | None:
        generation = super().track(record)
        if generation is not None:
            self._unreleased[(record.topic, record.partition)].append(record.offset)
        return generation

    def publish(self, item: Outgoing) -> None:
        source = item.source
        tp = (source.topic, source.partition)
        if self.tracker.is_current(tp, item.generation):
            self._held[tp][source.offset] = item

    def fetch_paused(self) -> bool:
        return self._clock() < self._resume_at

    # -- the loop ---------------------------------------------------------------------------------

    def poll(self, caught_up: bool) -> bool:
        self._publisher.poll(0)
        if self._failures.failure is not None:  # never commit past a record that could not be published
            return False
        if self._doomed is not None:
            return self._abort(*self._doomed)
        if self.fetch_paused():
            return False
        self._release()
        settled = caught_up and not any(self._unreleased.values())
        if self._in_transaction and self.commit_due(settled):
            return self._commit()
        return False

    def _release(self) -> None:
        """Produce held outputs that are next in their partition's offset order."""
        for tp, order in self._unreleased.items():
            held = self._held[tp]
            while order and order[0] in held:
                if not self._in_transaction:
                    self._begin()
                offset = order.popleft()
                self._publisher.send(held.pop(offset))
                self._released[tp] = offset + 1

    def _begin(self) -> None:
        self._publisher.producer.begin_transaction()
        self._in_transaction = True
        self._last_commit = self._clock()

    def _commit(self) -> bool:
        """Send the released offsets and commit; ``True`` when an abort rewound the partitions."""
        if self._publisher.backlog or self._failures.failure is not None:  # not all released records are queued
            return False
        offsets = dict(self._released)
        producer = self._publisher.producer
        try:
            if offsets:
                producer.send_offsets_to_transaction(
                    self._partitions(offsets), self._consumer.consumer_group_metadata(), CALL_TIMEOUT_S
                )
            producer.commit_transaction(CALL_TIMEOUT_S)
        except KafkaException as exc:
            return self._commit_failed(exc.args[0])
        self._in_transaction = False
        self._released.clear()
        self._last_commit = self._clock()
        self.tracker.committed(offsets)
        self._metrics.commits.inc()
        self._aborts = 0
        self._health.publishing = True
        return False

    def _commit_failed(self, err: KafkaError) -> bool:
        self._metrics.commit_failures.inc()
        if err.txn_requires_abort():
            return self._abort(err, "the transaction could not be committed")
        if err.retriable() and not err.fatal():
            log.warning("transaction commit failed; retrying", error=err.str())
            return False
        self._in_transaction = False
        self._failures.set(FatalError(f"transaction failed and cannot be retried: {err.str()}"))
        return False

    # -- aborts -----------------------------------------------------------------------------------

    def refused(self, item: Outgoing, err: KafkaError) -> None:
        """A queued output failed: its transaction is doomed; a record-level refusal is replaced after the rewind."""
        source = item.source
        if not self.tracker.is_current((source.topic, source.partition), item.generation):
            return  # purged by an abort, or revoked: read again anyway
        fallback = self._publisher.fallback(item, err)
        if fallback is not None:
            self._publisher.replace_later(fallback)
        if self._doomed is None:
            self._doomed = (err, f"{item.out.topic} refused {source.source}")

    def _abort(self, err: KafkaError, cause: str, counted: bool = True) -> bool:
        """Abort the open transaction and re-read every owned partition from its first uncommitted record.

        ``counted``: a failure that may repeat (backed off, and bounded by FILTER_KAFKA__MAX_ABORTS),
        unlike an abort for lost partitions.
        """
        self._doomed = None
        self._metrics.transaction_aborts.inc()
        if not self._abort_transaction():
            return False
        rewound = self._rewind()
        error = f"{cause}: {err.str()}"
        if not counted:
            log.warning("transaction aborted; re-reading from the last commit", error=error)
            return True
        self._aborts += 1
        if self._aborts > self._settings.max_aborts:
            self._failures.set(
                FatalError(
                    f"{self._aborts} transactions in a row were aborted (FILTER_KAFKA__MAX_ABORTS="
                    f"{self._settings.max_aborts}); the last because {error}"
                )
            )
            return True
        backoff = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (self._aborts - 1))
        self._resume_at = self._clock() + backoff
        self._health.publishing = False
        log.warning(
            "transaction aborted; re-reading from the last commit after a backoff",
            error=error,
            aborts_in_a_row=self._aborts,
            backoff_s=backoff,
            rewound=[f"{t}/{p}@{o}" for (t, p), o in rewound],
        )
        return True

    def _abort_transaction(self) -> bool:
        """``False`` (and the worker stops) when even the abort fails for good."""
        if not self._in_transaction:
            return True
        self._in_transaction = False
        try:
            self._publisher.producer.abort_transaction(CALL_TIMEOUT_S)
        except KafkaException as exc:
            self._failures.set(FatalError(f"could not abort the transaction: {exc.args[0].str()}"))
            return False
        return True

    def _rewind(self) -> list[tuple[TP, int]]:
        """Seek every owned partition back to its first uncommitted record; drop what was held."""
        rewound = []
        for tp in self.tracker.assigned():
            position = self.tracker.rewind(tp)
            self._held[tp], self._unreleased[tp] = {}, deque()
            if position is not None:
                self._consumer.seek(TopicPartition(tp[0], tp[1], position))
                rewound.append((tp, position))
        self._released.clear()
        return rewound

    # -- rebalances, stop, close ------------------------------------------------------------------

    def revoke(self, tps: list[TP], deadline: float) -> None:
        """Commit everything in order; what cannot be committed by ``deadline`` is aborted (read again)."""
        settled = self._failures.failure is None and self._settle(deadline)
        self._forget(tps)
        if not settled and self._in_transaction and self._failures.failure is None:
            self._abort(KafkaError(KafkaError._TIMED_OUT, "revocation deadline"), "revoked", counted=False)

    def lost(self, tps: list[TP]) -> bool:
        """Their outputs in the open transaction must not commit: abort it, rewind the partitions kept."""
        self._forget(tps)
        if not self._in_transaction:
            return False
        return self._abort(KafkaError(KafkaError._STATE, "partitions lost"), "lost", counted=False)

    def finish(self, deadline: float) -> bool:
        if self._failures.failure is not None:
            return False
        return self._settle(deadline) and not any(self._unreleased.values())

    def _settle(self, deadline: float) -> bool:
        """Release what is in order and commit it, retrying until ``deadline``; ``True`` once committed."""
        while self._clock() < deadline and self._failures.failure is None:
            self._publisher.poll(0)
            if self._doomed is not None:
                self._abort(*self._doomed)
                return False
            self._release()
            if not self._in_transaction:
                return True
            if self._commit():  # aborted
                return False
            if not self._in_transaction:
                return True
            self._publisher.poll(0.05)
        return False

    def committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Never called: offsets are committed by the transaction, not by the consumer."""

    def close(self) -> None:
        if self._in_transaction:
            self._in_transaction = False
            try:
                self._publisher.producer.abort_transaction(1.0)
            except KafkaException as exc:
                log.warning("could not abort the open transaction; the broker aborts it on timeout", error=str(exc))

    def _forget(self, tps: list[TP]) -> None:
        super()._forget(tps)
        for tp in tps:
            self._held.pop(tp, None)
            self._unreleased.pop(tp, None)
            self._released.pop(tp, None)
