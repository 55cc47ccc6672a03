from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from filter_worker.config import DEFAULT_RULES, ConfigError, RoutingSettings, Rule, Scope, load_settings
from filter_worker.model.head import Head
from filter_worker.pipeline.routing import Router

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]
HEAD = Head(tuple(LABELS), "softmax")


def routing(rules=DEFAULT_RULES, scopes=()) -> RoutingSettings:
    return RoutingSettings(rules=list(rules), scopes=list(scopes))


def probs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_default_rules_drop_confident_hostility_and_quarantine_negativity():
    router = Router(routing(), HEAD)
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
    router = Router(routing(rules), HEAD)
    decision = router.decide(probs(0.0, 0.5, 0.5, 0.0, 0.0))
    assert (decision.action, decision.rule) == ("quarantine", "rules[0]")
    assert router.decide(probs(0.0, 0.45, 0.55, 0.0, 0.0)).rule == "rules[1]"


def test_allow_rules_can_short_circuit_later_ones():
    rules = [
        Rule(action="allow", labels=["Very Positive"], min_score=0.3, name="praise"),
        Rule(action="drop", labels=["Very Negative"], min_score=0.3),
    ]
    decision = Router(routing(rules), HEAD).decide(probs(0.35, 0.0, 0.0, 0.0, 0.65))
    assert (decision.action, decision.rule) == ("allow", "praise")


def test_unknown_label_stops_startup_listing_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        Router(routing([Rule(action="drop", labels=["toxic"], min_score=0.5)]), HEAD)
    message = str(err.value)
    assert "FILTER_ROUTING__RULES" in message and "'toxic'" in message and "Very Positive" in message


# ------------------------------------------------------------------------------------------- scopes

KIDS = Scope.model_validate(
    {
        "name": "kids",
        "match": {"header": "tenant", "values": ["kids-app", "kids-web"]},
        "rules": [{"action": "drop", "labels": ["Very Negative", "Negative"], "min_score": 0.3, "name": "strict"}],
    }
)
GERMAN = Scope.model_validate(
    {
        "name": "de",
        "match": {"field": "meta.lang", "values": ["de", "at"]},
        "rules": [{"action": "quarantine", "labels": ["Very Negative"], "min_score": 0.5}],
    }
)
TRUSTED = Scope.model_validate({"name": "trusted", "match": {"header": "tier", "values": ["staff"]}, "rules": []})


@pytest.fixture
def scoped() -> Router:
    return Router(routing(scopes=[KIDS, GERMAN, TRUSTED]), HEAD)


def test_first_matching_scope_wins_and_unmatched_records_are_default(scoped):
    german = {"meta": {"lang": "de"}, "text": "x"}
    assert scoped.scope_of([("tenant", b"kids-web")], german) == "kids", "kids is listed before de"
    assert scoped.scope_of([("tenant", b"news")], german) == "de"
    assert scoped.scope_of([], {"meta": {"lang": "fr"}}) == "default"
    assert scoped.scope_of([("tier", b"staff")], None) == "trusted"
    assert scoped.scopes == ["default", "kids", "de", "trusted"]


@pytest.mark.parametrize(
    ("headers", "document"),
    [
        ([("tenant", None)], None),  # a header without a value
        ([("Tenant", b"kids-app")], None),  # header names are case-sensitive, as in Kafka
        ([("tenant", b"kids-app "), ("x", b"1")], None),  # values compare exactly
        ([("tenant", b"kids-app"), ("tenant", b"news")], None),  # the last header of a name counts
        ([], {"meta": {"lang": ["de"]}}),  # a field that is not a string
        ([], {"meta": "de"}),  # the path runs into a string
        ([], {"lang": "de"}),  # the path is meta.lang, not lang
        ([], None),  # text format: no JSON value to look into
    ],
)
def test_records_that_do_not_match_fall_through_to_default(scoped, headers, document):
    assert scoped.scope_of(headers, document) == "default"


def test_each_scope_routes_by_its_own_rules_and_decisions_carry_the_scope(scoped):
    row = probs(0.2, 0.2, 0.6, 0.0, 0.0)  # Very Negative + Negative = 0.4
    kids = scoped.decide(row, "kids")
    assert (kids.action, kids.rule, kids.scope) == ("drop", "strict", "kids")
    assert kids.score == pytest.approx(0.4) and kids.rule_scores == {"strict": pytest.approx(0.4)}
    default = scoped.decide(row, "default")
    assert (default.action, default.rule, default.scope, default.label) == ("allow", "default", "default", "Neutral")
    assert set(default.rule_scores) == {"very-negative", "negative"}
    hostile = probs(0.97, 0.01, 0.01, 0.005, 0.005)
    assert scoped.decide(hostile, "de").rule == "rules[0]", "unnamed rules are named by their place in the scope"
    trusted = scoped.decide(hostile, "trusted")
    assert (trusted.action, trusted.rule, trusted.rule_scores) == ("allow", "default", {}), "no rules: allow"


def test_decide_batch_equals_deciding_row_by_row(scoped):
    rng = np.random.default_rng(7)
    batch = rng.dirichlet(np.full(len(LABELS), 0.3), size=200).astype(np.float32)
    scopes = [scoped.scopes[i] for i in rng.integers(0, len(scoped.scopes), size=200)]
    together = scoped.decide_batch(batch, scopes)
    one_by_one = [scoped.decide(row, scope) for row, scope in zip(batch, scopes, strict=True)]
    assert together == one_by_one
    assert [d.scope for d in together] == scopes
    assert {d.action for d in together} == {"allow", "quarantine", "drop"}, "the sample exercises every action"
    # The same as a plain loop over the rules, comparing each float32 sum with min_score.
    for decision, row in zip(together, batch, strict=True):
        if decision.scope == "default":
            assert (decision.rule, decision.action) == first_match(DEFAULT_RULES, row)


def first_match(rules, row) -> tuple[str, str]:
    for rule in rules:
        if float(row[[LABELS.index(label) for label in rule.labels]].sum()) >= rule.min_score:
            return rule.name, rule.action
    return "default", "allow"


def test_decide_batch_checks_its_inputs(scoped):
    with pytest.raises(ValueError, match="unknown scope 'adults'"):
        scoped.decide_batch(np.full((1, 5), 0.2, dtype=np.float32), ["adults"])
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        scoped.decide_batch(np.full((1, 5), 0.2, dtype=np.float32), ["kids", "de"])
    assert scoped.decide_batch(np.zeros((0, 5), dtype=np.float32), []) == []


def test_an_unknown_label_in_any_scope_refuses_the_whole_routing():
    bad = GERMAN.model_copy(update={"rules": [Rule(action="drop", labels=["toxic"], min_score=0.5)]})
    with pytest.raises(ConfigError) as err:
        Router(routing(scopes=[KIDS, bad]), HEAD)
    message = str(err.value)
    assert message.startswith("FILTER_ROUTING__SCOPES (routing.scopes[1].rules[0].labels, scope 'de')")
    assert "'toxic'" in message and "Very Positive" in message


def scope(name: str, **match: object) -> dict:
    return {"name": name, "match": match or {"header": "tenant", "values": ["a"]}, "rules": []}


@pytest.mark.parametrize(
    ("scopes", "named"),
    [
        ([scope("kids"), scope("kids")], "repeated: ['kids']"),
        ([scope("default")], "routing.scopes[0].name"),
        ([scope("kids app")], "routing.scopes[0].name"),
        ([scope("x" * 65)], "routing.scopes[0].name"),
        ([scope("kids", header="t", field="lang", values=["a"])], "exactly one of"),
        ([scope("kids", field="lang", values=[])], "routing.scopes[0].match.values"),
        ([scope("kids", field="meta..lang", values=["a"])], "dotted path"),
        (
            [
                {
                    **scope("kids"),
                    "rules": [{"action": "drop", "labels": ["Negative"], "min_score": 0.5, "name": "x"}] * 2,
                }
            ],
            "routing.scopes[0].rules): rule names must be unique within a rule list; repeated: ['x']",
        ),
    ],
)
def test_bad_scopes_stop_startup_naming_the_setting(monkeypatch, scopes, named):
    monkeypatch.setenv("FILTER_ROUTING__SCOPES", json.dumps(scopes))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "FILTER_ROUTING__SCOPES" in str(err.value) and named in str(err.value)


def test_field_scopes_need_json_records(monkeypatch):
    monkeypatch.setenv("FILTER_ROUTING__SCOPES", json.dumps([scope("de", field="lang", values=["de"])]))
    monkeypatch.setenv("FILTER_MESSAGE__FORMAT", "text")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == (
        "invalid configuration: FILTER_ROUTING__SCOPES: scope(s) ['de'] match on a JSON field, but "
        "FILTER_MESSAGE__FORMAT is text; match on a header instead"
    )
    monkeypatch.setenv("FILTER_ROUTING__SCOPES", json.dumps([scope("kids")]))
    assert load_settings().routing.scopes[0].match.header == "tenant", "header scopes work on text records"


def test_rule_names_are_unique_within_a_list(monkeypatch):
    rules = [
        {"action": "drop", "labels": ["Negative"], "min_score": 0.9},
        {"action": "drop", "labels": ["Negative"], "min_score": 0.5, "name": "rules[0]"},
    ]
    monkeypatch.setenv("FILTER_ROUTING__RULES", json.dumps(rules))
    with pytest.raises(ConfigError, match=r"FILTER_ROUTING__RULES \(routing.rules\): .*repeated: \['rules\[0\]'\]"):
        load_settings()


# --------------------------------------------------------------- scopes the sender cannot choose

KIDS_TOPIC = {
    "name": "kids-topic",
    "match": {"topics": ["kids.messages"]},
    "rules": [{"action": "drop", "labels": ["Very Negative", "Negative"], "min_score": 0.3, "name": "strict"}],
}


def test_a_scope_can_match_on_the_input_topic_which_the_sender_does_not_set():
    router = Router(routing(scopes=[Scope.model_validate(KIDS_TOPIC), KIDS]), HEAD)
    assert router.scope_of([("tenant", b"kids-app")], None, topic="kids.messages") == "kids-topic"
    assert router.scope_of([("tenant", b"kids-app")], None, topic="messages") == "kids"
    assert router.scope_of([], None, topic="messages") == "default"
    assert router.scope_of([("topic", b"kids.messages")], {"topic": "kids.messages"}) == "default"


def test_a_topic_match_takes_topics_only_and_they_must_be_input_topics():
    for bad, message in [
        ({"topics": ["kids.messages"], "values": ["x"]}, "'values' goes with 'header' or 'field'"),
        ({"topics": []}, "at least 1 item"),
        ({"topics": ["kids.messages"], "header": "tenant", "values": ["x"]}, "exactly one of"),
        ({"header": "tenant"}, "'values' is needed"),
        ({"topics": ["no topic"]}, "not a Kafka topic name"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(message)):
            Scope.model_validate({**KIDS_TOPIC, "match": bad})
    with pytest.raises(ConfigError, match=r"scope 'kids-topic' matches topic\(s\) \['kids.messages'\] that are not"):
        load_settings(routing={"scopes": [KIDS_TOPIC]})
    settings = load_settings(topics={"input": ["messages", "kids.messages"]}, routing={"scopes": [KIDS_TOPIC]})
    assert settings.routing.scopes[0].match.topics == ["kids.messages"]
    assert load_settings(topics={"input": ["^.*messages"]}, routing={"scopes": [KIDS_TOPIC]}).routing.scopes


LAX = [{"action": "quarantine", "labels": ["Very Negative"], "min_score": 0.95, "name": "lax"}]
STRICT = [
    {"action": "drop", "labels": ["Very Negative", "Negative"], "min_score": 0.5, "name": "strict"},
]


@pytest.mark.parametrize(
    ("match", "rules", "warned"),
    [
        ({"header": "tier", "values": ["staff"]}, [], True),  # the docs' old staff example: no rules at all
        ({"field": "lang", "values": ["de"]}, LAX, True),  # a higher threshold, fewer labels, a milder action
        ({"header": "tier", "values": ["staff"]}, STRICT, False),  # stricter than the default everywhere
        ({"header": "tier", "values": ["staff"]}, [{**LAX[0], "action": "allow"}, *STRICT], True),  # allow first
        ({"topics": ["staff.messages"]}, [], False),  # laxer, but the sender does not choose the topic
    ],
)
def test_a_laxer_scope_that_the_sender_can_choose_is_warned_about(match, rules, warned):
    scope = Scope.model_validate({"name": "s", "match": match, "rules": rules})
    with capture_logs() as events:
        Router(routing(scopes=[scope]), HEAD)
    warnings = [e for e in events if e["event"].startswith("scope rules laxer than the default")]
    assert bool(warnings) == warned
    if warned:
        assert warnings[0]["scopes"] == ["s"] and warnings[0]["log_level"] == "warning"
