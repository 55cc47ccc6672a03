"""Verdict records and precision windows (pure parts of ``filter-worker feedback``)."""

from __future__ import annotations

import orjson
import pytest

from filter_worker.config import RoutingSettings
from filter_worker.feedback import INVALID_REASONS, Invalid, Key, PrecisionWindows, RuleIndex, Verdict, parse_verdict

ROUTING = RoutingSettings.model_validate(
    {
        "scopes": [
            {
                "name": "kids",
                "match": {"header": "tenant", "values": ["kids-app"]},
                "rules": [{"action": "drop", "labels": ["Negative"], "min_score": 0.3}],
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
    kids = parse_verdict(*record(filter_scope=b"kids", filter_rule=b"rules[0]", filter_action=b"drop"))
    assert rules.check(kids) is None, "unnamed rules are named by their place, as in filter.rule"
    assert rules.check(parse_verdict(*record(filter_scope=b"adults"))).reason == "unknown_scope"
    assert rules.check(parse_verdict(*record(filter_scope=b"kids"))).reason == "unknown_rule"
    assert rules.check(parse_verdict(*record(filter_rule=b"made-up"))).reason == "unknown_rule"


def test_windows_keep_the_last_verdicts_one_per_source():
    windows = PrecisionWindows(size=3)
    key = Key("default", "negative", "quarantine", "m1")
    for i, abuse in enumerate([False, True, True, False]):
        assert windows.add(key, f"t/0/{i}", abuse) == []
    assert windows.stats(key) == (2, 3), "the first verdict slid out"
    windows.add(key, "t/0/3", True)  # a reviewer changed their mind about t/0/3
    assert windows.stats(key) == (3, 3)
    windows.add(key, "t/0/2", True)  # a repeat (re-read after a crash) counts once
    assert windows.stats(key) == (3, 3)
    assert windows.stats(Key("default", "negative", "drop", "m1")) == (0, 0)


def test_a_new_model_beyond_the_limit_drops_the_least_recently_judged_one():
    windows = PrecisionWindows(size=10, max_models=2)
    a, b, c = (Key("default", "negative", "quarantine", m) for m in ("a", "b", "c"))
    a_drop = Key("default", "very-negative", "drop", "a")
    windows.add(a, "t/0/1", True)
    windows.add(a_drop, "t/0/2", True)
    windows.add(b, "t/0/3", True)
    windows.add(a, "t/0/4", False)  # a is judged again: b is now the oldest
    assert windows.add(c, "t/0/5", True) == [b]
    assert windows.stats(b) == (0, 0) and windows.stats(a) == (1, 2)
    assert sorted(windows.add(b, "t/0/6", True)) == sorted([a, a_drop])
