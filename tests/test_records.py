from __future__ import annotations

import orjson

from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import InputRecord, dead_letter, routed
from filter_worker.pipeline.routing import Decision

RECORD = InputRecord("in", 2, 41, b"key", b'{"text": "x"}', [("trace", b"1"), ("filter.action", b"old")], 1700000000000)
DECISION = Decision(
    action="quarantine",
    rule="negative",
    label="Negative",
    score=0.8123456789,
    scope="kids",
    labels=["Negative", "Neutral"],
    probabilities=[0.81, 0.19],
    rule_names=("negative",),
    rule_row=[0.81],
)


def test_routed_record_keeps_value_key_timestamp_and_headers():
    out = routed(RECORD, DECISION, "in.quarantine", "m@rev", truncated=False)
    assert (out.topic, out.key, out.value, out.timestamp_ms) == ("in.quarantine", b"key", RECORD.value, 1700000000000)
    headers = dict(out.headers)
    assert headers["trace"] == b"1"
    assert [k for k, _ in out.headers].count("filter.action") == 1, "earlier filter.* headers are replaced"
    assert headers["filter.action"] == b"quarantine"
    assert headers["filter.label"] == b"Negative"
    assert headers["filter.score"] == b"0.812346"
    assert headers["filter.rule"] == b"negative"
    assert headers["filter.scope"] == b"kids"
    assert headers["filter.model"] == b"m@rev"
    assert headers["filter.source"] == b"in/2/41"
    assert "filter.truncated" not in headers


def test_embedded_value_holds_original_fields_and_moderation():
    out = routed(RECORD, DECISION, "t", "m@rev", truncated=True, embed_into={"text": "x", "id": 3})
    body = orjson.loads(out.value)
    assert body["text"] == "x" and body["id"] == 3
    assert body["moderation"] == {
        "action": "quarantine",
        "label": "Negative",
        "score": 0.8123456789,
        "rule": "negative",
        "scope": "kids",
        "scores": {"Negative": 0.81, "Neutral": 0.19},
        "model": "m@rev",
        "source": "in/2/41",
        "truncated": True,
        "shadow": False,
    }
    assert dict(out.headers)["filter.truncated"] == b"true"
    assert "filter.shadow" not in dict(out.headers)


def test_shadow_decision_is_marked():
    out = routed(RECORD, DECISION, "in.allow", "m@rev", truncated=False, embed_into={"text": "x"}, shadow=True)
    headers = dict(out.headers)
    assert headers["filter.shadow"] == b"true"
    assert headers["filter.action"] == b"quarantine", "the decision it would have had"
    assert orjson.loads(out.value)["moderation"]["shadow"] is True


def test_dead_letter_carries_error_reason_and_source():
    out = dead_letter(RECORD, DecodeFailure("invalid_json", "the value is not valid JSON"), "in.dlq")
    headers = dict(out.headers)
    assert out.value == RECORD.value and out.key == b"key" and out.topic == "in.dlq"
    assert headers["filter.error"] == b"invalid_json"
    assert headers["filter.reason"] == b"the value is not valid JSON"
    assert headers["filter.source"] == b"in/2/41"
    assert headers["filter.action"] == b"dead_letter"
