"""The ONNX Runtime backend on offline-built checkpoints: export, equality with PyTorch, locks, refusals."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from filter_worker.cli.common import load_classifier  # noqa: E402
from filter_worker.config import ConfigError, ModelSettings  # noqa: E402
from filter_worker.model import lockfile, onnx_engine, onnx_export  # noqa: E402 - after the skip
from filter_worker.model.classifier import Classifier, ModelLoadError  # noqa: E402
from filter_worker.tools.synthetic import build_model  # noqa: E402
from tests.test_cli import cli  # noqa: E402
from tests.test_lockfile import flip_byte  # noqa: E402

TEXTS = ["you idiot", "so annoying", "a wonderful day", "hello there", "word " * 3 + "idiot", "x " * 40]


@pytest.fixture(scope="module")
def exported(keyword_model, tmp_path_factory) -> tuple:
    """A copy of the keyword model with both graphs exported, and what the export reported."""
    directory = tmp_path_factory.mktemp("onnx") / "keyword"
    shutil.copytree(keyword_model, directory)
    return directory, onnx_export.export(directory)


def load(directory, **settings) -> Classifier:
    return Classifier.load(ModelSettings(name=str(directory), max_length=64, **settings))


def load_for_development(directory, **settings) -> Classifier:
    """As ``classify``, ``eval`` and the other development commands load: a missing graph is exported first."""
    return load_classifier(ModelSettings(name=str(directory), max_length=64, **settings))


def test_export_writes_both_graphs_checked_against_pytorch_and_stamped_with_the_weights(exported):
    directory, graphs = exported
    assert [(g.dtype, g.path) for g in graphs] == [
        ("float32", directory / "onnx" / "model.onnx"),
        ("int8", directory / "onnx" / "model.int8.onnx"),
    ]
    assert graphs[0].max_abs_difference <= onnx_export.TOLERANCE
    assert all(g.top_label_agreement == 1.0 for g in graphs)
    assert not [p for p in (directory / "onnx").iterdir() if p.name.startswith(".")], "no temporary file left"
    import onnxruntime

    meta = onnxruntime.InferenceSession(str(graphs[1].path)).get_modelmeta().custom_metadata_map
    weights = lockfile.directory_weights_sha256(directory)
    assert meta["filter_worker.weights_sha256"] == weights
    assert json.loads(meta["filter_worker.labels"]) == load(directory).labels


def test_onnx_classifier_has_the_torch_interface_and_its_probabilities(exported):
    directory, _ = exported
    torch_model, onnx_model = load(directory), load(directory, backend="onnx")
    assert (onnx_model.backend, onnx_model.dtype, onnx_model.device) == ("onnx", "float32", "cpu")
    assert onnx_model.labels == torch_model.labels and onnx_model.identity == torch_model.identity
    assert onnx_model.tokenize(TEXTS) == torch_model.tokenize(TEXTS)
    expected, truncated = torch_model.classify(TEXTS, max_size=4)
    probs, onnx_truncated = onnx_model.classify(TEXTS, max_size=4)
    assert onnx_truncated == truncated
    assert np.abs(probs - expected).max() <= onnx_export.TOLERANCE
    assert [onnx_model.labels[i] for i in probs[:5].argmax(axis=1)] == [
        "Very Negative",
        "Negative",
        "Very Positive",
        "Neutral",
        "Very Negative",
    ]
    one_by_one = np.vstack([onnx_model.predict([row.ids]) for row in onnx_model.tokenize(TEXTS)])
    assert np.abs(probs - one_by_one).max() <= onnx_export.TOLERANCE, "dynamic axes: padding changes nothing"


def test_int8_graph_keeps_the_keyword_labels(exported):
    directory, _ = exported
    model = load(directory, backend="onnx", dtype="int8")
    assert model.dtype == "int8"
    probs, _ = model.classify(TEXTS[:5])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert [model.labels[i] for i in probs.argmax(axis=1)] == [
        "Very Negative",
        "Negative",
        "Very Positive",
        "Neutral",
        "Very Negative",
    ]


def test_export_refuses_a_graph_that_does_not_match_and_writes_nothing(keyword_model, tmp_path, monkeypatch):
    directory = tmp_path / "model"
    shutil.copytree(keyword_model, directory)
    real = onnx_engine.OnnxEngine.logits

    def off(self, ids, mask):  # one logit off by 1: the label's score moves far beyond the tolerance
        logits = real(self, ids, mask)
        logits[:, 0] += 1.0
        return logits

    monkeypatch.setattr(onnx_engine.OnnxEngine, "logits", off)
    with pytest.raises(onnx_export.ExportError, match=r"max score difference \d\.\d\de-0[12] ") as err:
        onnx_export.export(directory)
    assert "nothing was written" in str(err.value)
    assert list((directory / "onnx").iterdir()) == []


def test_a_locked_directory_needs_the_explicit_export_which_locks_the_graphs(keyword_model, tmp_path):
    directory = tmp_path / "locked"
    shutil.copytree(keyword_model, directory)
    lockfile.lock_directory(directory, "acme/keyword", "0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(ModelLoadError, match=f"filter-worker model export {directory}") as err:
        load_for_development(directory, backend="onnx")  # never exported into a locked directory
    assert "lock file" in str(err.value) and not (directory / "onnx").exists()

    onnx_export.export(directory, ["float32"])
    lock = lockfile.read_lock(directory)
    assert "onnx/model.onnx" in {f.path for f in lock.files} and lock.model_id == "acme/keyword"
    assert lockfile.verify_directory(directory, lock) == []
    model = load(directory, backend="onnx")
    assert model.identity.startswith("acme/keyword@0123456789abcdef")

    flip_byte(directory / "onnx" / "model.onnx")
    with pytest.raises(ModelLoadError, match=r"onnx/model\.onnx: sha256 "):
        load(directory, backend="onnx")


def test_an_unlocked_graph_in_a_locked_directory_is_reported(keyword_model, tmp_path):
    directory = tmp_path / "locked"
    shutil.copytree(keyword_model, directory)
    lockfile.lock_directory(directory, "acme/keyword", "0123456789abcdef0123456789abcdef01234567")
    (directory / "onnx").mkdir()
    (directory / "onnx" / "model.onnx").write_bytes(b"a graph nobody reviewed")
    problems = lockfile.verify_directory(directory, lockfile.read_lock(directory))
    assert [str(p) for p in problems] == ["onnx/model.onnx: not in the lock file"]


def test_loading_never_exports_and_names_the_export_command(tiny_model, tmp_path):
    """The worker loads graphs; writing one into the model directory is the export's job."""
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_model, directory)
    with pytest.raises(ModelLoadError, match=f"filter-worker model export {directory}"):
        load(directory, backend="onnx")
    assert not (directory / "onnx").exists()


def test_the_development_commands_export_an_unlocked_writable_directory_at_first_use(tiny_model, tmp_path):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_model, directory)
    model = load_for_development(directory, backend="onnx", dtype="int8")
    assert (directory / "onnx" / "model.onnx").is_file() and (directory / "onnx" / "model.int8.onnx").is_file()
    written = (directory / "onnx" / "model.int8.onnx").stat().st_mtime_ns
    again = load_for_development(directory, backend="onnx", dtype="int8")
    assert (directory / "onnx" / "model.int8.onnx").stat().st_mtime_ns == written, "the graph is reused"
    assert np.allclose(model.classify(TEXTS)[0], again.classify(TEXTS)[0])


def test_a_directory_the_graph_cannot_be_written_to_says_to_export_where_it_is_writable(tiny_model, tmp_path):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_model, directory)
    (directory / "onnx").write_text("a file where the graph folder would go")
    with pytest.raises(ModelLoadError, match="cannot write the ONNX graph") as err:
        load_for_development(directory, backend="onnx")
    assert f"filter-worker model export {directory}" in str(err.value) and "\n" not in str(err.value)


def test_a_graph_exported_from_other_weights_is_refused(tiny_model, tmp_path):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_model, directory)
    onnx_export.export(directory, ["float32"])
    other = build_model(tmp_path / "other", size="tiny", seed=1)
    shutil.copyfile(other / "model.safetensors", directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match="was exported from other weights") as err:
        load(directory, backend="onnx")
    assert "export it again" in str(err.value)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"dtype": "bfloat16"}, ConfigError, "FILTER_MODEL__DTYPE=bfloat16: the onnx backend runs float32 and int8"),
        ({"dtype": "float16"}, ConfigError, "FILTER_MODEL__DTYPE=float16"),
        ({"device": "mps"}, ConfigError, "FILTER_MODEL__DEVICE=mps"),
    ],
)
def test_settings_the_onnx_backend_cannot_run_are_refused_naming_them(tiny_model, settings, error, message):
    with pytest.raises(error, match=message):
        load(tiny_model, backend="onnx", **settings)


def test_cuda_without_onnxruntime_gpu_names_the_extra(tiny_model):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(ModelLoadError, match=r"FILTER_MODEL__DEVICE=cuda .*filter-worker\[gpu\]"):
        load(tiny_model, backend="onnx", device="cuda")
    with pytest.raises(ConfigError, match="int8 graph runs on CPU only"):
        onnx_engine.resolve_dtype("int8", "cuda")


def test_a_hub_id_needs_a_local_directory_first():
    with pytest.raises(ModelLoadError, match="needs a local model directory") as err:
        Classifier.load(ModelSettings(name="acme/keyword-classifier", backend="onnx"))
    assert "filter-worker model pull acme/keyword-classifier --to DIR" in str(err.value)


def test_without_onnxruntime_the_backend_setting_is_named(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"FILTER_MODEL__BACKEND=onnx needs ONNX Runtime.*filter-worker\[onnx\]"):
        load(tiny_model, backend="onnx")


def test_model_export_command_prints_each_graph_and_refuses_a_missing_directory(tiny_model, tmp_path):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_model, directory)
    result = cli("model", "export", str(directory), "--dtype", "int8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {directory / 'onnx' / 'model.onnx'}") and "tolerance 1e-04" in lines[0]
    assert lines[1].startswith(f"wrote {directory / 'onnx' / 'model.int8.onnx'}")
    assert f"FILTER_MODEL__BACKEND=onnx FILTER_MODEL__NAME={directory}" in lines[2]
    missing = cli("model", "export", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not a directory" in missing.stderr


def test_a_graph_of_an_earlier_export_with_the_softmax_inside_is_refused(exported, tmp_path):
    """Its outputs are probabilities, not logits: scoring them again would be wrong for every head."""
    import onnx

    directory, _ = exported
    copy = tmp_path / "earlier"
    shutil.copytree(directory, copy)
    graph = onnx.load(str(copy / "onnx" / "model.onnx"))
    kept = [p for p in graph.metadata_props if p.key != onnx_engine.OUTPUT_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(copy / "onnx" / "model.onnx"))
    with pytest.raises(
        ModelLoadError, match=r"older export that puts a softmax inside the graph.*filter-worker model export"
    ):
        load(copy, backend="onnx", dtype="float32")


def test_a_graph_the_quantizer_cannot_take_is_refused_at_export_in_one_sentence(keyword_model, tmp_path, monkeypatch):
    """Refused by the command that makes the graph, never when the worker starts; float32 stays usable."""
    import onnxruntime.quantization

    def fails(*args, **kwargs):
        raise ValueError("Unsupported op: ThisFamilysAttention\n  at node 12")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", fails)
    directory = tmp_path / "model"
    shutil.copytree(keyword_model, directory)
    with pytest.raises(onnx_export.ExportError) as err:
        onnx_export.export(directory)
    assert str(err.value) == (
        "ONNX Runtime could not quantize this model's graph to int8 (Unsupported op: ThisFamilysAttention); "
        "the float32 graph is written and runs with FILTER_MODEL__DTYPE=float32"
    )
    assert sorted(p.name for p in (directory / "onnx").iterdir()) == ["model.onnx"]
    assert load(directory, backend="onnx", dtype="float32").classify(["hello"])[0].shape == (1, 5)
