"""The classify stage without Kafka or torch: what it emits, in which order, and what a stop finishes.

Its collaborators are arguments, so the model here is a scripted stand-in and ``emit`` is a list; the
delivery behaviour behind the stage is tested on the real broker in ``tests/integration``.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from filter_worker.config import load_settings
from filter_worker.model.head import Head
from filter_worker.moderation.observe import Observer
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.batching import BatchBuffer
from filter_worker.pipeline.cache import DecisionCache
from filter_worker.pipeline.decide import Decider
from filter_worker.pipeline.inference import Result
from filter_worker.pipeline.intake import Pending
from filter_worker.pipeline.records import InputRecord, Outgoing
from filter_worker.pipeline.routing import Router
from filter_worker.service.classify import Classify
from tests.clock import ManualClock

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]
HEAD = Head(tuple(LABELS), "softmax")
TP = ("in", 0)


class ScriptedModel:
    """The stage's model thread, run inline: each submitted batch is one pass, finished at once, or,
    while ``hold`` is set, when ``release`` is called; passes may also be handed in ready-made."""

    max_size = 4
    workers = 1

    def __init__(self) -> None:
        self.results: deque[Result[Pending]] = deque()
        self.submitted: list[list[int]] = []
        self.held: list[list[Pending]] = []
        self.in_flight = 0
        self.hold = False

    def has_capacity(self) -> bool:
        return self.in_flight < 2

    def submit(self, items: list[Pending]) -> None:
        self.in_flight += 1
        self.submitted.append([p.record.offset for p in items])
        if self.hold:
            self.held.append(items)
        else:
            self.results.append(_result(items))

    def release(self) -> None:
        self.hold = False
        self.results += [_result(items) for items in self.held]
        self.held.clear()

    def completed(self, timeout_s: float = 0.0) -> list[Result[Pending]]:
        done = list(self.results)
        self.results.clear()
        self.in_flight -= sum(r.last for r in done)
        return done

    def close(self) -> None:
        pass


def _result(items: list[Pending], failed: set[int] = frozenset()) -> Result[Pending]:  # type: ignore[assignment]
    probs = np.full((len(items), len(LABELS)), 0.2, dtype=np.float32)
    errors = ["RuntimeError: CUDA out of memory" if p.record.offset in failed else None for p in items]
    return Result(items, probs, errors, last=True)


def _tokenize(texts):
    return [SimpleNamespace(ids=[101, *range(len(t.split())), 102], truncated=False) for t in texts]


def _record(offset: int, text: str | None = None) -> InputRecord:
    return InputRecord("in", 0, offset, None, orjson.dumps({"text": text or f"text {offset}"}), [], None)


def _stage(model: ScriptedModel, emitted: list[list[Outgoing]], cache: DecisionCache | None = None) -> Classify:
    settings = load_settings()
    metrics = Metrics()
    return Classify(
        buffer=BatchBuffer(4, 10_000, 0.0, ManualClock()),
        inference=model,  # type: ignore[arg-type]
        tokenize=_tokenize,
        decider=Decider(Router(settings.routing, HEAD), False, settings.topics.outputs(), "m@1"),
        observer=Observer(metrics),
        metrics=metrics,
        message=settings.message,
        emit=emitted.append,
        current=lambda _tp, _generation: True,
        max_buffered=128,
        cache=cache,
    )


def offsets(emitted: list[list[Outgoing]]) -> list[list[int]]:
    return [[item.source.offset for item in group] for group in emitted]


def test_passes_decided_together_are_emitted_pass_by_pass_dead_letters_first():
    # Two passes collected in one turn. A run of dead letters must be counted as the records came out
    # of the model: pass A's decided records end the run its failure started, before pass B's count.
    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted)
    pending = {o: Pending(_record(o), 1, [101, 7, 102], False, True, False) for o in range(6)}
    model.in_flight = 2
    model.results += [
        _result([pending[o] for o in (0, 1, 2)], failed={0}),
        _result([pending[o] for o in (3, 4, 5)], failed={3, 4}),
    ]
    stage.poll()
    assert offsets(emitted) == [[0], [1, 2], [3], [4], [5]]
    assert [group[0].action for group in emitted] == ["dead_letter", "allow", "dead_letter", "dead_letter", "allow"]


@pytest.mark.parametrize(("workers", "submitted"), [(1, [[0, 1, 2, 3]]), (2, [[0, 1, 2, 3], [4, 5]])])
def test_a_model_thread_without_a_pass_takes_a_due_partial_batch(workers, submitted):
    # One model thread busy: a partial batch waits for records to fill it while the pass runs. Two
    # threads (FILTER_MODEL__STREAMS=2) with one busy: the idle one takes it now.
    model, emitted = ScriptedModel(), []
    model.workers, model.hold = workers, True
    stage = _stage(model, emitted)
    stage.submit([(_record(o), 1) for o in range(6)])
    stage.poll()
    assert model.submitted == submitted


def test_finish_classifies_the_holes_below_a_decided_record_and_leaves_the_rest_buffered():
    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted)
    model.hold = True
    stage.submit([(_record(o), 1) for o in range(10)])
    stage.poll()  # offsets 0-3 and 4-7 go to the model (held), 8 and 9 stay buffered
    assert model.submitted == [[0, 1, 2, 3], [4, 5, 6, 7]] and stage.buffered == 2
    model.release()
    clock = ManualClock()
    # Offset 9 is the highest decided of its partition (say, answered from a cache): 8 is a hole.
    assert stage.finish({TP}, clock() + 5, clock, lambda _tp, buffered: 9 if 9 not in buffered else None)
    assert sorted(o for group in offsets(emitted) for o in group) == list(range(8))
    # With nothing decided above them, 8 and 9 are not holes: they stay buffered, to be forgotten.
    assert stage.buffered == 2
    assert stage.forget({TP}) == 2 and stage.empty()


def test_finish_classifies_a_hole_below_a_record_in_the_model():
    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted)
    stage.submit([(_record(o), 1) for o in range(6)])
    stage._buffer.extract(lambda p: p.record.offset == 5)  # noqa: SLF001 - offset 5 went to the model meanwhile
    clock = ManualClock()
    assert stage.finish({TP}, clock() + 5, clock, lambda _tp, _buffered: 5)
    assert sorted(o for group in offsets(emitted) for o in group) == [0, 1, 2, 3, 4]


def test_finish_answers_no_buffered_repeat_from_the_cache():
    """A repeat answered inside a stop would be published above records the stop abandons (issue 20, fault 4)."""
    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted, cache=DecisionCache(100))
    model.hold = True
    records = [_record(o, "the campaign" if o in (2, 9) else None) for o in range(10)]
    stage.submit([(r, 1) for r in records])
    stage.poll()  # 0-3 and 4-7 in the model; 8 and 9 buffered, 9 a repeat of 2's text
    model.release()
    clock = ManualClock()
    # Nothing decided above 8 and 9: no holes. The pass ends inside the stop and fills the cache.
    assert stage.finish({TP}, clock() + 5, clock, lambda _tp, _buffered: 7)
    assert 9 not in {o for group in offsets(emitted) for o in group}
    assert stage.buffered == 2
    stage.poll()
    stage.poll()  # in the running loop it is decided as usual
    assert 9 in {o for group in offsets(emitted) for o in group}


def test_finish_stops_at_its_deadline_and_puts_unclassified_holes_back():
    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted)
    model.hold = True
    stage.submit([(_record(o), 1) for o in range(12)])
    clock = ManualClock()
    done = stage.finish({TP}, clock() - 1, clock, lambda _tp, _buffered: 20)  # the deadline has passed
    assert not done and stage.buffered == 12 and emitted == []
