"""The worker's routing step without Kafka: what reaches the dead-letter gate, and in which order.

Kafka is not under test here: the committer and the gate are the worker's seams, replaced by ones
that record what they are handed. The delivery behaviour behind them is tested on the real broker in
``tests/integration``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from filter_worker.config import load_settings
from filter_worker.pipeline.inference import Result
from filter_worker.pipeline.intake import Pending
from filter_worker.pipeline.records import InputRecord, Outgoing
from filter_worker.worker import Worker, _Running

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]


class _Current:
    """Every partition is still owned by the generation its records carry."""

    def is_current(self, _tp: tuple[str, int], _generation: int) -> bool:
        return True


class _RecordingGate:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def submit(self, item: Outgoing) -> None:
        self.calls.append(("one", [item.source.offset]))

    def submit_many(self, items: list[Outgoing]) -> None:
        self.calls.append(("many", [item.source.offset for item in items]))


def _pending(offset: int) -> Pending:
    record = InputRecord("in", 0, offset, None, b'{"text": "x"}', [], None)
    return Pending(record, 0, [101, 7, 102], False, None, None)


def _result(offsets: list[int], failed: set[int]) -> Result[Pending]:
    probs = np.full((len(offsets), len(LABELS)), 0.2, dtype=np.float32)
    errors = ["RuntimeError: CUDA out of memory" if o in failed else None for o in offsets]
    return Result([_pending(o) for o in offsets], probs, errors, last=True)


def _worker(gate: _RecordingGate) -> Worker:
    classifier: Any = SimpleNamespace(labels=LABELS, identity="m@1")
    worker = Worker(load_settings(), classifier)
    worker._running = _Running(None, None, _Current(), gate, None)  # type: ignore[arg-type]
    return worker


def test_passes_decided_together_reach_the_gate_pass_by_pass_dead_letters_first():
    # Two passes collected in one turn. A run of dead letters must be counted as the records came out
    # of the model: pass A's decided records end the run its failure started, before pass B's count.
    gate = _RecordingGate()
    worker = _worker(gate)
    worker._collected.extend([_result([0, 1, 2], failed={0}), _result([3, 4, 5], failed={3, 4})])
    worker._route_collected()
    assert gate.calls == [("one", [0]), ("many", [1, 2]), ("one", [3]), ("one", [4]), ("many", [5])]
