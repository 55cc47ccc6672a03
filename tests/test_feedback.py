"""Verdict records and precision windows (pure parts of ``filter-worker feedback``)."""

from __future__ import annotations

import orjson
import pytest

from filter_worker.config import RoutingSettings
from filter_worker.moderation.verdicts import INVALID_REASONS, Invalid, Verdict, latest_per_source, parse_verdict
from filter_worker.moderation.windows import Key, ModelRoster, PrecisionWindows
from filter_worker.service.feedback import RuleIndex

ROUTING = RoutingSettings.model_validate(
    {
        "scopes": [
            {
                "name": "kids",
                "match": {"header": "tenant", "values": ["kids-app"]},
                "rules": [{"action": "drop", "labels": ["Negative"], "min_score": 0.3, "name": "strict"}],
            }
        ]
    }
)
HEADERS = {
    "filter.action": b"quarantine",
    "filter.rule": b"negative",
    "filter.scope": b"default",
    "filter.score": b"0.812346",
    "filter.model": b"acme/m@0123#sha256:00112233aabbccdd",
}
VALUE = {"source": "messages/3/1207", "verdict": "abuse", "reviewer": "ann"}


def record(value: object = VALUE, drop: tuple[str, ...] = (), **headers: bytes) -> tuple[list, bytes]:
    merged = {**HEADERS, **{k.replace("_", "."): v for k, v in headers.items()}}
    body = value if isinstance(value, bytes) else orjson.dumps(value)
    return [("trace", b"1"), *((k, v) for k, v in merged.items() if k not in drop)], body


def test_a_verdict_carries_the_decision_from_its_headers():
    verdict = parse_verdict(*record())
    assert verdict == Verdict(
        "messages/3/1207", True, "quarantine", "negative", "default", 0.812346, "acme/m@0123#sha256:00112233aabbccdd"
    )
    assert parse_verdict(*record({**VALUE, "verdict": "ok", "reviewer": None})).abuse is False
    headers, value = record()
    again = parse_verdict([*headers, ("filter.rule", b"very-negative")], value)
    assert again.rule == "very-negative", "the last header of a name counts, as in routing"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (record(b"not json"), "not_json"),
        (record(b""), "not_json"),
        (record(["abuse"]), "bad_verdict"),
        (record({**VALUE, "verdict": "spam"}), "bad_verdict"),
        (record({"source": "messages/3/1207"}), "bad_verdict"),
        (record({**VALUE, "reviewer": 7}), "bad_verdict"),
        (record({**VALUE, "source": "messages-3-1207"}), "bad_source"),
        (record({**VALUE, "source": "a/b/c/1/2"}), "bad_source"),
        (record({**VALUE, "source": 12}), "bad_source"),
        (record(drop=("filter.scope",)), "missing_header"),
        (record(drop=("filter.model", "filter.score")), "missing_header"),
        (record(filter_score=b"high"), "bad_header"),
        (record(filter_score=b"1.5"), "bad_header"),
        (record(filter_score=b"nan"), "bad_header"),
        (record(filter_rule=b"\xff"), "bad_header"),
        (record(filter_action=b"delete"), "bad_header"),
        (record(filter_model=b"a model"), "bad_header"),
        (record(filter_action=b"allow"), "not_moderated"),
        (record(filter_action=b"dead_letter"), "not_moderated"),
    ],
)
def test_bad_verdict_records_say_why(args, reason):
    outcome = parse_verdict(*args)
    assert isinstance(outcome, Invalid) and outcome.reason == reason and reason in INVALID_REASONS
    assert outcome.detail


def test_only_configured_scopes_and_rules_become_labels():
    rules = RuleIndex(ROUTING)
    verdict = parse_verdict(*record())
    assert rules.check(verdict) is None
    kids = parse_verdict(*record(filter_scope=b"kids", filter_rule=b"strict", filter_action=b"drop"))
    assert rules.check(kids) is None
    assert rules.check(parse_verdict(*record(filter_scope=b"adults"))).reason == "unknown_scope"
    assert rules.check(parse_verdict(*record(filter_scope=b"kids"))).reason == "unknown_rule"
    assert rules.check(parse_verdict(*record(filter_rule=b"made-up"))).reason == "unknown_rule"




# ---- sampled verdicts ----

SAMPLED = {
    "filter.action": b"allow",
    "filter.rule": b"default",
    "filter.sampled": b"true",
    "filter.sample-probability": b"0.01",
    "filter.rule-scores": b'{"very-negative": 0.2, "negative": 0.7}',
}


def drawn_record(drop: tuple[str, ...] = (), **changes: bytes) -> tuple[list, bytes]:
    """A verdict on a randomly drawn record; ``changes`` by header name, ``filter_rule_scores`` for
    ``filter.rule-scores``."""
    renamed = {k.replace("filter_", "filter.", 1).replace("_", "-"): v for k, v in changes.items()}
    fields = {**HEADERS, **SAMPLED, **renamed}
    return [(k, v) for k, v in fields.items() if k not in drop], orjson.dumps(VALUE)


def test_a_verdict_on_a_drawn_record_carries_its_probability_and_rule_scores():
    verdict = parse_verdict(*drawn_record())
    assert verdict.action == "allow" and verdict.sample is not None
    assert verdict.sample.probability == 0.01 and verdict.sample.weight == pytest.approx(100)
    assert verdict.sample.rule_scores == {"very-negative": 0.2, "negative": 0.7}
    assert RuleIndex(ROUTING).check(verdict) is None, "an allowed record's rule is 'default'"
    for change, reason in [
        ({"filter_sample_probability": b"0"}, "bad_header"),
        ({"filter_sample_probability": b"x"}, "bad_header"),
        ({"filter_rule_scores": b'{"negative": 2}'}, "bad_header"),
        ({"filter_rule_scores": b"[0.5]"}, "bad_header"),
    ]:
        assert parse_verdict(*drawn_record(**change)).reason == reason, change
    assert parse_verdict(*drawn_record(drop=("filter.sample-probability",))).reason == "missing_header"
    assert parse_verdict(*drawn_record(drop=("filter.sampled",))).reason == "not_moderated"


def test_the_latest_verdict_of_a_source_counts_and_keeps_the_fact_that_it_was_drawn():
    drawn = parse_verdict(*drawn_record())
    queue = parse_verdict(*record({**VALUE, "verdict": "ok"}))
    other = parse_verdict(*record({**VALUE, "source": "messages/3/9"}))
    latest = latest_per_source([drawn, other, queue])
    assert [v.source for v in latest] == ["messages/3/9", "messages/3/1207"]
    assert latest[1].abuse is False and latest[1].sample == drawn.sample


# ---- windows and models ----


def test_windows_keep_the_last_verdicts_one_per_source_with_an_exact_interval():
    windows = PrecisionWindows(size=3)
    key = Key("default", "negative", "quarantine", "m1")
    for i, abuse in enumerate([False, True, True, False]):
        windows.add(key, f"t/0/{i}", abuse, 0.8)
    assert windows.stats(key) == (2, 3), "the first verdict slid out"
    windows.add(key, "t/0/3", True, 0.8)  # a reviewer changed their mind about t/0/3
    assert windows.stats(key) == (3, 3)
    windows.add(key, "t/0/2", True, 0.8)  # a repeat (re-read after a crash) counts once
    assert windows.stats(key) == (3, 3)
    estimate = windows.precision(key)
    assert (estimate.value, estimate.high) == (1.0, 1.0) and estimate.low == pytest.approx(0.025 ** (1 / 3))
    assert windows.stats(Key("default", "negative", "drop", "m1")) == (0, 0)
    assert windows.precision(Key("default", "negative", "drop", "m1")) is None


def test_only_configured_models_are_admitted_at_most_cap_at_a_time_and_quiet_ones_are_forgotten():
    roster = ModelRoster(["acme/m", "other/x@1#sha256:aa"], cap=2, idle_s=100.0)
    assert roster.admit("acme/m@1#sha256:00", at=0.0, now=0.0) is None
    assert roster.admit("other/x@1#sha256:aa", at=0.0, now=0.0) is None
    assert roster.admit("other/x@1#sha256:bb", at=0.0, now=0.0).reason == "unknown_model", "a full identity is exact"
    assert roster.admit("acme/mm@1", at=0.0, now=0.0).reason == "unknown_model", "a name matches up to its '@'"
    assert roster.admit("acme/m@2#sha256:01", at=0.0, now=0.0).reason == "too_many_models"
    assert roster.admit("acme/m@1#sha256:00", at=90.0, now=90.0) is None
    assert roster.idle(now=150.0) == ["other/x@1#sha256:aa"], "quiet for 150 s; acme/m@1 for 60 s"
    assert roster.admit("acme/m@2#sha256:01", at=150.0, now=150.0) is None, "a slot is free again"
