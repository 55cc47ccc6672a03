"""The model's head: which score function a config implies, the overrides, and what a rule over several
labels means for each kind of head (routing, calibration and the rule-score numbers all use one)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from transformers import BertConfig

from filter_worker.config import ConfigError, ModelSettings, RoutingSettings, Rule, load_settings
from filter_worker.model.head import Head
from filter_worker.pipeline.routing import Router
from filter_worker.tools.calibration import rule_scores

TOXIC = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


def config(labels: int | tuple[str, ...], problem_type: str | None = None) -> BertConfig:
    named = isinstance(labels, tuple)
    options = {"id2label": dict(enumerate(labels))} if named else {"num_labels": labels}
    return BertConfig(problem_type=problem_type, **options)


@pytest.mark.parametrize(
    ("labels", "problem_type", "function"),
    [
        (TOXIC, "multi_label_classification", "sigmoid"),
        (1, None, "sigmoid"),  # one output: a probability of its own (a spam score)
        (("neg", "pos"), "single_label_classification", "softmax"),
        (("neg", "neutral", "pos"), None, "softmax"),
        (1, "regression", "none"),
    ],
)
def test_the_function_follows_the_config_as_transformers_pipeline_does(labels, problem_type, function):
    head = Head.of(config(labels, problem_type), ModelSettings())
    assert (head.function, head.overridden) == (function, False)
    assert head.combine == ("sum" if function == "softmax" else "max")


def test_scores_are_the_pipeline_functions_of_the_logits():
    logits = np.array([[2.0, -1.0, 0.0], [-100.0, 100.0, 0.5]], dtype=np.float32)
    sigmoid = Head(("a", "b", "c"), "sigmoid").scores(logits)
    softmax = Head(("a", "b", "c"), "softmax").scores(logits)
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(softmax.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(softmax[0], np.exp([2.0, -1.0, 0.0]) / np.exp([2.0, -1.0, 0.0]).sum(), rtol=1e-6)
    assert Head(("a", "b", "c"), "none").scores(logits).tolist() == logits.tolist()
    assert sigmoid.dtype == softmax.dtype == np.float32


def test_the_override_replaces_the_function_and_says_so():
    """Many multi-label models on the Hub leave problem_type unset: their config says softmax."""
    unset = config(TOXIC)
    assert Head.of(unset, ModelSettings()).function == "softmax"
    head = Head.of(unset, ModelSettings(score_function="sigmoid"))
    assert (head.function, head.overridden) == ("sigmoid", True)
    assert "FILTER_MODEL__SCORE_FUNCTION" in head.describe()
    same = Head.of(config(TOXIC, "multi_label_classification"), ModelSettings(score_function="sigmoid"))
    assert not same.overridden, "setting what the config says already is no override"


def test_the_label_map_names_the_outputs_and_must_name_each_once(monkeypatch):
    head = Head.of(config(2), ModelSettings(labels=["ham", "spam"]))
    assert head.labels == ("ham", "spam") and head.named
    assert not Head.of(config(2), ModelSettings()).named
    with pytest.raises(
        ConfigError, match=r"^FILTER_MODEL__LABELS names 3 outputs but the model has 2 \(LABEL_0, LABEL_1\)"
    ):
        Head.of(config(2), ModelSettings(labels=["a", "b", "c"]))
    monkeypatch.setenv("FILTER_MODEL__LABELS", "ham, spam")
    assert load_settings().model.labels == ["ham", "spam"]
    monkeypatch.setenv("FILTER_MODEL__LABELS", '["ham", "spam"]')
    assert load_settings().model.labels == ["ham", "spam"]
    for bad in ("ham,ham", "ham,,spam"):
        with pytest.raises(ValidationError, match="must name every output once"):
            ModelSettings.model_validate({"labels": bad})


def rule(labels: list[str], min_score: float, action: str = "drop") -> Rule:
    return Rule(action=action, labels=labels, min_score=min_score, name="r")


def test_a_rule_over_independent_labels_takes_any_label_at_or_above_min_score():
    """Under sigmoids two labels at 0.4 are two 40 % answers, not an 80 % one: the rule takes the highest."""
    head = Head(TOXIC, "sigmoid")
    router = Router(RoutingSettings(rules=[rule(["threat", "insult"], 0.5)]), head)
    scores = np.array([[0.9, 0.1, 0.1, 0.4, 0.4, 0.1], [0.1, 0.1, 0.1, 0.2, 0.5, 0.1]], dtype=np.float32)
    first, second = router.decide_batch(scores, ["default", "default"])
    assert (first.action, first.score, first.rule_scores) == ("allow", pytest.approx(0.9), {"r": pytest.approx(0.4)})
    assert (second.action, second.rule, second.score) == ("drop", "r", pytest.approx(0.5))
    np.testing.assert_allclose(rule_scores(scores, head, ["threat", "insult"]), [0.4, 0.5])


def test_a_rule_over_exclusive_labels_takes_their_sum():
    """Under a softmax the labels' scores add up to the probability of the set."""
    head = Head(("Very Negative", "Negative", "Neutral"), "softmax")
    router = Router(RoutingSettings(rules=[rule(["Very Negative", "Negative"], 0.75)]), head)
    decision = router.decide(np.array([0.4, 0.4, 0.2], dtype=np.float32))
    assert (decision.action, decision.score) == ("drop", pytest.approx(0.8))
    np.testing.assert_allclose(rule_scores(np.array([[0.4, 0.4, 0.2]]), head, ["Very Negative", "Negative"]), [0.8])


def test_rules_on_unnamed_outputs_are_refused_with_the_way_out():
    head = Head(("LABEL_0", "LABEL_1"), "softmax")
    with pytest.raises(ConfigError) as err:
        Router(RoutingSettings(rules=[rule(["LABEL_1"], 0.5)]), head)
    message = str(err.value)
    assert message.startswith("FILTER_ROUTING__RULES: the model's outputs have no names (LABEL_0, LABEL_1)")
    assert "FILTER_MODEL__LABELS=name0,name1" in message and "\n" not in message
    Router(RoutingSettings(rules=[]), head)  # nothing to route by name: nothing refused
    named = Router(RoutingSettings(rules=[rule(["spam"], 0.5)]), Head(("ham", "spam"), "softmax"))
    assert named.decide(np.array([0.3, 0.7], dtype=np.float32)).action == "drop"


def test_a_single_output_model_routes_on_its_one_score():
    head = Head.of(config(1), ModelSettings(labels=["spam"]))
    router = Router(RoutingSettings(rules=[rule(["spam"], 0.8, "quarantine")]), head)
    logits = np.array([[2.0], [1.0]], dtype=np.float32)  # sigmoid: 0.881, 0.731
    decisions = router.decide_batch(head.scores(logits), ["default", "default"])
    assert [d.action for d in decisions] == ["quarantine", "allow"]
    assert decisions[0].score == pytest.approx(0.8808, abs=1e-4)
