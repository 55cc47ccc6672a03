"""The producer edge: hand outputs to librdkafka, count what the broker acknowledged, replace what it refuses.

A record the broker (or the client) refuses *for what it is* (too large, invalid) must not stop its
partition: it is replaced by the next of its fallbacks, each smaller than the one before:

    routed output -> dead letter with the full value -> value cut to fit -> value left out -> key left out

A refusal of anything else (authorization, a missing topic) is about the pipeline, not the record, and
is handed to the committer, which stops the worker. Which of the two a refusal is, and what replaces
a refused record, is decided here for both commit modes; *when* a replacement may be produced is the
committer's business (at once, or after the transaction that held the refused record is aborted).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from filter_worker.exit_codes import FailureSlot, FatalError
from filter_worker.logs import get_logger
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import Outgoing, dead_letter, fitted_dead_letter, omitted_dead_letter

# Refusals that are about the record itself; anything else is about the pipeline.
# The action of a copy drawn for review: it settles its record together with the routed output.
REVIEW = "review"
RECORD_REFUSALS = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG}
)
SIZE_REFUSALS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})

log = get_logger(__name__)


def next_fallback(
    item: Outgoing, err: KafkaError, dead_letter_topic: str, max_bytes: int, cut: bool
) -> Outgoing | None:
    """What to publish instead of ``item`` after the broker refused it with ``err``; ``None``: nothing can be.

    ``max_bytes`` is the most the dead-letter topic accepts; ``cut`` is ``FILTER_DEAD_LETTER__OVERSIZED=cut``.
    """
    code = err.code()
    if code not in RECORD_REFUSALS:
        return None
    record = item.source
    if item.out.topic != dead_letter_topic:
        failure = DecodeFailure("publish_rejected", f"{item.out.topic} refused the routed record: {err.str()}")
        out = dead_letter(record, failure, dead_letter_topic)
        return replace(item, out=out, action="dead_letter", failure=failure, review=None)
    if code not in SIZE_REFUSALS or not cut:
        return None
    assert item.failure is not None  # only dead letters go to the dead-letter topic
    form = dict(item.out.headers).get("filter.value")
    if form is None:
        reason = f"{item.failure.reason}; the dead-letter topic refused it too ({err.str()})"
        failure = DecodeFailure(item.failure.error, reason)
        return replace(item, out=fitted_dead_letter(record, failure, dead_letter_topic, max_bytes), failure=failure)
    if form == b"cut":
        return replace(item, out=omitted_dead_letter(record, item.failure, dead_letter_topic, max_bytes))
    if form == b"omitted" and item.out.key is not None:
        return replace(item, out=omitted_dead_letter(record, item.failure, dead_letter_topic, keep_key=False))
    return None


class DeliveryListener(Protocol):
    """The committer's side of delivery reports."""

    def acknowledged(self, items: list[Outgoing]) -> None: ...

    def refused(self, item: Outgoing, err: KafkaError, queued: bool = True) -> None: ...


class Publisher:
    """Owns the producer's queue: produce, serve delivery reports, keep what did not fit in the queue."""

    def __init__(
        self,
        producer: Producer,
        dead_letter_topic: str,
        dead_letter_max_bytes: int,
        cut_oversized: bool,
        metrics: Metrics,
        failures: FailureSlot,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._failures = failures
        self._dead_letter_topic = dead_letter_topic
        # The most the dead-letter topic takes: the producer's limit, lowered by the topic's once known.
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self._cut = cut_oversized
        self._metrics = metrics
        self._clock = clock
        self._listener: DeliveryListener | None = None
        # Produced while librdkafka's queue was full: retried, in order, before anything new.
        self._backlog: deque[Outgoing] = deque()
        # Delivery reports as librdkafka hands them over, settled together after each poll.
        self._reports: list[tuple[Outgoing, KafkaError | None]] = []
        # Copies for review that produce() refused before queueing them: never in any transaction.
        self._unqueued: list[tuple[Outgoing, KafkaError]] = []
        # Records refused inside a transaction that was then aborted: what to publish when they come back.
        self._replacements: dict[tuple[str, int, int], Outgoing] = {}
        # Records whose copy for review was refused so: published without it when they come back.
        self._no_review: set[tuple[str, int, int]] = set()
        self.last_produce = clock()

    @property
    def producer(self) -> Producer:
        """For the transactional calls; records go through ``send``."""
        return self._producer

    def replace_producer(self, producer: Producer) -> None:
        """Produce through ``producer`` from now on, instead of one whose transactional call never returned.

        What the old one holds is abandoned with it: its transaction is aborted by the broker once the
        new producer registers the same transactional id.
        """
        self._producer = producer
        self._backlog.clear()

    def listen(self, listener: DeliveryListener) -> None:
        self._listener = listener

    @property
    def outstanding(self) -> int:
        """Outputs not yet acknowledged: in librdkafka's queue, in flight, or waiting for room in it."""
        return len(self._producer) + len(self._backlog)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def fallback(self, item: Outgoing, err: KafkaError) -> Outgoing | None:
        return next_fallback(item, err, self._dead_letter_topic, self.dead_letter_max_bytes, self._cut)

    def replace_later(self, replacement: Outgoing) -> None:
        """Publish ``replacement`` instead of its source's output every time that record comes by again.

        Kept until the record's offset is committed (``forget_replacements``), not until the
        replacement is delivered: delivered inside a transaction that is then aborted for another
        record, it comes by again and must be replaced again.
        """
        source = replacement.source
        self._replacements[(source.topic, source.partition, source.offset)] = replacement

    def forget_replacements(self, keep: Callable[[tuple[str, int, int]], bool]) -> None:
        """Drop remembered replacements ``keep`` rejects: committed, or of partitions no longer owned."""
        if self._replacements:
            self._replacements = {k: v for k, v in self._replacements.items() if keep(k)}
        if self._no_review:
            self._no_review = {k for k in self._no_review if keep(k)}

    def replacement(self, item: Outgoing) -> Outgoing:
        """``item``, or what replaces it since its record (or its copy for review) was refused in a
        transaction that was then aborted."""
        if not self._replacements and not self._no_review:  # almost always: no key to build per record
            return item
        source = item.source
        key = (source.topic, source.partition, source.offset)
        replacement = self._replacements.get(key)
        if replacement is not None:
            return replace(replacement, generation=item.generation)
        if key in self._no_review and item.review is not None:
            return replace(item, review=None)
        return item

    def refuse_review(self, item: Outgoing) -> None:
        """Publish the record without its copy for review from now on (the review topic refused that copy)."""
        source = item.source
        self._no_review.add((source.topic, source.partition, source.offset))

    def drop_backlog(self, keep: Callable[[Outgoing], bool]) -> None:
        """Forget what waits for room in librdkafka's queue and ``keep`` rejects (outputs of lost partitions)."""
        if self._backlog:
            self._backlog = deque(item for item in self._backlog if keep(item))

    def clear_backlog(self) -> None:
        """Forget what waits for room in librdkafka's queue: it belonged to a transaction just aborted."""
        self._backlog.clear()

    def send(self, item: Outgoing) -> None:
        """Produce ``item`` and its copy for review, if it has one; never blocks: a full queue keeps them
        in the backlog, in order."""
        self._send(item)
        if item.review is not None:
            self._send(Outgoing(item.review, item.source, item.generation, REVIEW))

    def _send(self, item: Outgoing) -> None:
        if self._backlog or not self._produce(item):
            self._backlog.append(item)

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports (waiting up to ``timeout_s`` for the first), then retry the backlog."""
        self._producer.poll(timeout_s)
        self._settle()
        while self._backlog and self._produce(self._backlog[0]):
            self._backlog.popleft()

    def settle(self) -> None:
        """Serve the delivery reports librdkafka already has, and nothing else (no produce)."""
        self._producer.poll(0)
        self._settle()

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every output to be acknowledged; returns how many are still out."""
        deadline = self._clock() + timeout_s
        while self.outstanding and self._clock() < deadline:
            self.poll(min(0.1, max(0.0, deadline - self._clock())))
        return self.outstanding

    def _produce(self, item: Outgoing) -> bool:
        """``False`` when librdkafka's queue is full; a refusal before queueing goes to the fallback."""
        try:
            out = item.out
            self._producer.produce(
                out.topic,
                key=out.key,
                value=out.value,
                headers=out.headers,  # type: ignore[arg-type]  # bytes or None values: what librdkafka takes
                timestamp=out.timestamp_ms or 0,  # 0: the producer stamps a record that had no timestamp
                on_delivery=lambda err, _msg: self._reports.append((item, err)),
            )
        except BufferError:
            return False
        except KafkaException as exc:  # refused before it was queued (e.g. over message.max.bytes)
            err = exc.args[0]
            if item.action == REVIEW:  # the committer decides; never queued, it is in no transaction
                self._unqueued.append((item, err))
                return True
            fallback = self.fallback(item, err)
            if fallback is None:
                self._failures.set(unpublishable(item, err))
            else:
                log_fallback(item, fallback, err)
                self.send(fallback)
            return True
        self.last_produce = self._clock()
        return True

    def _settle(self) -> None:
        """Hand the delivery reports of the last poll to the committer, per batch.

        The callback librdkafka calls per record only appends to a list: acknowledging a batch at once
        costs a few dict operations per record instead of a call each. What is counted as published,
        and when, is the committer's: a delivery inside a transaction that is then aborted was never
        published.
        """
        assert self._listener is not None
        if self._unqueued:
            unqueued, self._unqueued = self._unqueued, []
            for copy, refusal in unqueued:
                self._listener.refused(copy, refusal, queued=False)
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        delivered = []
        for item, err in reports:
            if err is None:
                delivered.append(item)
            else:
                self._listener.refused(item, err)
        if delivered:
            self._listener.acknowledged(delivered)


def count_published(metrics: Metrics, published: list[Outgoing]) -> None:
    """Outputs now visible to consumers: per action and input topic, dead letters by error, and latency;
    copies for review apart."""
    reviews = sum(1 for i in published if i.action == REVIEW)
    if reviews:
        metrics.review_records.labels("published").inc(reviews)
        published = [i for i in published if i.action != REVIEW]
    for (action, topic), n in Counter((i.action, i.source.topic) for i in published).items():
        metrics.published.labels(action, topic).inc(n)
    dead = [i for i in published if i.failure is not None]
    for error, n in Counter(i.failure.error for i in dead if i.failure is not None).items():
        metrics.dead_letters.labels(error).inc(n)
    for item in dead:
        form = dict(item.out.headers).get("filter.value")
        if form is not None:
            metrics.oversized.labels(form.decode()).inc()
    now = time.time()
    metrics.record_latencies(
        [max(0.0, now - i.source.timestamp_ms / 1000) for i in published if i.source.timestamp_ms is not None]
    )


def unpublishable(item: Outgoing, err: KafkaError) -> FatalError:
    """The error that stops the worker when neither a record nor any fallback of it can be published."""
    dead_letter_topic = item.action == "dead_letter"
    return FatalError(
        f"publishing {item.source.source} to {item.out.topic} failed: {err.str()}"
        + (" (the dead-letter topic refused it too)" if dead_letter_topic else "")
    )


def log_fallback(item: Outgoing, fallback: Outgoing, err: KafkaError) -> None:
    """One warning per replaced record: where it came from, who refused it, what is published instead."""
    source = item.source
    log.warning(
        "record refused; publishing its fallback",
        topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        refused_by=item.out.topic,
        error=err.str(),
        size=item.out.size,
        value=(dict(fallback.out.headers).get("filter.value") or b"full").decode(),
    )
