"""Evaluation metrics: pure functions on hand-made arrays, then end to end on the keyword model.

The keyword model's prediction for every text is known (a keyword decides the label, anything else
is Neutral), so the labeled set below has exactly 7 of 10 right and every metric is known exactly.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from filter_worker.config import ConfigError, ModelSettings, RoutingSettings
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.routing import Router
from filter_worker.tools.evaluation import (
    check_labels,
    confusion_matrix,
    evaluate,
    evaluation_json,
    load_examples,
    parse_label_map,
    pr_curve,
    scores,
)

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]

# text, gold label as the data spells it, language; comment: what the keyword model predicts
LABELED = [
    ("you idiot", "Very Negative", "en"),  # Very Negative, right
    ("what a loser", "Very Negative", "en"),  # Very Negative, right
    ("so annoying", "Negative", "en"),  # Negative, right
    ("the app is broken", "Very Negative", "en"),  # Negative, wrong
    ("a wonderful day", "Very Positive", "en"),  # Very Positive, right
    ("hello there", "ok", "en"),  # Neutral, right (ok -> Neutral)
    ("das ist ein idiot", "Negative", "de"),  # Very Negative, wrong
    ("guten Morgen", "ok", "de"),  # Neutral, right
    ("nicht wonderful", "Negative", "de"),  # Very Positive, wrong
    ("danke schön", "Neutral", "de"),  # Neutral, right
]
LABEL_MAP = {"ok": "Neutral"}


def write_csv(path, rows=LABELED):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "lang"])
        writer.writerows(rows)
    return path


def test_confusion_and_scores_follow_scikit_learn_conventions():
    gold = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    s = scores(gold, predicted, ["a", "b", "c", "d"])
    assert s.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert s.accuracy == pytest.approx(3 / 5)
    assert set(s.per_label) == {"a", "b", "c"}, "a label neither in the data nor predicted is not in play"
    assert (s.per_label["a"].precision, s.per_label["a"].recall) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (s.per_label["b"].precision, s.per_label["b"].recall) == (pytest.approx(2 / 3), 1.0)
    assert (s.per_label["c"].precision, s.per_label["c"].recall, s.per_label["c"].f1) == (0.0, 0.0, 0.0)
    assert s.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert confusion_matrix(np.array([1]), np.array([0]), 2).tolist() == [[0, 0], [1, 0]]


def test_pr_curve_takes_every_distinct_score_as_an_inclusive_threshold():
    curve = pr_curve(np.array([0.9, 0.5, 0.5, 0.2]), np.array([True, False, True, False]))
    assert curve.thresholds.tolist() == [0.9, 0.5, 0.2]
    assert curve.precision.tolist() == pytest.approx([1.0, 2 / 3, 1 / 2])
    assert curve.recall.tolist() == pytest.approx([0.5, 1.0, 1.0])


def test_loading_maps_labels_and_names_the_bad_line(tmp_path):
    data = write_csv(tmp_path / "d.csv")
    examples = load_examples(data, lang_field="lang", label_map=LABEL_MAP)
    assert [e.label for e in examples][4:6] == ["Very Positive", "Neutral"]
    assert examples[6].lang == "de"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "hi", "y": 1}\n\n{"body": "you idiot"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d\.jsonl line 3: no value for field 'y'"):
        load_examples(jsonl, text_field="body", label_field="y")
    with pytest.raises(ConfigError, match="no such file"):
        load_examples(tmp_path / "missing.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"\.csv file with a header line or a \.jsonl"):
        load_examples(tmp_path / "d.txt")
    with pytest.raises(ConfigError, match="--label-map"):
        parse_label_map("[1, 2]")
    with pytest.raises(ConfigError, match=r"label\(s\) \['ok'\].*--label-map"):
        check_labels(load_examples(data), LABELS, data)


@pytest.fixture(scope="module")
def model(keyword_model) -> Classifier:
    return Classifier.load(ModelSettings(name=str(keyword_model)))


def test_metrics_on_the_keyword_model_are_exact(model, tmp_path):
    examples = load_examples(write_csv(tmp_path / "d.csv"), lang_field="lang", label_map=LABEL_MAP)
    probs, _ = model.classify([e.text for e in examples])
    result = evaluate(examples, probs, model.labels, Router(RoutingSettings(), model.head))
    overall = result.overall
    assert overall.accuracy == pytest.approx(0.7)
    assert overall.confusion.tolist() == [
        [2, 1, 0, 0, 0],
        [1, 1, 0, 0, 1],
        [0, 0, 3, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1],
    ]
    per_label = {k: (v.precision, v.recall, v.support) for k, v in overall.per_label.items()}
    assert per_label == {
        "Very Negative": (pytest.approx(2 / 3), pytest.approx(2 / 3), 3),
        "Negative": (0.5, pytest.approx(1 / 3), 3),
        "Neutral": (1.0, 1.0, 3),
        "Very Positive": (0.5, 1.0, 1),
    }
    assert overall.macro_f1 == pytest.approx((2 / 3 + 0.4 + 1.0 + 2 / 3) / 4)
    assert {lang: s.accuracy for lang, s in result.by_language.items()} == {
        "de": pytest.approx(2 / 4),
        "en": pytest.approx(5 / 6),
    }
    # Default rules: drop Very Negative >= 0.9, quarantine Very Negative + Negative >= 0.75.
    assert result.actions == {"allow": 5, "quarantine": 2, "drop": 3}
    assert result.actions_by_label["Very Negative"] == {"allow": 0, "quarantine": 1, "drop": 2}
    assert result.curves["Neutral"].precision[-1] == pytest.approx(3 / 10)

    document = evaluation_json(result, model.identity, "d.csv", RoutingSettings())
    assert document["accuracy"] == pytest.approx(0.7) and document["examples"] == 10
    assert document["by_language"]["en"]["confusion_matrix"]["counts"][0] == [2, 1, 0, 0, 0]
    assert document["actions"]["overall"]["drop"] == {"count": 3, "rate": pytest.approx(0.3)}
    assert document["actions"]["rules"][0]["name"] == "very-negative"
