from __future__ import annotations

import numpy as np

from filter_worker.inference import InferenceThread, infer_resilient


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


def test_thread_returns_results_in_input_order_with_length_sorted_passes():
    calls: list[int] = []
    thread: InferenceThread[list[int]] = InferenceThread(
        fake_predict(set(), calls), lambda r: r, max_size=2, max_tokens=100
    )
    items = [[30, 1, 1], [10], [20, 1], [40]]
    thread.submit(items)
    results = list(thread.completed(timeout_s=5))
    thread.close()
    assert len(results) == 1 and thread.in_flight == 0
    result = results[0]
    assert result.items == items
    assert np.allclose(result.probs[:, 0], [0.3, 0.1, 0.2, 0.4])
    assert calls == [2, 2]
    assert result.real_tokens == 7 and result.padded_tokens == 2 * 1 + 2 * 3


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
