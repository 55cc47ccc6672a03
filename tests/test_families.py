"""Every common family scores as transformers' pipeline scores it: both backends, float32 and int8.

The stand-ins (``synthetic.build_family``) carry public models' label sets and heads: multi-label
(toxic-bert's six labels, a nine-category moderation head), single-label, a single output, unnamed
outputs; their tokenizers are each kind public models use (WordPiece, byte-level BPE, SentencePiece
unigram). Random weights: no score means anything, which makes any difference from the pipeline show.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest

from filter_worker.config import ModelSettings
from filter_worker.model.classifier import Classifier
from filter_worker.model.samples import message_mix
from filter_worker.tools.synthetic import FAMILIES, build_family
from tests.pipeline_reference import pipeline_scores

# Both run float32 over the same tokens; padding in the worker's batches and fused kernels reorder the
# arithmetic only (the largest difference measured over these families was 2e-6).
FLOAT32_TOLERANCE = 1e-5
# ONNX Runtime's int8 against the pipeline's float32. Random weights drawn wide quantize worse than a
# trained model's: the largest difference measured on these stand-ins was 0.19 (DeBERTa-v2).
INT8_TOLERANCE = 0.25
# Texts of every length the samples have, a long one cut at max_length, and batches with padding.
TEXTS = [*message_mix(23, seed=5, long_ratio=0.1), "spam " * 700]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


def stand_in(stand_ins: dict[str, Path], family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The family's stand-in, built once per module."""
    from transformers import CONFIG_MAPPING

    if FAMILIES[family].model_type not in CONFIG_MAPPING:
        pytest.skip(f"the installed transformers has no {FAMILIES[family].model_type}")
    if family not in stand_ins:
        stand_ins[family] = build_family(tmp_path_factory.mktemp(family), family)
    return stand_ins[family]


def load(directory: Path, **settings: str) -> Classifier:
    return Classifier.load(ModelSettings(name=str(directory), device="cpu", verify=False, **settings))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_scores_equal_the_pipeline_in_float32_and_int8(family, stand_ins, tmp_path_factory):
    directory = stand_in(stand_ins, family, tmp_path_factory)
    expected = pipeline_scores(directory, TEXTS)
    got, truncated = load(directory, dtype="float32").classify(TEXTS, max_size=8)
    assert truncated[-1] and not truncated[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=FLOAT32_TOLERANCE)
    int8 = load(directory, dtype="int8")
    # One text a pass, as the pipeline runs: dynamic quantization scales activations per batch, so int8
    # scores move with what else is in the batch. The int8 module is what the pipeline runs here too:
    # only the wrapping around it (tokens, score function, labels) may differ, and does not.
    scores, _ = int8.classify(TEXTS, max_size=1)
    np.testing.assert_allclose(scores, pipeline_scores(directory, TEXTS, int8.engine.module), rtol=0, atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_graphs_score_as_the_pipeline(family, stand_ins, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from filter_worker.model import onnx_export

    directory = tmp_path_factory.mktemp(f"{family}-onnx") / family
    shutil.copytree(stand_in(stand_ins, family, tmp_path_factory), directory)
    graphs = onnx_export.export(directory)
    assert [g.dtype for g in graphs] == ["float32", "int8"]
    expected = pipeline_scores(directory, TEXTS)
    float32, _ = load(directory, backend="onnx", dtype="float32").classify(TEXTS, max_size=8)
    np.testing.assert_allclose(float32, expected, rtol=0, atol=FLOAT32_TOLERANCE)
    int8, _ = load(directory, backend="onnx", dtype="int8").classify(TEXTS, max_size=8)
    assert float(np.abs(int8 - expected).max()) <= INT8_TOLERANCE


def test_the_stand_ins_carry_the_heads_of_the_issue():
    """Multi-label where the public model is, a single output, and unnamed outputs."""
    heads = {name: (f.labels, f.problem_type) for name, f in FAMILIES.items()}
    assert heads["bert"] == (
        ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"),
        "multi_label_classification",
    )
    assert heads["deberta-v2"][1] == "multi_label_classification" and len(heads["deberta-v2"][0] or ()) == 9
    assert heads["modernbert"][0] == ("spam",) and heads["bert-unnamed"][0] is None
    kinds = {f.tokenizer for f in FAMILIES.values()}
    assert kinds == {"wordpiece", "bpe", "unigram"}


def test_a_model_without_label_names_is_refused_until_named(tmp_path):
    """One sentence and exit code 2 before any text is classified; named outputs then route by name."""
    from tests.test_cli import cli

    directory = build_family(tmp_path / "unnamed", "bert-unnamed")
    rules = '[{"action": "drop", "labels": ["LABEL_1"], "min_score": 0.5}]'
    refused = cli("classify", "hello", "--model", str(directory), FILTER_ROUTING__RULES=rules)
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "FILTER_ROUTING__RULES: the model's outputs have no names (LABEL_0, LABEL_1), so no rule can say what "
            "it routes; name them in output order with FILTER_MODEL__LABELS (for example "
            "FILTER_MODEL__LABELS=name0,name1) and write the rules with those names"
        )
    )
    named_rules = rules.replace("LABEL_1", "spam")
    named = cli(
        "classify",
        "hello",
        "--model",
        str(directory),
        FILTER_ROUTING__RULES=named_rules,
        FILTER_MODEL__LABELS="ham,spam",
    )
    assert named.returncode == 0, named.stderr
    assert set(orjson.loads(named.stdout)["scores"]) == {"ham", "spam"}


def test_classify_on_a_synthesized_multi_label_stand_in_gives_the_pipeline_scores(tmp_path):
    """The issue's first case: toxic-bert's labels, multi-label, through ``model synth`` and ``classify``."""
    from tests.test_cli import cli

    directory = tmp_path / "toxic"
    assert cli("model", "synth", str(directory), "--kind", "bert").returncode == 0
    text = "You are a worthless idiot and everyone hates you."
    rules = '[{"action": "drop", "labels": ["threat", "severe_toxic"], "min_score": 0.5, "name": "violent"}]'
    result = cli("classify", text, "--model", str(directory), FILTER_ROUTING__RULES=rules)
    assert result.returncode == 0, result.stderr
    line = orjson.loads(result.stdout)
    expected = dict(zip(FAMILIES["bert"].labels or (), pipeline_scores(directory, [text])[0], strict=True))
    assert line["scores"] == pytest.approx(expected, abs=1e-6)
    assert line["rule_scores"]["violent"] == pytest.approx(max(expected["threat"], expected["severe_toxic"]), abs=1e-6)


def test_the_override_scores_a_multi_label_model_whose_config_does_not_say_so(tmp_path):
    """Many multi-label models leave problem_type unset: their config implies a softmax, the card a sigmoid."""
    from transformers import pipeline

    directory = build_family(tmp_path / "unset", "bert", problem_type=None)
    assert load(directory).head.function == "softmax"
    model = load(directory, score_function="sigmoid")
    classify = pipeline("text-classification", model=str(directory), top_k=None, device="cpu")
    rows = classify(TEXTS[:6], function_to_apply="sigmoid", truncation=True)
    labels = list(FAMILIES["bert"].labels or ())
    expected = np.array([[{r["label"]: r["score"] for r in row}[label] for label in labels] for row in rows])
    got, _ = model.classify(TEXTS[:6])
    np.testing.assert_allclose(got, expected, rtol=0, atol=FLOAT32_TOLERANCE)
    # The same weights now give other scores: verdicts and drift references must not mix the two.
    assert model.identity.endswith("+sigmoid") and not load(directory).identity.endswith("+sigmoid")
