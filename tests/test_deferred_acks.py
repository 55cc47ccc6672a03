"""Which dead letters' acknowledgements the worker holds back, whatever order delivery reports arrive in.

The order of delivery reports relative to routing is librdkafka's and the broker's to choose, and a
real broker cannot be made to pick one on cue; this checks the worker's own bookkeeping for the order
that once left a dead letter uncommitted (seen once in the suite, against the real broker).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from filter_worker.config import load_settings
from filter_worker.model import Classifier
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import InputRecord
from filter_worker.worker import Worker

TP = ("in", 0)


class _HeldDeliveries:
    """Stands in for the producer: keeps each delivery callback, for the test to fire when it chooses."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any, Any], None]] = []

    def produce(self, on_delivery: Callable[[Any, Any], None], **_record: object) -> None:
        self.callbacks.append(on_delivery)


def _probs(worker: Worker) -> np.ndarray:
    labels = worker._classifier.labels  # noqa: SLF001
    return np.full(len(labels), 1 / len(labels), dtype=np.float32)


def _worker(keyword_model) -> tuple[Worker, _HeldDeliveries, int, list[InputRecord]]:
    settings = load_settings(model={"name": str(keyword_model)})
    worker = Worker(settings, Classifier.load(settings.model))
    producer = _HeldDeliveries()
    worker._producer = producer  # type: ignore[assignment]  # noqa: SLF001
    tracker = worker._tracker  # noqa: SLF001
    generation = tracker.assign(TP)
    records = [InputRecord(*TP, offset, None, b"x", [], None) for offset in range(3)]
    for record in records:
        tracker.track(TP, record.offset)
    return worker, producer, generation, records


def test_a_dead_letter_is_acknowledged_once_its_run_ends_even_if_a_later_run_began_first(keyword_model):
    worker, producer, generation, records = _worker(keyword_model)
    failure = DecodeFailure("invalid_json", "not JSON")
    worker._dead_letter(records[0], failure, generation)  # noqa: SLF001
    worker._publish_decision(records[1], generation, _probs(worker), False, None)  # noqa: SLF001
    worker._dead_letter(records[2], failure, generation)  # noqa: SLF001  # a new run begins
    for delivered in producer.callbacks:  # all three reports arrive only now
        delivered(None, None)
    # Offset 0's run ended with offset 1; offset 2's run goes on, so it alone is held back.
    assert worker._tracker.committable() == {TP: 2}  # noqa: SLF001


def test_a_dead_letter_of_a_run_still_going_on_is_held_back(keyword_model):
    worker, producer, generation, records = _worker(keyword_model)
    failure = DecodeFailure("invalid_json", "not JSON")
    worker._publish_decision(records[0], generation, _probs(worker), False, None)  # noqa: SLF001
    worker._dead_letter(records[1], failure, generation)  # noqa: SLF001
    for delivered in producer.callbacks:
        delivered(None, None)
    assert worker._tracker.committable() == {TP: 1}  # noqa: SLF001
    worker._publish_decision(records[2], generation, _probs(worker), False, None)  # noqa: SLF001  # run ends
    producer.callbacks[-1](None, None)
    assert worker._tracker.committable() == {TP: 3}  # noqa: SLF001
