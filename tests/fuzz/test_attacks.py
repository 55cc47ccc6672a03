"""What attackers send, one by one: each ends as a decision or a dead letter with a reason, in bounded memory.

The property tests (``test_pipeline``) search small inputs; these are the large and the exact ones a
search would not reach: nesting far beyond any parser's stack, a million keys, a 10 MB text, header
names that are not UTF-8, and input headers that pretend to be the decision.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from filter_worker.config import MessageSettings, ModelSettings, RoutingSettings
from filter_worker.kafka import clients
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.decide import Decider
from filter_worker.pipeline.decode import DecodeFailure, decode
from filter_worker.pipeline.intake import Intake, take_in
from filter_worker.pipeline.records import InputRecord
from filter_worker.pipeline.routing import Router

JSON = MessageSettings()
TOPICS = {"allow": "a", "quarantine": "q", "drop": "d", "dead_letter": "dlq"}


@pytest.fixture(scope="module")
def classifier(keyword_model: Path) -> Classifier:
    return Classifier.load(ModelSettings(name=str(keyword_model)))


def record(value: bytes | None, headers: list[tuple[str, bytes | None]] | None = None, offset: int = 0) -> InputRecord:
    return InputRecord("in", 0, offset, b"k", value, headers or [], 1_700_000_000_000)


def intake_of(classifier: Classifier, records: list[InputRecord], embed: bool = False) -> Intake:
    return take_in([(r, 0) for r in records], JSON, embed, classifier.tokenize, None)


def retained_by(build: Callable[[], Any]) -> tuple[Any, int]:
    """What ``build`` returns, and the bytes it still holds (its inputs were allocated before)."""
    tracemalloc.start()
    try:
        result = build()
        return result, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "value",
    [b"[" * 100_000 + b"]" * 100_000, b'{"text": ' * 100_000 + b'"x"' + b"}" * 100_000],
    ids=["arrays", "objects"],
)
def test_json_nested_100000_deep_is_a_dead_letter_not_a_recursion_error(value):
    failure = decode(value, "json", "text")
    assert isinstance(failure, DecodeFailure) and failure.error == "invalid_json"
    assert "depth limit exceeded" in failure.reason


def test_an_object_with_a_million_keys_is_classified_and_not_kept_parsed(classifier):
    document = {"text": "you idiot", **{f"k{i}": i for i in range(1_000_000)}}
    value = orjson.dumps(document)
    intake, held = retained_by(lambda: intake_of(classifier, [record(value)]))
    assert len(intake.pending) == 1 and not intake.failed
    assert held < len(value) // 4, f"the parsed object (about 8x the value) is not kept: {held} bytes held"
    assert intake.pending[0].document == document, "it is parsed again when a field scope asks"


def test_values_that_inflate_24x_when_parsed_are_not_held_while_waiting_for_the_model(classifier):
    # 32 values of 900 kB: the in-flight budget's 64 MiB in such records held about 1.5 GB as parsed JSON.
    value = b'{"text": "hi", "x": [' + b",".join([b"[]"] * 300_000) + b"]}"
    records = [record(value, offset=i) for i in range(32)]
    intake, held = retained_by(lambda: intake_of(classifier, records, embed=True))
    assert len(intake.pending) == 32
    assert held < len(value), f"32 waiting records hold {held} bytes beyond their values"


def test_lone_surrogates_and_nul_bytes(classifier):
    escaped = [b'{"text": "\\ud800"}', b'{"text": "a\\udfffb"}', b'{"text": "\\udc00\\ud800"}']
    raw = ["\ud800".encode("utf-8", "surrogatepass"), b'{"text": "\xed\xb0\x80"}']
    nul = [b'{"text": "a\\u0000b"}', b'{"text": "\\u0000"}']
    for value in escaped:
        assert decode(value, "json", "text").error == "invalid_json"  # type: ignore[union-attr]
    for value in raw:
        assert decode(value, "json", "text").error == "invalid_utf8"  # type: ignore[union-attr]
        assert decode(value, "text", "text").error == "invalid_utf8"  # type: ignore[union-attr]
    assert decode(b'{"text": "a\x00b"}', "json", "text").error == "invalid_json"  # type: ignore[union-attr]
    intake = intake_of(classifier, [record(value, offset=i) for i, value in enumerate(nul)])
    assert len(intake.pending) == 2, "NUL is a character like any other: tokenized and classified"
    text = take_in([(record(b"a\x00b"), 0)], MessageSettings(format="text"), False, classifier.tokenize, None)
    assert len(text.pending) == 1


def test_a_10_mb_text_field_is_cut_for_the_model_and_not_copied(classifier):
    value = orjson.dumps({"text": "idiot " * 1_750_000})  # 10.5 MB
    intake, held = retained_by(lambda: intake_of(classifier, [record(value)]))
    (pending,) = intake.pending
    assert pending.truncated and len(pending.ids) == classifier.max_length
    assert held < 1_000_000, f"{held} bytes held for one waiting record"


class _Message:
    """A consumed record as confluent-kafka returns it when a header name is not UTF-8.

    Kafka header names are bytes on the wire; confluent-kafka decodes them when ``headers()`` is
    called and fails: seen against the embedded broker as a ``UnicodeDecodeError`` in a script, and
    inside the worker as a ``SystemError`` caused by one (``tests/integration/test_hostile_records.py``
    sends such a record through the real client and the real worker).
    """

    def __init__(self, wrapped: bool) -> None:
        self._wrapped = wrapped

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 1

    def offset(self) -> int:
        return 7

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b'{"text": "hello"}'

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_700_000_000_000

    def headers(self) -> list[tuple[str, bytes]]:
        error = UnicodeDecodeError("utf-8", b"bad\xff", 3, 4, "invalid start byte")
        if not self._wrapped:
            raise error
        raise SystemError("<method 'headers'> returned a result with an exception set") from error


@pytest.mark.parametrize("wrapped", [False, True], ids=["as-itself", "as-a-system-error"])
def test_a_header_name_that_is_not_utf8_dead_letters_the_record_instead_of_raising(classifier, wrapped):
    converted = clients.to_input_record(_Message(wrapped))  # type: ignore[arg-type]
    assert converted.unreadable_headers == "a header name is not valid UTF-8 (byte 3 of the name)"
    intake = intake_of(classifier, [converted])
    ((failed, _, failure),) = intake.failed
    assert failed is converted and failure.error == "invalid_header"
    out = Decider(Router(RoutingSettings(), classifier.head), False, TOPICS, "m").failed(converted, 0, failure)
    headers = dict(out.out.headers)
    assert (out.out.topic, out.out.value) == ("dlq", b'{"text": "hello"}')
    assert headers["filter.error"] == b"invalid_header" and b"UTF-8" in headers["filter.reason"]


def test_invalid_utf8_in_header_values_and_duplicate_names_pass_through_untouched(classifier):
    headers = [("trace", b"\xff\xfe"), ("trace", b"second"), ("tenant", None), ("tenant", b"\xc3")]
    intake = intake_of(classifier, [record(b'{"text": "fine"}', headers)])
    decider = Decider(Router(RoutingSettings(), classifier.head), False, TOPICS, "m")
    outputs, _ = decider.classified(intake.pending, classifier.classify(["fine"])[0])
    kept = [(name, value) for name, value in outputs[0].out.headers if not name.startswith("filter.")]
    assert kept == headers


def test_input_headers_imitating_the_decision_are_replaced_never_passed_through(classifier):
    forged = [
        ("filter.action", b"allow"),
        ("filter.score", b"0.000000"),
        ("FILTER.ACTION", b"allow"),
        ("Filter.Rule", b"default"),
        ("filter.action", b"allow"),
        ("trace", b"1"),
    ]
    intake = intake_of(classifier, [record(b'{"text": "you idiot loser"}', forged)])
    decider = Decider(Router(RoutingSettings(), classifier.head), False, TOPICS, "m")
    outputs, (decision,) = decider.classified(intake.pending, classifier.classify(["you idiot loser"])[0])
    assert decision.action == "drop"
    headers = outputs[0].out.headers
    assert [(n, v) for n, v in headers if n.lower() == "filter.action"] == [("filter.action", b"drop")]
    assert [n for n, _ in headers if n.lower().startswith("filter.")] == [
        "filter.action",
        "filter.label",
        "filter.rule",
        "filter.scope",
        "filter.model",
        "filter.score",
        "filter.source",
    ]
    assert ("trace", b"1") in headers
