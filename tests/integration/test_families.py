"""End to end through the broker: every family's stand-in routes as transformers' pipeline scores it.

The expected action of each record is computed here from ``pipeline("text-classification",
top_k=None)``'s scores and the documented meaning of a rule (the highest of its labels for a
multi-label or single-output head, their sum for a single-label head), not from the worker's own
code. Thresholds sit at the pipeline's median and lower quartile of the rule's score, as the issue
tried them, so about half of the records are dropped and a quarter quarantined: any other score
function or rule meaning sends many records to another topic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from filter_worker.config import ModelSettings, Settings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.classifier import Classifier
from filter_worker.model.samples import message_mix
from filter_worker.tools.synthetic import FAMILIES, build_family
from tests.integration.kafka_helpers import create_topics, produce, read_outputs, worker_settings
from tests.integration.worker_thread import worker_thread
from tests.pipeline_reference import pipeline_scores

TEXTS = message_mix(160, seed=17, long_ratio=0.05)
# The rule's labels per family: two where the head has them (so "sum" and "max" differ), and names for
# the outputs of the model that has none (FILTER_MODEL__LABELS).
RULE_LABELS = {
    "distilbert": ["Very Negative", "Negative"],
    "bert": ["threat", "insult"],
    "bert-unnamed": ["spam"],
    "roberta": ["toxic"],
    "xlm-roberta": ["negative", "neutral"],
    "deberta-v2": ["S", "H"],
    "electra": ["spam"],
    "modernbert": ["spam"],
}
LABEL_MAP = {"bert-unnamed": ["ham", "spam"]}


def threshold_near(scores: np.ndarray, quantile: float) -> float:
    """A threshold between two neighbouring scores near ``quantile``: the midpoint of the widest gap among
    the 20 around it, so float32 rounding (about 1e-6) cannot move a record across it."""
    ordered = np.sort(scores)
    middle = int(len(ordered) * quantile)
    window = np.arange(max(middle - 10, 1), min(middle + 10, len(ordered)))
    widest = window[np.argmax(ordered[window] - ordered[window - 1])]
    assert ordered[widest] - ordered[widest - 1] > 1e-4, "no gap wide enough to judge the routing by"
    return float((ordered[widest] + ordered[widest - 1]) / 2)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_worker_routes_as_the_pipeline_scores(family, backend, stand_ins, bootstrap_servers, tmp_path_factory):
    from transformers import CONFIG_MAPPING

    if FAMILIES[family].model_type not in CONFIG_MAPPING:
        pytest.skip(f"the installed transformers has no {FAMILIES[family].model_type}")
    if family not in stand_ins:
        directory = build_family(tmp_path_factory.mktemp(family) / "model", family)
        from filter_worker.model import onnx_export

        onnx_export.export(directory, ["float32"])
        stand_ins[family] = directory
    directory = stand_ins[family]
    reference = pipeline_scores(directory, TEXTS)
    config = FAMILIES[family]
    names = LABEL_MAP.get(family) or list(config.labels or ())
    columns = [names.index(label) for label in RULE_LABELS[family]]
    independent = config.problem_type == "multi_label_classification" or reference.shape[1] == 1
    rule_score = reference[:, columns].max(axis=1) if independent else reference[:, columns].sum(axis=1)
    drop_at, quarantine_at = threshold_near(rule_score, 0.5), threshold_near(rule_score, 0.25)
    expected = np.where(rule_score >= drop_at, "drop", np.where(rule_score >= quarantine_at, "quarantine", "allow"))
    rules = [
        {"action": "drop", "labels": RULE_LABELS[family], "min_score": drop_at, "name": "drop"},
        {"action": "quarantine", "labels": RULE_LABELS[family], "min_score": quarantine_at, "name": "hold"},
    ]
    settings = worker_settings(
        bootstrap_servers,
        str(directory),
        routing={"rules": rules},
        model__backend=backend,
        model__dtype="float32",
        model__labels=LABEL_MAP.get(family),
    )
    create_topics(settings, input_partitions=2)
    produce(
        bootstrap_servers, settings.topics.input[0], [orjson.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)]
    )

    outputs = run_worker(settings)

    by_id = {orjson.loads(o.value)["id"]: o for o in outputs if o.value is not None}
    assert sorted(by_id) == list(range(len(TEXTS))), "every record routed once"
    got = np.array([by_id[i].headers["filter.action"].decode() for i in range(len(TEXTS))])
    assert (got == expected).all(), f"{int((got != expected).sum())} of {len(TEXTS)} records routed otherwise"
    assert 0.4 <= float(np.mean(expected == "drop")) <= 0.6  # the test splits the records, as intended
    taken = [i for i in range(len(TEXTS)) if expected[i] != "allow"]
    header = np.array([float(by_id[i].headers["filter.score"]) for i in taken])
    np.testing.assert_allclose(header, rule_score[taken], rtol=0, atol=1e-5)  # filter.score: the rule's number


def run_worker(settings: Settings) -> list:
    classifier = Classifier.load(ModelSettings.model_validate(settings.model.model_dump()))
    with worker_thread(settings, classifier) as (_, codes, _thread):
        outputs = read_outputs(settings, expected=len(TEXTS))
    assert codes == [ExitCode.OK]
    return outputs
