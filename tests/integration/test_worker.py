"""End to end against the real broker: every input offset routed exactly once, untouched, then committed."""

from __future__ import annotations

import random

import orjson

from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)

# text -> the action the keyword model and the default rules must give it.
TEXTS = {
    "you are an idiot": "drop",
    "what a loser you are": "drop",
    "this is annoying": "quarantine",
    "the update is broken again": "quarantine",
    "a wonderful day at the lake": "allow",
    "meeting moved to 3pm, same room": "allow",
    "Vielen Dank, das ist wirklich großartig!": "allow",
}
# value -> the dead-letter error class it must get.
MALFORMED = {
    b"not json": "invalid_json",
    b'{"text": "trunc': "invalid_json",
    b"[1, 2]": "not_object",
    b'"just a string"': "not_object",
    b'{"user": 1}': "missing_text",
    b'{"text": null}': "missing_text",
    b'{"text": 5}': "text_not_string",
    b'{"text": ""}': "empty_text",
    b"\xc3\x28 bad utf-8": "invalid_utf8",
    None: "empty_value",
}
TOPIC_OF = {"allow": "allow", "quarantine": "quarantine", "drop": "drop", "dead_letter": "dlq"}


def _workload(count: int, seed: int = 1) -> tuple[list[bytes | None], list[str]]:
    rng = random.Random(seed)
    values: list[bytes | None] = []
    expected: list[str] = []
    texts = list(TEXTS)
    bad = list(MALFORMED)
    for i in range(count):
        if i % 25 == 0:
            value = bad[(i // 25) % len(bad)]
            values.append(value)
            expected.append("dlq:" + MALFORMED[value])
        else:
            text = rng.choice(texts)
            values.append(orjson.dumps({"id": i, "text": text, "meta": {"lang": "xx"}}))
            expected.append(TEXTS[text])
    return values, expected


def test_every_record_routed_exactly_once_and_committed(bootstrap_servers, keyword_model, running_worker):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=6)
    values, expected = _workload(3000)
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    by_key = {p.key: p for p in produced}
    expected_by_key = {f"k{i}".encode(): e for i, e in enumerate(expected)}

    with running_worker(settings):
        outputs = read_outputs(settings, expected=len(produced))
        committed = wait_for_commits(settings, end_offsets(produced))

    sources = [o.source for o in outputs]
    assert len(sources) == len(set(sources)), "a record was published twice"
    assert set(sources) == {(p.partition, p.offset) for p in produced}, "a record is missing"
    assert len({p.partition for p in produced}) == 6
    assert committed == end_offsets(produced)

    prefix = settings.topics.allow.rsplit(".", 1)[0]
    for out in outputs:
        source = by_key[out.key]
        assert (source.partition, source.offset) == out.source
        assert out.value == source.value, "value must be byte-for-byte the input value"
        assert out.timestamp_ms == source.timestamp_ms
        assert out.headers["trace-id"] == b"abc", "input headers must be kept"
        want = expected_by_key[out.key]
        if want.startswith("dlq:"):
            assert out.topic == f"{prefix}.dlq"
            assert out.headers["filter.error"].decode() == want[4:]
            assert out.headers["filter.reason"]
        else:
            assert out.topic == f"{prefix}.{TOPIC_OF[want]}", (out.value, out.headers)
            assert out.headers["filter.action"].decode() == want
            assert out.headers["filter.model"].decode().startswith(str(keyword_model) + "@")
            assert 0.0 <= float(out.headers["filter.score"]) <= 1.0
            assert out.headers["filter.rule"].decode() in {"very-negative", "negative", "default"}
            assert out.headers["filter.label"].decode() in {"Very Negative", "Negative", "Neutral", "Very Positive"}
            assert "filter.truncated" not in out.headers


def test_embedded_output_and_text_format(bootstrap_servers, keyword_model, running_worker):
    settings = worker_settings(
        bootstrap_servers, str(keyword_model), output={"embed": True}, message={"format": "text"}
    )
    create_topics(settings, input_partitions=2)
    long_text = "idiot " + "word " * 2000
    values = [b"you are an idiot", b"a wonderful day", long_text.encode(), b"   ", b"\xff"]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with running_worker(settings):
        outputs = read_outputs(settings, expected=len(produced))
    assert len(outputs) == len(values)
    by_key = {o.key: o for o in outputs}

    first = orjson.loads(by_key[b"k0"].value)
    assert first["text"] == "you are an idiot"
    moderation = first["moderation"]
    assert moderation["action"] == "drop" and moderation["label"] == "Very Negative"
    assert set(moderation["scores"]) == {"Very Negative", "Negative", "Neutral", "Positive", "Very Positive"}
    assert abs(sum(moderation["scores"].values()) - 1.0) < 1e-4
    assert moderation["truncated"] is False
    assert moderation["source"] == "{}/{}/{}".format(settings.topics.input[0], *by_key[b"k0"].source)

    long = by_key[b"k2"]
    assert orjson.loads(long.value)["moderation"]["truncated"] is True
    assert long.headers["filter.truncated"] == b"true"
    assert by_key[b"k3"].headers["filter.error"] == b"empty_text"
    assert by_key[b"k4"].headers["filter.error"] == b"invalid_utf8"
    assert by_key[b"k4"].value == b"\xff"


def test_json_embedding_keeps_the_original_object(bootstrap_servers, keyword_model, running_worker):
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        output={"embed": True},
        message={"format": "json", "text_field": "payload.body"},
    )
    create_topics(settings, input_partitions=1)
    original = {"id": 7, "payload": {"body": "this is annoying", "from": "u1"}, "tags": ["a"]}
    produce(bootstrap_servers, settings.topics.input[0], [orjson.dumps(original), b'{"payload": {}}'])
    with running_worker(settings):
        outputs = read_outputs(settings, expected=2)
    routed = next(o for o in outputs if o.topic.endswith(".quarantine"))
    body = orjson.loads(routed.value)
    assert {k: v for k, v in body.items() if k != "moderation"} == original
    assert body["moderation"]["rule"] == "negative"
    failed = next(o for o in outputs if o.topic.endswith(".dlq"))
    assert failed.headers["filter.error"] == b"missing_text"
    assert b"payload.body" in failed.headers["filter.reason"]
