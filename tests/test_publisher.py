"""What replaces a refused record, and a producer queue that is full: never block, never lose."""

from __future__ import annotations

from confluent_kafka import KafkaError, Producer

from filter_worker.delivery.publisher import Publisher, next_fallback
from filter_worker.exit_codes import FailureSlot
from filter_worker.logs import librdkafka_logger
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import InputRecord, Outgoing, OutputRecord

DLQ = "in.dlq"
SOURCE = InputRecord("in", 3, 77, b"key", b"x" * 5000, [("trace", b"t")], 1700000000000)
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
DENIED = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")


def routed_item() -> Outgoing:
    out = OutputRecord("in.allow", SOURCE.key, SOURCE.value, [("filter.action", b"allow")], SOURCE.timestamp_ms)
    return Outgoing(out, SOURCE, 4, "allow")


def chain(first: Outgoing, err: KafkaError, cut: bool = True) -> list[Outgoing]:
    steps = [first]
    while (following := next_fallback(steps[-1], err, DLQ, 2000, cut)) is not None:
        steps.append(following)
    return steps


def test_a_refused_record_falls_back_to_smaller_and_smaller_dead_letters():
    routed, full, cut, omitted, keyless = chain(routed_item(), TOO_LARGE)
    assert full.out.topic == DLQ and full.out.value == SOURCE.value and full.action == "dead_letter"
    assert full.error == "publish_rejected" and full.generation == 4
    headers = dict(cut.out.headers)
    assert headers["filter.value"] == b"cut" and headers["filter.original-size"] == b"5000"
    assert headers["filter.source"] == b"in/3/77" and headers["trace"] == b"t"
    assert cut.out.size <= 2000 and SOURCE.value.startswith(cut.out.value)
    assert b"dead-letter topic refused it too" in headers["filter.reason"]
    headers = dict(omitted.out.headers)
    assert omitted.out.value is None and headers["filter.value"] == b"omitted" and "trace" not in headers
    assert omitted.out.key == SOURCE.key
    headers = dict(keyless.out.headers)
    assert keyless.out.key is None and keyless.out.value is None
    assert headers["filter.key"] == b"omitted" and headers["filter.original-key-size"] == b"3"


def test_a_key_too_large_for_the_dead_letter_topic_is_left_out_at_once():
    """Whatever the record held, the last form fits: a key alone over the limit goes too (issue 20, fault 6)."""
    source = SOURCE._replace(key=b"k" * 5000)
    out = OutputRecord("in.allow", source.key, source.value, [], None)
    steps = chain(Outgoing(out, source, 4, "allow"), TOO_LARGE)
    last = steps[-1]
    assert [dict(s.out.headers).get("filter.value") for s in steps] == [None, None, b"omitted"]
    assert last.out.key is None and last.out.size < 2000
    assert dict(last.out.headers)["filter.original-key-size"] == b"5000"


def test_a_refusal_about_the_pipeline_has_no_fallback():
    assert chain(routed_item(), DENIED) == [routed_item()]


def test_with_oversized_stop_a_dead_letter_is_not_cut():
    routed, full = chain(routed_item(), TOO_LARGE, cut=False)
    assert full.out.topic == DLQ


def test_a_dead_letter_of_a_bad_record_keeps_its_own_reason_when_cut():
    failure = DecodeFailure("invalid_json", "the value is not valid JSON")
    out = OutputRecord(DLQ, None, SOURCE.value, [("filter.error", b"invalid_json")], None)
    cut = next_fallback(Outgoing(out, SOURCE, 1, "dead_letter", failure), TOO_LARGE, DLQ, 2000, True)
    assert cut is not None and cut.error == "invalid_json"
    assert dict(cut.out.headers)["filter.reason"].startswith(b"the value is not valid JSON")


class _Listener:
    def __init__(self) -> None:
        self.acked: list[Outgoing] = []

    def acknowledged(self, items: list[Outgoing]) -> None:
        self.acked += items

    def refused(self, item: Outgoing, err: KafkaError, queued: bool = True) -> None:
        raise AssertionError(f"unexpected refusal {err}")


def test_a_full_producer_queue_keeps_outputs_in_order_without_blocking():
    """librdkafka's queue holds 2 records and no broker answers: the rest waits in the publisher."""
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:9", "logger": librdkafka_logger(), "queue.buffering.max.messages": 2}
    )
    publisher = Publisher(producer, DLQ, 1_000_000, True, Metrics(), FailureSlot())
    publisher.listen(_Listener())
    items = [routed_item() for _ in range(5)]
    for item in items:
        publisher.send(item)  # returns at once, whatever the queue holds
    publisher.poll(0)
    assert (len(producer), publisher.backlog, publisher.outstanding) == (2, 3, 5)


def test_a_record_refused_before_queueing_without_fallback_stops_the_worker():
    producer = Producer({"bootstrap.servers": "127.0.0.1:9", "logger": librdkafka_logger(), "message.max.bytes": 1000})
    failures = FailureSlot()
    publisher = Publisher(producer, DLQ, 1000, False, Metrics(), failures)
    publisher.listen(_Listener())
    publisher.send(routed_item())  # 5 KB: over the producer's limit, and so is its dead letter (no cut)
    assert failures.failure is not None and "in/3/77" in str(failures.failure)
    assert "dead-letter topic refused it too" in str(failures.failure)
