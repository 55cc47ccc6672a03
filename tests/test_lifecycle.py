"""The lifecycle's orderings and the committers' call sequences, with a hand-moved clock and recording clients.

Each row of the lifecycle's table (``delivery/lifecycle.py``, docs/delivery.md) is a test here; the
same faults are reproduced against the real broker in ``tests/integration/test_delivery_seams.py``.
The clients record every call and answer as librdkafka does for the case under test, so the order of
calls (which is what a transactional producer's state machine cares about) is what is asserted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from filter_worker.config import DeadLetterSettings, KafkaSettings
from filter_worker.delivery.at_least_once import COMMIT_GRACE_S, AtLeastOnce
from filter_worker.delivery.budget import InFlightBudget
from filter_worker.delivery.committer import Committer
from filter_worker.delivery.gate import DeadLetterGate
from filter_worker.delivery.lifecycle import Lifecycle, State
from filter_worker.delivery.pausing import Pausing
from filter_worker.delivery.publisher import Publisher
from filter_worker.delivery.transactional import Phase, Transactional
from filter_worker.exit_codes import FailureSlot, FatalError
from filter_worker.monitoring.health import Health
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.records import InputRecord, Outgoing, OutputRecord
from tests.clock import ManualClock

TP = ("in", 0)
DLQ = "out.dlq"
REVIEW_TOPIC = "out.review"
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")


CONFLICT = KafkaError(KafkaError._CONFLICT, "Conflicting commit_transaction API call is already in progress")
TIMED_OUT = KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation to finish", retriable=True)


class RecordingProducer:
    """Records every call; deliveries are reported on ``poll``/``flush`` (or inside the commit's flush).

    A transactional one keeps librdkafka's rules (``rdkafka_txnmgr.c``): after a retriable
    ``commit_transaction`` (or ``abort_transaction``) error that call stays current and any other
    transactional call gets ``_CONFLICT``; records are produced only inside a transaction (``_STATE``
    otherwise); a transaction holding a failed record cannot commit (an abortable error).
    """

    def __init__(self, clock: ManualClock, transactional: bool = False) -> None:
        self.calls: list[str] = []
        self.topics: list[tuple[str, int]] = []  # (topic, source offset) of every produce
        self._reports: list[tuple[Callable[..., None], KafkaError | None]] = []
        self.refuse: Callable[[str, bytes | None], KafkaError | None] = lambda _t, _v: None
        self.commit_errors: list[KafkaError] = []  # raised by the next commit_transaction calls, in order
        self.abort_errors: list[KafkaError] = []  # raised by the next abort_transaction calls, in order
        self.report_inside_commit = False  # deliveries reach the callbacks only inside commit_transaction's flush
        self.transactional = transactional
        self.in_transaction = False
        self.current: str | None = None  # the transactional call that must be resumed before any other
        self._failed = False  # a record of the open transaction failed
        self._clock = clock

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.current is not None and self.current != name:
            raise KafkaException(CONFLICT)

    def produce(self, topic: str, key: Any = None, value: Any = None, headers: Any = None, timestamp: int = 0,
                on_delivery: Callable[..., None] | None = None) -> None:  # fmt: skip
        if self.transactional and not self.in_transaction:
            self.calls.append("produce refused: _STATE")
            raise KafkaException(KafkaError(KafkaError._STATE, "Producing not allowed in transactional state"))
        self.calls.append("produce")
        self.topics.append((topic, int(dict(headers or []).get("src", b"-1"))))
        assert on_delivery is not None
        err = self.refuse(topic, value)
        self._failed = self._failed or err is not None
        self._reports.append((on_delivery, err))

    def _report(self) -> None:
        reports, self._reports = self._reports, []
        for callback, err in reports:
            callback(err, None)

    def poll(self, timeout: float = 0) -> int:
        if not self.report_inside_commit:
            self._report()
        return 0

    def flush(self, timeout: float = 0) -> int:
        self._report()
        return 0

    def __len__(self) -> int:
        return len(self._reports)

    def init_transactions(self, timeout: float = 0) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self._call("begin")
        self.in_transaction, self._failed = True, False

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], _metadata: object, _timeout: float) -> None:
        self._call("send_offsets:" + ",".join(str(tp.offset) for tp in offsets))

    def commit_transaction(self, timeout: float = 0) -> None:
        self._call("commit")
        self._report()
        if self.commit_errors:
            err = self.commit_errors.pop(0)
            self.current = "commit" if err.retriable() else None
            raise KafkaException(err)
        self.current = None
        if self._failed:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "a record failed", txn_requires_abort=True))
        self.in_transaction = False

    def abort_transaction(self, timeout: float = 0) -> None:
        self._call("abort")
        if self.abort_errors:
            err = self.abort_errors.pop(0)
            self.current = "abort" if err.retriable() else None
            raise KafkaException(err)
        self.current = None
        self.in_transaction, self._failed = False, False
        self._reports.clear()


class RecordingConsumer:
    """Records commits, pauses and seeks; an asynchronous commit's result comes on ``poll`` if ``answer``."""

    def __init__(self, clock: ManualClock) -> None:
        self.calls: list[str] = []
        self.answer = True
        self.on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = None
        self._pending: list[list[TopicPartition]] = []
        self._clock = clock

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.calls.append("assign")

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(f"pause:{len(partitions)}")

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.calls.append(f"resume:{len(partitions)}")

    def seek(self, tp: TopicPartition) -> None:
        self.calls.append(f"seek:{tp.offset}")

    def consumer_group_metadata(self) -> object:
        return object()

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition] | None:
        self.calls.append(
            ("commit_async:" if asynchronous else "commit_sync:") + ",".join(str(t.offset) for t in offsets)
        )
        if asynchronous:
            self._pending.append(offsets)
            return None
        return offsets

    def poll(self, timeout: float = 0) -> None:
        self._clock.now += timeout  # a poll that waits lets time pass
        if self.answer and self._pending and self.on_commit is not None:
            self.on_commit(None, self._pending.pop(0))


class RecordingStage:
    """The classify stage as the lifecycle sees it: records what it is asked; ``done`` is what finish answers."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.done = True

    def finish(self, partitions: set | None, deadline: float, clock: Callable[[], float], highest: Any) -> bool:
        self.calls.append(f"classify.finish:{'all' if partitions is None else sorted(partitions)}")
        return self.done

    def forget(self, partitions: set) -> int:
        self.calls.append(f"classify.forget:{sorted(partitions)}")
        return 0

    def discard(self, keep: Callable[[InputRecord, int], bool]) -> int:
        self.calls.append("classify.discard")
        return 0

    def close(self) -> None:
        self.calls.append("classify.close")


class Rig:
    """A lifecycle over real committer, publisher, gate and pausing stage, with recording clients."""

    def __init__(self, exactly_once: bool, cut_oversized: bool = True, **kafka: Any) -> None:
        self.clock = ManualClock()
        self.producer = RecordingProducer(self.clock, transactional=exactly_once)
        self.consumer = RecordingConsumer(self.clock)
        self.metrics = Metrics()
        self.failures = FailureSlot()
        self.publisher = Publisher(
            self.producer,  # type: ignore[arg-type]
            DLQ,
            1_000_000,
            cut_oversized,
            self.metrics,
            self.failures,
            self.clock,
        )
        settings = KafkaSettings(exactly_once=exactly_once, commit_interval_ms=1000, **kafka)
        self.health = Health(60, self.clock)
        self.replacements: list[RecordingProducer] = []  # producers made after one was stuck in a call
        stages = (settings, self.consumer, self.publisher, self.metrics, self.health, self.failures, self.clock)
        self.committer: Committer = (
            Transactional(*stages, new_producer=self._new_producer)  # type: ignore[arg-type]
            if exactly_once
            else AtLeastOnce(*stages)  # type: ignore[arg-type]
        )
        self.consumer.on_commit = self.committer.committed
        if isinstance(self.committer, Transactional):
            assert self.committer.init_transactions()
            self.producer.calls.clear()
        self.gate = DeadLetterGate(DeadLetterSettings(), self.committer.publish)
        self.stage = RecordingStage(self.consumer.calls)
        self.pausing = Pausing(self.consumer, InFlightBudget(1000, 10**9), self.committer, self.metrics)  # type: ignore[arg-type]
        self.lifecycle = Lifecycle(
            consumer=self.consumer,  # type: ignore[arg-type]
            classify=self.stage,
            gate=self.gate,
            committer=self.committer,
            pausing=self.pausing,
            failures=self.failures,
            revoke_timeout_s=5.0,
            clock=self.clock,
        )
        self.lifecycle.assigned([TopicPartition(*TP)])
        self.generation = self.committer.tracker.generation(TP)

    def _new_producer(self) -> RecordingProducer:
        self.replacements.append(RecordingProducer(self.clock, transactional=True))
        return self.replacements[-1]

    def consume(self, *offsets: int) -> None:
        for offset in offsets:
            self.committer.track(InputRecord("in", 0, offset, None, b"v", [], None))

    def decide(self, *offsets: int, topic: str = "out.allow", reviewed: tuple[int, ...] = ()) -> None:
        for offset in offsets:
            record = InputRecord("in", 0, offset, None, b"v%d" % offset, [("src", str(offset).encode())], None)
            out = OutputRecord(topic, None, record.value, record.headers, None)
            review = out._replace(topic=REVIEW_TOPIC) if offset in reviewed else None
            generation = self.committer.tracker.generation(TP)
            assert generation is not None
            self.gate.submit(Outgoing(out, record, generation, "allow", review=review))

    def published(self) -> float:
        return sum(s.value for m in self.metrics.registry.collect() for s in m.samples
                   if s.name == "filter_records_published_total")  # fmt: skip


def committed_offset(rig: Rig) -> int | None:
    state = rig.committer.tracker._partitions.get(TP)  # noqa: SLF001 - the committed mark under test
    return state.committed if state else None


# -- exactly-once -----------------------------------------------------------------------------------


def test_stop_past_its_deadline_aborts_and_nothing_begins_after_it():
    """Issue 20, fault 1: the revocation that close() runs must not commit the aborted transaction's offsets."""
    rig = Rig(exactly_once=True)
    rig.consume(*range(12))
    rig.decide(*range(8))
    rig.lifecycle.poll(caught_up=False)  # 0-7 released into the open transaction, not yet due
    assert rig.producer.calls == ["begin", *["produce"] * 8]
    rig.stage.done = False  # a forward pass outlives the stop's deadline
    rig.clock.now += 0.001
    assert not rig.lifecycle.stop(deadline=rig.clock.now)
    assert rig.producer.calls[-1] == "abort"
    rig.decide(8, 9, 10, 11)  # a pass that ended during the stop, decided after it: held, never released
    rig.lifecycle.close()
    rig.lifecycle.revoked([TP])  # consumer.close() revokes
    assert rig.producer.calls == ["begin", *["produce"] * 8, "abort"], "nothing begins or commits after the abort"
    assert committed_offset(rig) is None


def test_graceful_stop_commits_what_is_decided_and_leaves_the_buffered_rest():
    """Issue 20, fault 5: records buffered above every decided one are not a missed deadline."""
    rig = Rig(exactly_once=True)
    rig.consume(*range(10))
    rig.decide(*range(5))
    assert rig.lifecycle.stop(deadline=rig.clock.now + 10)
    assert rig.producer.calls == ["begin", *["produce"] * 5, "send_offsets:5", "commit"]
    assert rig.lifecycle.state is State.STOPPED
    assert rig.consumer.calls[:2] == ["assign", "resume:1"] and "pause:1" in rig.consumer.calls, "fetching held"


def test_after_a_retriable_commit_error_only_the_commit_is_called_again():
    """Issue 20, fault 3: librdkafka refuses produce and send_offsets until the timed-out commit finished."""
    rig = Rig(exactly_once=True)
    rig.producer.commit_errors = [KafkaError(KafkaError._TIMED_OUT, "commit timed out", retriable=True)]
    rig.consume(*range(6))
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=False)
    rig.clock.now += 2  # the commit interval passed
    rig.lifecycle.poll(caught_up=False)  # commit: times out
    assert rig.committer.phase is Phase.COMMITTING
    rig.decide(3, 4, 5)  # decided meanwhile: held, not produced into the frozen transaction
    rig.lifecycle.poll(caught_up=False)  # resumed: commit only
    assert rig.producer.calls == ["begin", *["produce"] * 3, "send_offsets:3", "commit", "commit"]
    assert committed_offset(rig) == 3 and rig.committer.phase is Phase.IDLE
    rig.clock.now += 2
    rig.lifecycle.poll(caught_up=True)  # then a new transaction takes the rest
    assert rig.producer.calls[-6:] == ["begin", *["produce"] * 3, "send_offsets:6", "commit"][-6:]
    assert committed_offset(rig) == 6
    assert rig.metrics.transaction_aborts._value.get() == 0  # noqa: SLF001


def test_a_refusal_reported_inside_the_commit_is_replaced_when_its_record_comes_back():
    """Issue 20, fault 2: the report arrives in commit_transaction's flush, before the abort rewinds."""
    rig = Rig(exactly_once=True)
    rig.producer.report_inside_commit = True
    rig.producer.refuse = lambda topic, value: TOO_LARGE if topic != DLQ and value == b"v2" else None
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=True)  # released and committed at once: the refusal comes inside the commit
    assert rig.producer.calls[-2:] == ["commit", "abort"]
    assert rig.consumer.calls[-2:] == ["seek:0", "classify.discard"], "rewound, stale work dropped"
    rig.producer.report_inside_commit = False
    rig.clock.now += 1  # the backoff
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=True)
    assert rig.producer.topics[-3:] == [("out.allow", 0), ("out.allow", 1), (DLQ, 2)]
    assert committed_offset(rig) == 3
    assert rig.metrics.transaction_aborts._value.get() == 1  # noqa: SLF001


def test_a_replacement_outlives_the_abort_of_a_transaction_it_was_delivered_in():
    """Issue 20, fault 2: two refused records in turn; each must stay replaced until its offset commits."""
    rig = Rig(exactly_once=True)
    rig.producer.refuse = lambda topic, value: TOO_LARGE if topic != DLQ and value in (b"v0", b"v3") else None
    rig.consume(*range(4))
    rig.decide(0, 1)
    rig.lifecycle.poll(caught_up=False)  # 0 refused: reported on the next poll
    rig.lifecycle.poll(caught_up=False)
    assert rig.producer.calls[-1] == "abort"
    for attempt in range(2):  # after each abort the partition is read again from 0
        rig.clock.now += 10
        rig.consume(*range(4))
        rig.decide(*range(4))
        rig.lifecycle.poll(caught_up=False)
        rig.lifecycle.poll(caught_up=True)
        if attempt == 0:
            assert rig.producer.calls[-1] == "abort", "3 refused: the transaction holding 0's replacement aborts"
    assert committed_offset(rig) == 4, "0 and 3 both replaced in the third transaction"
    assert [t for t, _ in rig.producer.topics[-4:]] == [DLQ, "out.allow", "out.allow", DLQ]
    assert rig.metrics.transaction_aborts._value.get() == 2  # noqa: SLF001


def test_deliveries_inside_an_aborted_transaction_are_not_counted_as_published():
    """Issue 20, fault 9: counted when their transaction commits."""
    rig = Rig(exactly_once=True)
    rig.producer.commit_errors = [KafkaError(KafkaError._MSG_TIMED_OUT, "x", txn_requires_abort=True)]
    rig.consume(*range(5))
    rig.decide(*range(5))
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.poll(caught_up=False)  # delivered (acknowledged) inside the open transaction
    assert rig.published() == 0
    rig.lifecycle.poll(caught_up=True)  # the commit fails: aborted
    assert rig.producer.calls[-1] == "abort" and rig.published() == 0
    rig.clock.now += 1
    rig.consume(*range(5))
    rig.decide(*range(5))
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.poll(caught_up=True)
    assert committed_offset(rig) == 5 and rig.published() == 5


def test_begin_transaction_failing_retriably_is_retried_on_the_next_turn():
    rig = Rig(exactly_once=True)
    failures = [KafkaError(KafkaError._TIMED_OUT, "coordinator", retriable=True)]

    begin_transaction = rig.producer.begin_transaction

    def begin() -> None:
        if failures:
            rig.producer.calls.append("begin")
            raise KafkaException(failures.pop())
        begin_transaction()

    rig.producer.begin_transaction = begin  # type: ignore[method-assign]
    rig.consume(0)
    rig.decide(0)
    rig.lifecycle.poll(caught_up=False)
    assert rig.producer.calls == ["begin"] and rig.failures.failure is None
    rig.lifecycle.poll(caught_up=True)
    assert rig.producer.calls == ["begin", "begin", "produce", "send_offsets:1", "commit"]


def test_a_record_that_cannot_be_published_stops_the_release_and_nothing_commits_past_it():
    """FILTER_DEAD_LETTER__OVERSIZED=stop: the refusal comes from produce itself, in the middle of a release."""
    rig = Rig(exactly_once=True, cut_oversized=False)
    produce = rig.producer.produce

    def refusing(topic: str, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("value") == b"v2":
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large"))
        produce(topic, *args, **kwargs)

    rig.producer.produce = refusing  # type: ignore[method-assign]
    rig.consume(*range(6))
    rig.decide(*range(6))
    rig.lifecycle.poll(caught_up=True)
    assert rig.failures.failure is not None
    assert rig.producer.calls == ["begin", "produce", "produce"], (
        "0 and 1; 2 and its dead letter refused: nothing after"
    )
    rig.lifecycle.close()
    assert rig.producer.calls[-1] == "abort" and committed_offset(rig) is None


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_record_drawn_for_review_is_acknowledged_once_its_output_and_its_copy_are(exactly_once):
    rig = Rig(exactly_once=exactly_once)
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2, reviewed=(1,))
    rig.lifecycle.poll(caught_up=False)
    assert rig.producer.topics == [("out.allow", 0), ("out.allow", 1), (REVIEW_TOPIC, 1), ("out.allow", 2)]
    rig.lifecycle.stop(deadline=rig.clock.now + 5)
    assert committed_offset(rig) == 3
    assert rig.metrics.review_records.labels("published")._value.get() == 1  # noqa: SLF001


def test_at_least_once_a_copy_for_review_refused_for_its_size_is_dropped_and_its_record_settles():
    rig = Rig(exactly_once=False)
    rig.producer.refuse = lambda topic, _value: TOO_LARGE if topic == REVIEW_TOPIC else None
    rig.consume(0, 1)
    rig.decide(0, 1, reviewed=(0,))
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.poll(caught_up=False)
    assert rig.failures.failure is None
    assert rig.committer.tracker.watermark(TP) == 2, "the routed output alone settles the record"
    assert rig.metrics.review_records.labels("refused")._value.get() == 1  # noqa: SLF001


def test_exactly_once_a_refused_copy_for_review_aborts_once_and_its_record_comes_back_without_it():
    rig = Rig(exactly_once=True)
    rig.producer.refuse = lambda topic, _value: TOO_LARGE if topic == REVIEW_TOPIC else None
    rig.consume(0, 1)
    rig.decide(0, 1, reviewed=(0,))
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.poll(caught_up=False)
    assert rig.producer.calls[-1] == "abort"
    rig.clock.now += 1
    rig.consume(0, 1)
    rig.decide(0, 1, reviewed=(0,))  # drawn again: the draw is fixed by the source
    rig.lifecycle.poll(caught_up=True)
    assert rig.producer.topics[-2:] == [("out.allow", 0), ("out.allow", 1)], "no copy the second time"
    assert committed_offset(rig) == 2
    assert rig.metrics.transaction_aborts._value.get() == 1  # noqa: SLF001


def test_lost_partitions_abort_the_open_transaction_and_commit_nothing():
    rig = Rig(exactly_once=True)
    rig.consume(0, 1)
    rig.decide(0, 1)
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.lost([TP])
    assert rig.producer.calls == ["begin", "produce", "produce", "abort"]
    assert rig.consumer.calls[-2:] == ["classify.discard", f"classify.forget:{[TP]}"]


def test_at_least_once_lost_partitions_outputs_still_queued_count_against_the_budget_and_their_backlog_goes():
    """Issue 25, item 6: lost() forgot the tracker's records while their outputs stayed in librdkafka's queue
    (still produced: allowed repeats) and in the publisher's backlog, so the in-flight budget no longer
    counted them and fetching resumed with them still in memory."""
    rig = Rig(exactly_once=False)
    rig.producer.report_inside_commit = True  # no acknowledgement arrives: the broker is away
    produce = rig.producer.produce

    def queue_of_three(topic: str, *args: Any, **kwargs: Any) -> None:
        if len(rig.producer) >= 3:
            raise BufferError("queue full")
        produce(topic, *args, **kwargs)

    rig.producer.produce = queue_of_three  # type: ignore[method-assign]
    rig.consume(*range(5))
    rig.decide(*range(5))
    assert (len(rig.producer), rig.publisher.backlog) == (3, 2)
    assert rig.committer.in_flight() == (5, 5)  # one byte each
    rig.lifecycle.lost([TP])
    assert rig.publisher.backlog == 0, "the backlog of a lost partition is not produced"
    assert rig.committer.tracker.in_flight() == 0
    assert rig.committer.in_flight()[0] == 3, "what librdkafka still holds counts against the budget"


def test_records_read_across_a_rewind_inside_a_rebalance_callback_are_dropped_and_read_again():
    """Issue 25, item 4: the loop polls one record, then consume() serves a loss that aborts and rewinds the
    partitions kept; the polled record predates the seek.

    Before: it was tracked under the new generation, the re-fetched lower offsets then raised
    ``consumed out of order`` (a ValueError: a traceback, not an exit code).
    """
    rig = Rig(exactly_once=True)
    other = ("in", 1)
    rig.lifecycle.assigned([TopicPartition(*other)])
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=False)  # 0-2 released into the open transaction
    rig.committer.begin_read()
    # poll() returned record 3; consume() then served the loss of the other partition: abort, rewind to 0
    rig.lifecycle.lost([other])
    assert rig.consumer.calls[-3:] == ["seek:0", "classify.discard", f"classify.forget:{[other]}"]
    rig.consume(3)  # read before the seek
    rig.consume(0)  # read after it, in the same consume()
    rig.committer.end_read()
    assert rig.consumer.calls[-1] == "seek:0", "sought again: both records are read again"
    assert rig.committer.tracker.in_flight() == 0
    rig.consume(0, 1, 2, 3)  # the next read, in order
    rig.decide(0, 1, 2, 3)
    rig.lifecycle.poll(caught_up=True)
    assert rig.failures.failure is None and committed_offset(rig) == 4


# -- exactly-once: what librdkafka refuses while a call must be resumed (the review of issue 20) ------


def committing(rig: Rig, *decided: int) -> None:
    """Records released into a transaction whose commit then timed out: librdkafka waits for the commit
    to be resumed and refuses any other transactional call meanwhile."""
    rig.consume(*decided)
    rig.decide(*decided)
    rig.lifecycle.poll(caught_up=False)
    rig.producer.commit_errors = [TIMED_OUT]
    rig.clock.now += 2
    rig.lifecycle.poll(caught_up=False)
    assert rig.committer.phase is Phase.COMMITTING


def test_a_refusal_reported_after_a_commit_timeout_resumes_the_commit_before_aborting():
    rig = Rig(exactly_once=True)
    rig.producer.report_inside_commit = True
    rig.producer.refuse = lambda topic, value: TOO_LARGE if topic != DLQ and value == b"v1" else None
    committing(rig, 0, 1, 2)
    rig.producer.report_inside_commit = False
    rig.lifecycle.poll(caught_up=False)
    assert rig.failures.failure is None, rig.failures.failure
    assert rig.producer.calls[-2:] == ["commit", "abort"], "the commit resumed, failed abortably, then aborted"
    assert rig.consumer.calls[-2:] == ["seek:0", "classify.discard"]


def test_a_stop_past_its_deadline_during_a_resumable_commit_is_exit_6_not_a_failure():
    rig = Rig(exactly_once=True)
    committing(rig, 0, 1, 2)
    rig.producer.commit_errors = [TIMED_OUT] * 10
    assert not rig.lifecycle.stop(deadline=rig.clock.now)
    assert rig.failures.failure is None, rig.failures.failure
    assert "abort" not in rig.producer.calls, "no abort while the commit must be resumed"


def test_a_stop_whose_resumed_commit_succeeds_says_so():
    rig = Rig(exactly_once=True)
    committing(rig, 0, 1, 2)
    assert rig.lifecycle.stop(deadline=rig.clock.now)
    assert committed_offset(rig) == 3 and rig.failures.failure is None


def test_a_revocation_whose_deadline_passes_during_a_resumable_commit_is_not_fatal():
    rig = Rig(exactly_once=True)
    committing(rig, 0, 1, 2)
    rig.producer.commit_errors = [TIMED_OUT] * 100
    commit_transaction = rig.producer.commit_transaction

    def slow_commit(timeout: float = 0) -> None:
        rig.clock.now += timeout
        commit_transaction(timeout)

    rig.producer.commit_transaction = slow_commit  # type: ignore[method-assign]
    finished, _ = rig.lifecycle.revoked([TP])
    assert not finished and rig.failures.failure is None, rig.failures.failure


def test_an_abort_that_times_out_is_resumed_not_fatal():
    rig = Rig(exactly_once=True)
    rig.producer.refuse = lambda topic, value: TOO_LARGE if topic != DLQ and value == b"v1" else None
    rig.producer.abort_errors = [TIMED_OUT]
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.poll(caught_up=False)  # 1 refused: the abort times out
    assert rig.failures.failure is None, rig.failures.failure
    assert rig.committer.phase is Phase.ABORTING
    rig.lifecycle.poll(caught_up=False)  # resumed
    assert rig.committer.phase is Phase.IDLE and rig.producer.calls[-2:] == ["abort", "abort"]
    assert rig.consumer.calls[-2:] == ["seek:0", "classify.discard"]


def test_an_abort_empties_the_publishers_backlog():
    """Outputs waiting for room in librdkafka's queue belonged to the aborted transaction."""
    rig = Rig(exactly_once=True)
    produce = rig.producer.produce
    full = {"on": True}

    def maybe_full(topic: str, *args: Any, **kwargs: Any) -> None:
        if full["on"] and kwargs.get("value") in (b"v2", b"v3"):
            raise BufferError("queue full")
        produce(topic, *args, **kwargs)

    rig.producer.produce = maybe_full  # type: ignore[method-assign]
    rig.producer.refuse = lambda topic, value: TOO_LARGE if topic != DLQ and value == b"v0" else None
    rig.consume(0, 1, 2, 3)
    rig.decide(0, 1, 2, 3)
    rig.lifecycle.poll(caught_up=False)
    assert rig.publisher.backlog == 2
    rig.lifecycle.poll(caught_up=False)  # 0 refused: aborted while 2 and 3 still wait for room
    assert rig.producer.calls[-1] == "abort"
    full["on"] = False
    rig.clock.now += 1
    rig.lifecycle.poll(caught_up=False)
    assert rig.failures.failure is None, rig.failures.failure
    assert rig.publisher.backlog == 0 and "produce refused: _STATE" not in rig.producer.calls


def test_a_copy_for_review_refused_before_queueing_is_dropped_without_an_abort():
    """Issue 25, item 1: the copy never entered the transaction, so nothing in it needs an abort.

    Before: the refusal doomed the transaction; with every copy too large, every transaction aborted.
    """
    rig = Rig(exactly_once=True)
    produce = rig.producer.produce

    def refusing(topic: str, *args: Any, **kwargs: Any) -> None:
        if topic == REVIEW_TOPIC:
            raise KafkaException(TOO_LARGE)
        produce(topic, *args, **kwargs)

    rig.producer.produce = refusing  # type: ignore[method-assign]
    rig.consume(0, 1)
    rig.decide(0, 1, reviewed=(0,))
    rig.lifecycle.poll(caught_up=True)  # released and due in one turn
    assert committed_offset(rig) == 2 and "abort" not in rig.producer.calls
    assert rig.metrics.transaction_aborts._value.get() == 0  # noqa: SLF001
    assert rig.metrics.review_records.labels("refused")._value.get() == 1  # noqa: SLF001


@contextlib.contextmanager
def hung(producer: object, call: str) -> Iterator[None]:
    """``producer.<call>`` blocks until the block ends: a broker that never answers that call."""
    released = threading.Event()
    setattr(producer, call, lambda *_args: released.wait())
    try:
        yield
    finally:
        released.set()


def test_a_call_that_outlives_its_timeout_leaves_the_loop_turning_and_a_stuck_one_replaces_the_producer():
    """Issue 25, item 2: librdkafka 2.16 was seen blocking in send_offsets_to_transaction for good.

    The loop waits on the call at most a turn's worth (0.5 s), says not ready once it outlived its
    timeout, and after 30 s takes a new producer (same transactional id: the broker aborts the old
    one's transaction) and re-reads from the last commit. Before, the loop itself blocked in the call.
    """
    rig = Rig(exactly_once=True)
    with hung(rig.producer, "send_offsets_to_transaction"):
        rig.consume(0, 1, 2)
        rig.decide(0, 1, 2)
        started = time.monotonic()
        rig.lifecycle.poll(caught_up=True)  # released, frozen, offsets being sent: the call does not return
        assert time.monotonic() - started < 5, "the loop waited on the call"
        assert rig.committer.phase is Phase.SENDING and rig.health.publishing
        rig.clock.now += 12  # past the call's 10 s timeout
        rig.lifecycle.poll(caught_up=True)
        assert rig.committer.phase is Phase.SENDING and not rig.health.publishing, "not ready while stuck"
        rig.clock.now += 20  # 32 s: given up
        rig.lifecycle.poll(caught_up=True)
        assert len(rig.replacements) == 1 and rig.publisher.producer is rig.replacements[0]
        assert rig.committer.phase is Phase.IDLE and committed_offset(rig) is None
        assert rig.consumer.calls[-2:] == ["seek:0", "classify.discard"], "rewound, stale work dropped"
        fresh = rig.replacements[0]
        rig.lifecycle.poll(caught_up=True)  # the new producer registers the transactional id first
        assert fresh.calls == ["init"]
        rig.consume(0, 1, 2)  # re-read after the rewind
        rig.decide(0, 1, 2)
        rig.lifecycle.poll(caught_up=True)
        assert committed_offset(rig) == 3 and rig.health.publishing
        assert fresh.calls == ["init", "begin", "produce", "produce", "produce", "send_offsets:3", "commit"]


def test_a_stop_right_after_the_producer_was_replaced_registers_it_and_commits():
    rig = Rig(exactly_once=True)
    with hung(rig.producer, "send_offsets_to_transaction"):
        rig.consume(0, 1)
        rig.decide(0, 1)
        rig.lifecycle.poll(caught_up=True)
        rig.clock.now += 31
        rig.lifecycle.poll(caught_up=True)  # replaced, rewound
        rig.consume(0, 1)
        rig.decide(0, 1)
        assert rig.lifecycle.stop(deadline=rig.clock.now + 10)
        assert committed_offset(rig) == 2 and rig.replacements[0].calls[0] == "init"


def test_a_commit_of_unknown_outcome_is_never_given_up():
    """A commit may have committed: replacing its producer and re-reading would repeat its records."""
    rig = Rig(exactly_once=True)
    with hung(rig.producer, "commit_transaction"):
        rig.consume(0, 1)
        rig.decide(0, 1)
        rig.lifecycle.poll(caught_up=True)
        rig.clock.now += 120
        rig.lifecycle.poll(caught_up=True)
        assert rig.committer.phase is Phase.COMMITTING and not rig.replacements
    rig.lifecycle.poll(caught_up=True)
    assert committed_offset(rig) == 2


def test_a_stop_that_resumes_a_commit_also_publishes_what_was_decided_meanwhile():
    rig = Rig(exactly_once=True)
    rig.consume(*range(6))
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=False)
    rig.producer.commit_errors = [TIMED_OUT]
    rig.clock.now += 2
    rig.lifecycle.poll(caught_up=False)
    assert rig.committer.phase is Phase.COMMITTING
    rig.decide(3, 4, 5)  # decided while the commit waits to be resumed
    assert rig.lifecycle.stop(deadline=rig.clock.now + 10)
    assert committed_offset(rig) == 6


# -- the lifecycle's order, either mode ------------------------------------------------------------


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_revocation_finishes_then_lets_dead_letters_through_then_commits_then_forgets(exactly_once):
    rig = Rig(exactly_once=exactly_once)
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2)
    rig.lifecycle.poll(caught_up=False)
    finished, _ = rig.lifecycle.revoked([TP])
    assert finished
    calls = rig.consumer.calls
    assert calls.index(f"classify.finish:{[TP]}") < calls.index(f"classify.forget:{[TP]}")
    if exactly_once:
        assert rig.producer.calls[-2:] == ["send_offsets:3", "commit"]
    else:
        assert "commit_sync:3" in calls and calls.index("commit_sync:3") < calls.index(f"classify.forget:{[TP]}")
    assert rig.committer.tracker.assigned() == []


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_revocation_that_fails_still_forgets_its_partitions(exactly_once):
    """A fatal error inside a revocation (the dead-letter limit, say): the close must not commit them."""
    rig = Rig(exactly_once=exactly_once)
    rig.consume(0, 1, 2)
    rig.decide(0, 1)
    rig.lifecycle.poll(caught_up=False)

    def limit_reached(*_args: Any) -> bool:
        raise FatalError("dead-letter limit reached")

    rig.stage.finish = limit_reached  # type: ignore[method-assign]
    rig.lifecycle.revoked([TP])
    assert rig.failures.failure is not None and rig.committer.tracker.assigned() == []
    commits = [c for c in rig.consumer.calls if c.startswith("commit")]
    rig.lifecycle.close()
    assert [c for c in rig.consumer.calls if c.startswith("commit")] == commits


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_revocation_after_the_stop_commits_nothing(exactly_once):
    rig = Rig(exactly_once=exactly_once)
    rig.consume(0, 1)
    rig.stage.done = False
    rig.lifecycle.stop(deadline=rig.clock.now)
    rig.decide(0, 1)
    before = (list(rig.producer.calls), [c for c in rig.consumer.calls if c.startswith("commit")])
    rig.lifecycle.revoked([TP])
    assert rig.producer.calls == before[0]
    assert [c for c in rig.consumer.calls if c.startswith("commit")] == before[1]
    assert f"classify.forget:{[TP]}" in rig.consumer.calls


# -- at-least-once ---------------------------------------------------------------------------------


def test_at_least_once_stop_waits_for_its_commit_result_only_until_the_deadline_and_says_so():
    """Issue 20, fault 7: a commit whose result never comes is not a clean stop, and does not block."""
    rig = Rig(exactly_once=False)
    rig.consume(0, 1)
    rig.decide(0, 1)
    rig.lifecycle.poll(caught_up=False)  # published and acknowledged; the commit is not due yet
    rig.consumer.answer = False  # the coordinator does not answer
    started = rig.clock.now
    assert not rig.lifecycle.stop(deadline=started + 3)
    assert rig.clock.now - started <= 3 + COMMIT_GRACE_S + 0.1
    assert "commit_async:2" in rig.consumer.calls and not any(c.startswith("commit_sync") for c in rig.consumer.calls)


def test_at_least_once_stop_revoked_while_it_waits_for_its_commit_result_says_so():
    """A rebalance served by the stop's own poll must not pass for the commit's result."""
    rig = Rig(exactly_once=False)
    rig.consume(0, 1)
    rig.decide(0, 1)
    rig.lifecycle.poll(caught_up=False)
    rig.consumer.answer = False
    poll = rig.consumer.poll

    def poll_and_revoke(timeout: float = 0) -> None:
        poll(timeout)
        if rig.committer.tracker.assigned():
            rig.lifecycle.revoked([TP])

    rig.consumer.poll = poll_and_revoke  # type: ignore[method-assign]
    assert not rig.lifecycle.stop(deadline=rig.clock.now + 3)


def test_at_least_once_stop_commits_acknowledged_records_and_reports_success():
    rig = Rig(exactly_once=False)
    rig.consume(0, 1, 2)
    rig.decide(0, 1, 2)
    assert rig.lifecycle.stop(deadline=rig.clock.now + 3)
    assert committed_offset(rig) == 3


def test_at_least_once_close_after_a_failure_commits_what_is_acknowledged_once():
    rig = Rig(exactly_once=False)
    rig.consume(0, 1, 2)
    rig.decide(0, 1)
    rig.lifecycle.poll(caught_up=False)
    rig.lifecycle.close()  # no stop ran: a fatal error ended the loop
    assert committed_offset(rig) == 2
    rig.lifecycle.revoked([TP])  # consumer.close() revokes: nothing more
    assert [c for c in rig.consumer.calls if c.startswith("commit")] == ["commit_async:2"]
