"""The model wrapper, on offline-built checkpoints loaded through the same path as hub models."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from filter_worker.config import ConfigError, ModelSettings
from filter_worker.model.classifier import Classifier, ModelLoadError, resolve_dtype


@pytest.fixture(scope="module")
def model(keyword_model) -> Classifier:
    return Classifier.load(ModelSettings(name=str(keyword_model), max_length=32))


def test_labels_and_identity_come_from_the_checkpoint(model, keyword_model):
    assert model.labels == ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]
    weights = hashlib.sha256((keyword_model / "model.safetensors").read_bytes()).hexdigest()
    assert model.weights_sha256 == weights
    assert model.identity == f"{keyword_model}@local#sha256:{weights[:16]}"
    assert model.device == "cpu"


def test_probabilities_follow_the_keywords_and_batching_does_not_change_them(model):
    texts = ["you idiot", "so annoying", "a wonderful day", "hello there", "word " * 3 + "idiot"]
    probs, truncated = model.classify(texts)
    assert probs.shape == (5, 5) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [model.labels[i] for i in probs.argmax(axis=1)] == [
        "Very Negative",
        "Negative",
        "Very Positive",
        "Neutral",
        "Very Negative",
    ]
    one_by_one = np.vstack([model.classify([t], max_size=1)[0] for t in texts])
    assert np.allclose(probs, one_by_one, atol=1e-5), "padding must not change results"
    assert truncated == [False] * 5


def test_long_text_is_truncated_and_flagged(model):
    ids = model.tokenize(["idiot " * 100, "idiot " * 5, "x" * 10_000])
    assert [len(t.ids) for t in ids][:2] == [32, 7]
    assert [t.truncated for t in ids] == [True, False, True]


def test_pickle_only_checkpoints_are_refused(keyword_model, tmp_path):
    copy = tmp_path / "pickled"
    shutil.copytree(keyword_model, copy)
    from safetensors.torch import load_file

    state = load_file(copy / "model.safetensors")
    torch.save(state, copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        Classifier.load(ModelSettings(name=str(copy)))


def test_unreachable_hub_gives_one_actionable_sentence(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelLoadError) as err:
        Classifier.load(ModelSettings(name="nobody/no-such-model-offline"))
    message = str(err.value)
    assert "--model DIR" in message and "FILTER_MODEL__NAME" in message
    assert "\n" not in message


def test_cuda_request_without_a_gpu_is_a_clear_error(keyword_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="FILTER_MODEL__DEVICE"):
        Classifier.load(ModelSettings(name=str(keyword_model), device="cuda"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_cpu_precisions_load_and_give_probabilities(tiny_model, dtype):
    classifier = Classifier.load(ModelSettings(name=str(tiny_model), dtype=dtype))
    assert classifier.dtype == dtype and classifier.device == "cpu"
    probs, _ = classifier.classify(["hello there", "a much longer message " * 5])
    assert probs.shape == (2, 5) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)


def test_auto_precision_is_float32_on_cpu_and_float16_on_cuda():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda:0") == "float16"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16"


@pytest.mark.parametrize(
    ("dtype", "device", "reason"),
    [("int8", "cuda", "CPU only"), ("int8", "mps", "CPU only"), ("float16", "cpu", "bfloat16 or int8")],
)
def test_precisions_a_device_cannot_run_are_refused_naming_the_setting(dtype, device, reason):
    with pytest.raises(ConfigError) as info:
        resolve_dtype(dtype, device)
    assert f"FILTER_MODEL__DTYPE={dtype}" in str(info.value) and reason in str(info.value)


def test_float16_on_cpu_is_refused_at_load(tiny_model):
    with pytest.raises(ConfigError, match="FILTER_MODEL__DTYPE=float16"):
        Classifier.load(ModelSettings(name=str(tiny_model), dtype="float16", device="cpu"))


def test_a_one_stream_engine_runs_one_pass_at_a_time_whatever_threads_call(model):
    # What a rule reload's fallback leaves a worker started with FILTER_MODEL__STREAMS=2: two model
    # threads and a torch engine. Two eager passes at once would each run on every intra-op thread.
    inside, most = [0], [0]
    lock = threading.Lock()
    logits = model.engine.logits

    def counted(ids, mask):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)  # long enough for the other thread to arrive while this pass runs
        try:
            return logits(ids, mask)
        finally:
            with lock:
                inside[0] -= 1

    model.engine.logits = counted
    try:
        rows = [t.ids for t in model.tokenize(["you idiot", "a fine day"])]
        threads = [threading.Thread(target=lambda: [model.predict(rows) for _ in range(10)]) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        del model.engine.logits
    assert model.streams == 1 and most[0] == 1
