"""FILTER_MODEL__BACKEND=openvino: the float32 module converted in memory, at float32 and bfloat16.

Scores are checked against eager PyTorch float32 on the same weights, loaded through the users' code
path (``Classifier.load``) and as auto derives them (``at_precision``); what OpenVINO cannot run is
refused with one sentence naming the setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from filter_worker.config import ConfigError, ModelSettings, RoutingSettings
from filter_worker.model import openvino_engine, precision
from filter_worker.model.classifier import Classifier

pytest.importorskip("openvino", reason="the openvino extra is not installed")

AMX = frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2"})
TEXTS = ["you idiot", "a wonderful day, thanks", "hello", "BUY NOW cheap pills " * 20, "ok"]


@pytest.fixture(scope="module")
def float32(tiny_model) -> Classifier:
    return Classifier.load(ModelSettings(name=str(tiny_model), dtype="float32"))


def _scores(classifier: Classifier) -> np.ndarray:
    return classifier.classify(TEXTS)[0]


def test_openvino_float32_scores_as_torch_float32_does(tiny_model, float32):
    loaded = Classifier.load(ModelSettings(name=str(tiny_model), backend="openvino", dtype="float32"))
    assert (loaded.backend, loaded.dtype, loaded.identity) == ("openvino", "float32", float32.identity)
    np.testing.assert_allclose(_scores(loaded), _scores(float32), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_openvino_engine_derived_from_the_loaded_module_is_the_one_a_load_gives(tiny_model, float32, dtype):
    derived = float32.at_precision(dtype, "openvino")
    loaded = Classifier.load(ModelSettings(name=str(tiny_model), backend="openvino", dtype=dtype))
    assert (derived.backend, derived.dtype) == ("openvino", dtype)
    np.testing.assert_allclose(_scores(derived), _scores(loaded), atol=1e-6)
    # bfloat16 keeps 8 bits of mantissa: close to float32, and the top label holds on these texts.
    np.testing.assert_allclose(_scores(derived), _scores(float32), atol=0.02)
    assert (_scores(derived).argmax(axis=1) == _scores(float32).argmax(axis=1)).all()
    assert float32.backend == "torch" and float32.dtype == "float32", "deriving leaves the reference as it was"


@pytest.mark.parametrize(
    ("update", "setting"),
    [
        ({"dtype": "int8"}, "FILTER_MODEL__DTYPE=int8"),
        ({"dtype": "float16"}, "FILTER_MODEL__DTYPE=float16"),
        ({"device": "cuda"}, "FILTER_MODEL__DEVICE=cuda"),
    ],
)
def test_what_openvino_does_not_run_is_refused_naming_the_setting(tiny_model, update, setting):
    with pytest.raises(ConfigError) as refused:
        Classifier.load(ModelSettings(name=str(tiny_model), backend="openvino", **update))
    message = str(refused.value)
    assert message.startswith(setting) and "openvino" in message and "\n" not in message


@pytest.fixture
def two_threads():
    """One torch (and OpenVINO) thread per stream of two, whatever this machine's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def test_two_streams_run_two_passes_at_once_and_score_as_one_stream_does(tiny_model, float32, two_threads):
    streams = Classifier.load(ModelSettings(name=str(tiny_model), backend="openvino", dtype="float32", streams=2))
    assert streams.streams == 2 and float32.streams == 1
    rows = [t.ids for t in float32.tokenize(TEXTS)]
    batches = [rows[:2], rows[2:4], rows[4:]]
    # Every pass waits until another is inside the engine too: one at a time, none would get past.
    both_inside = threading.Barrier(2, timeout=10)
    logits = streams.engine.logits

    def together(ids, mask):
        if len(ids) == 2:  # the two batches of two rows; the last one runs alone
            both_inside.wait()
        return logits(ids, mask)

    streams.engine.logits = together  # type: ignore[method-assign]
    scores = streams.predict_many(batches)
    for got, batch in zip(scores, batches, strict=True):
        np.testing.assert_allclose(got, float32.predict(batch), atol=1e-5)
    del streams.engine.logits
    for _ in range(3):  # new calling threads every time: the engine's infer requests stay one per stream
        streams.predict_many(batches)
    assert streams.engine._requests.qsize() == 2  # type: ignore[attr-defined]


def test_auto_streams_are_two_where_the_model_has_two_threads_and_a_number_is_kept():
    assert [openvino_engine.resolve_streams("auto", threads) for threads in (1, 2, 16)] == [1, 2, 2]
    assert openvino_engine.resolve_streams(3, 4) == 3
    with pytest.raises(ConfigError, match="FILTER_MODEL__STREAMS=3 is more than the 2 threads"):
        openvino_engine.resolve_streams(3, 2)


def test_by_default_the_openvino_engine_runs_two_streams_and_torch_one(tiny_model, two_threads):
    assert ModelSettings(name=str(tiny_model)).streams == "auto"
    openvino = Classifier.load(ModelSettings(name=str(tiny_model), backend="openvino", dtype="float32"))
    torch_engine = Classifier.load(ModelSettings(name=str(tiny_model), backend="torch", dtype="float32"))
    assert (openvino.streams, torch_engine.streams) == (2, 1)


def test_more_streams_than_threads_is_refused_naming_the_setting(tiny_model):
    with pytest.raises(ConfigError) as refused:
        Classifier.load(ModelSettings(name=str(tiny_model), backend="openvino", dtype="float32", streams=64))
    message = str(refused.value)
    assert message.startswith("FILTER_MODEL__STREAMS=64 is more than the") and "\n" not in message


def test_without_openvino_installed_the_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    assert openvino_engine.available() is False
    with pytest.raises(ConfigError, match=r"pip install 'filter-worker\[openvino\]'"):
        openvino_engine.runtime()


def test_an_explicit_openvino_backend_without_openvino_stops_before_loading_anything(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded although the backend cannot run")

    monkeypatch.setattr(precision.Classifier, "load", no_loading)
    with pytest.raises(ConfigError, match=r"^FILTER_MODEL__BACKEND=openvino needs OpenVINO"):
        precision.load(ModelSettings(name=str(tiny_model), backend="openvino"), RoutingSettings(), 32)


def test_auto_measures_openvino_bfloat16_and_an_explicit_openvino_backend_keeps_to_it(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setattr(precision, "device_capabilities", lambda device: AMX)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # the tiny model is too small for a clear winner
    cache = str(tmp_path / "cache")
    with capture_logs() as logs:
        precision.load(ModelSettings(name=str(tiny_model), precision_cache_dir=cache), RoutingSettings(), 32)
    chosen = next(entry for entry in logs if entry["event"] == "precision chosen")
    row = next(row for row in chosen["candidates"] if row["engine"] == "openvino bfloat16")
    assert row["agrees"] and row["max_score_difference"] < 0.02

    with capture_logs() as logs:
        loaded = precision.load(
            ModelSettings(name=str(tiny_model), backend="openvino", precision_cache_dir=cache), RoutingSettings(), 32
        )
    chosen = next(entry for entry in logs if entry["event"] == "precision chosen")
    assert [row["engine"] for row in chosen["candidates"]] == ["openvino float32", "openvino bfloat16"]
    assert loaded.classifier.backend == "openvino" and chosen["engine"].startswith("openvino ")


def test_converting_sends_no_telemetry_and_writes_nothing_to_home(tiny_model, tmp_path):
    # A fresh interpreter: in this one OpenVINO is already imported. CI variables removed, since the
    # telemetry package stays quiet in CI by itself.
    script = (
        "import sys\n"
        "from filter_worker.config import ModelSettings\n"
        "from filter_worker.model.classifier import Classifier\n"
        f"Classifier.load(ModelSettings(name={str(tiny_model)!r}, backend='openvino', dtype='float32'))\n"
        "print('telemetry imported:', sys.modules.get('openvino_telemetry') is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "telemetry imported: False" in done.stdout
    assert not (tmp_path / "intel").exists(), sorted(p.name for p in (tmp_path / "intel").iterdir())
