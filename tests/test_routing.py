from __future__ import annotations

import numpy as np
import pytest

from filter_worker.config import DEFAULT_RULES, ConfigError, Rule
from filter_worker.pipeline.routing import Router

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]


def probs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_default_rules_drop_confident_hostility_and_quarantine_negativity():
    router = Router(DEFAULT_RULES, LABELS)
    drop = router.decide(probs(0.95, 0.03, 0.01, 0.005, 0.005))
    assert (drop.action, drop.rule, drop.label) == ("drop", "very-negative", "Very Negative")
    assert drop.score == pytest.approx(0.95)
    quarantine = router.decide(probs(0.5, 0.3, 0.1, 0.05, 0.05))
    assert (quarantine.action, quarantine.rule) == ("quarantine", "negative")
    assert quarantine.score == pytest.approx(0.8)
    allow = router.decide(probs(0.05, 0.1, 0.6, 0.2, 0.05))
    assert (allow.action, allow.rule, allow.label) == ("allow", "default", "Neutral")
    assert allow.score == pytest.approx(0.6)
    assert allow.scores["Positive"] == pytest.approx(0.2)


def test_first_matching_rule_wins_and_threshold_is_inclusive():
    rules = [
        Rule(action="quarantine", labels=["Negative"], min_score=0.5),
        Rule(action="drop", labels=["Negative"], min_score=0.4),
    ]
    router = Router(rules, LABELS)
    decision = router.decide(probs(0.0, 0.5, 0.5, 0.0, 0.0))
    assert (decision.action, decision.rule) == ("quarantine", "rules[0]")
    assert router.decide(probs(0.0, 0.45, 0.55, 0.0, 0.0)).rule == "rules[1]"


def test_allow_rules_can_short_circuit_later_ones():
    rules = [
        Rule(action="allow", labels=["Very Positive"], min_score=0.3, name="praise"),
        Rule(action="drop", labels=["Very Negative"], min_score=0.3),
    ]
    decision = Router(rules, LABELS).decide(probs(0.35, 0.0, 0.0, 0.0, 0.65))
    assert (decision.action, decision.rule) == ("allow", "praise")


def test_unknown_label_stops_startup_listing_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        Router([Rule(action="drop", labels=["toxic"], min_score=0.5)], LABELS)
    message = str(err.value)
    assert "FILTER_ROUTING__RULES" in message and "'toxic'" in message and "Very Positive" in message
