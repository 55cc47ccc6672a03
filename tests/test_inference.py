from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from filter_worker.pipeline import inference
from filter_worker.pipeline.inference import InferenceThread, infer_resilient


def fake_predict(poison: set[int], calls: list[int]):
    """Probabilities from the first token; fails any batch containing a poison token, like an OOM would."""

    def predict(rows):
        calls.append(len(rows))
        if any(row[0] in poison for row in rows):
            raise RuntimeError("CUDA out of memory")
        out = np.zeros((len(rows), 2), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = (row[0] / 100, 1 - row[0] / 100)
        return out

    return predict


def test_failing_batch_is_halved_until_only_the_bad_record_fails():
    calls: list[int] = []
    rows = [[i] for i in range(8)]
    probs, errors = infer_resilient(fake_predict({5}, calls), rows)
    assert errors[5] == "RuntimeError: CUDA out of memory"
    assert [e for i, e in enumerate(errors) if i != 5] == [None] * 7
    assert np.isnan(probs[5]).all()
    assert np.allclose(probs[:5, 0], [0, 0.01, 0.02, 0.03, 0.04])
    assert calls[0] == 8 and calls.count(1) >= 1 and max(calls[1:]) <= 4


def test_a_pass_leaves_no_reference_cycle_for_the_garbage_collector():
    # The worker raises the collector's threshold because the record path makes no cycles; a pass
    # that made one kept its token rows alive until a collection found them.
    gc.collect()
    gc.disable()
    try:
        for poison in (set(), {5}):
            probs, errors = infer_resilient(fake_predict(poison, []), [[i] for i in range(8)])
            del probs, errors
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_each_length_sorted_pass_is_handed_back_and_the_last_closes_the_batch():
    calls: list[int] = []
    passes: list[tuple[int, int, int]] = []
    thread: InferenceThread[list[int]] = InferenceThread(
        fake_predict(set(), calls),
        lambda r: r,
        max_size=2,
        max_tokens=100,
        observe=lambda rows, padded, real, _s: passes.append((rows, padded, real)),
    )
    items = [[30, 1, 1], [10], [20, 1], [40]]
    thread.submit(items)
    results = []
    while thread.in_flight:
        results += thread.completed(timeout_s=5)
    thread.close()
    assert calls == [2, 2]
    short, long = results
    assert short.items == [[10], [40]] and not short.last  # the short rows' pass comes back first
    assert np.allclose(short.probs[:, 0], [0.1, 0.4])
    assert long.items == [[30, 1, 1], [20, 1]] and long.last
    assert np.allclose(long.probs[:, 0], [0.3, 0.2])
    assert passes == [(2, 2 * 1, 2), (2, 2 * 3, 5)]  # (rows, padded tokens, real tokens) per pass


def test_thread_crash_surfaces_in_the_kafka_loop():
    def broken(_rows):
        raise SystemExit("boom")

    thread: InferenceThread[list[int]] = InferenceThread(broken, lambda r: r, max_size=4, max_tokens=100)
    thread.submit([[1]])
    try:
        list(thread.completed(timeout_s=5))
    except SystemExit as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the crash was swallowed")
    finally:
        thread.close()


def test_the_model_thread_gets_the_gil_back_quickly_between_ops():
    """Eager PyTorch takes the GIL back between its ops; Python's 5 ms default switch interval made each
    take-back wait behind the Kafka thread (docs/performance.md). A shorter interval an operator set stays."""
    import sys

    from filter_worker.pipeline.inference import GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        InferenceThread(fake_predict(set(), []), lambda r: r, max_size=2, max_tokens=100).close()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S, rel=0.02)
        sys.setswitchinterval(0.0001)
        InferenceThread(fake_predict(set(), []), lambda r: r, max_size=2, max_tokens=100).close()
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.02)
    finally:
        sys.setswitchinterval(before)


def test_with_two_workers_two_batches_are_in_the_model_at_once():
    # Each pass waits until another is inside the model too: one worker at a time would never get there.
    both_inside = threading.Barrier(2, timeout=5)

    def predict(rows):
        both_inside.wait()
        return np.full((len(rows), 2), 0.5, dtype=np.float32)

    thread: InferenceThread[list[int]] = InferenceThread(predict, lambda r: r, max_size=4, max_tokens=100, workers=2)
    try:
        assert thread.has_capacity()
        thread.submit([[1], [2]])
        thread.submit([[3]])
        results = []
        while thread.in_flight:
            results += thread.completed(timeout_s=10)
        assert sorted(r[0] for result in results for r in result.items) == [1, 2, 3]
        assert all(result.probs is not None and result.errors == [None] * len(result.items) for result in results)
    finally:
        thread.close()
    assert not any(t.name == "inference" and t.is_alive() for t in threading.enumerate()), "close stops every worker"


def test_close_waits_for_every_model_thread_within_one_deadline(monkeypatch):
    monkeypatch.setattr(inference, "_CLOSE_WAIT_S", 0.5)
    release = threading.Event()

    def stuck(rows):
        release.wait(30)
        return np.zeros((len(rows), 2), dtype=np.float32)

    thread: InferenceThread[list[int]] = InferenceThread(stuck, lambda r: r, max_size=4, max_tokens=100, workers=3)
    for n in range(3):
        thread.submit([[n]])
    started = time.monotonic()
    thread.close()  # three passes stuck: one deadline for all of them, not one each
    waited = time.monotonic() - started
    release.set()
    assert waited < 1.4, f"close waited {waited:.1f}s for three stuck threads with a 0.5 s deadline"
