"""The model wrapper, on offline-built checkpoints loaded through the same path as hub models."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from filter_worker.config import ModelSettings
from filter_worker.model import Classifier, ModelLoadError


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
