"""Decode-and-route, searched: whatever a producer sends, each record ends as one decision or one dead letter.

The pipeline's pure steps run as the worker chains them (intake with the real tokenizer, the decision
cache, scopes matched on a header and on a JSON field, decisions, dead letters cut to fit), on
records drawn by ``strategies``. The model's probabilities are drawn too: what is searched here is
everything around the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from filter_worker.config import MessageSettings, ModelSettings, RoutingSettings, Rule, Scope, ScopeMatch
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.cache import DecisionCache
from filter_worker.pipeline.decide import Classified, Decider
from filter_worker.pipeline.decode import ERROR_CLASSES
from filter_worker.pipeline.intake import take_in
from filter_worker.pipeline.records import HEADER_PREFIX, InputRecord, Outgoing, fitted_dead_letter
from filter_worker.pipeline.routing import ACTIONS, Router
from tests.fuzz.strategies import batches

TOPICS = {"allow": "out.allow", "quarantine": "out.quarantine", "drop": "out.drop", "dead_letter": "out.dlq"}
MODEL = "keyword@local#sha256:0000"
ROUTED_HEADERS = {"filter.action", "filter.label", "filter.rule", "filter.scope", "filter.model", "filter.score"}
ROUTED_HEADERS |= {"filter.source", "filter.truncated", "filter.shadow"}
DEAD_LETTER_HEADERS = {"filter.action", "filter.error", "filter.reason", "filter.source"}
DEAD_LETTER_HEADERS |= {"filter.original-size", "filter.value"}
ROUTING = RoutingSettings(
    rules=[Rule(action="drop", labels=["Very Negative"], min_score=0.6, name="hostile")],
    scopes=[
        Scope(
            name="kids",
            match=ScopeMatch(header="tenant", values=["kids"]),
            rules=[Rule(action="quarantine", labels=["Negative", "Very Negative"], min_score=0.3)],
        ),
        Scope(name="german", match=ScopeMatch(field="meta.lang", values=["de"]), rules=[]),
    ],
)


@pytest.fixture(scope="module")
def classifier(keyword_model: Path) -> Classifier:
    return Classifier.load(ModelSettings(name=str(keyword_model)))


def _probabilities(count: int, labels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(labels), size=count).astype(np.float32)


def _is_ours(name: str) -> bool:
    return name.lower().startswith(HEADER_PREFIX)


def _check_output(out: Outgoing, record: InputRecord, fmt: str, embed: bool) -> None:
    names = [name for name, _ in out.out.headers]
    ours = [name for name in names if _is_ours(name)]
    allowed = DEAD_LETTER_HEADERS if out.action == "dead_letter" else ROUTED_HEADERS
    assert set(ours) <= allowed, "no input header that imitates the decision passes through"
    assert len(ours) == len(set(ours)), "each decision header once"
    assert all(isinstance(value, bytes) for name, value in out.out.headers if _is_ours(name))
    kept = [(name, value) for name, value in record.headers if not _is_ours(name)]
    assert [(n, v) for n, v in out.out.headers if not _is_ours(n)] == kept, "the record's other headers, in order"
    decision = dict(out.out.headers)
    assert decision["filter.source"] == record.source.encode()
    assert (out.out.key, out.out.timestamp_ms) == (record.key, record.timestamp_ms)
    if out.action == "dead_letter":
        assert decision["filter.action"] == b"dead_letter"
        assert out.error in ERROR_CLASSES and decision["filter.error"] == out.error.encode()
        assert decision["filter.reason"], "a dead letter says why"
        assert out.out.value == record.value, "a dead letter keeps the value untouched"
        return
    assert out.out.topic == TOPICS[out.action] and decision["filter.action"].decode() in ACTIONS
    if not embed:
        assert out.out.value == record.value, "the value byte for byte"
        return
    body = orjson.loads(out.out.value or b"")
    moderation = body.pop("moderation")
    assert moderation["action"] == decision["filter.action"].decode(), "an input 'moderation' field is replaced"
    if fmt == "text":
        assert body == {"text": (record.value or b"").decode()}
        return
    original = orjson.loads(record.value or b"")
    original.pop("moderation", None)
    assert body == original, "the embedded form holds the input's fields"


def _route(classifier: Classifier, items: Sequence[Classified], decider: Decider, seed: int) -> list[Outgoing]:
    if not items:
        return []
    outputs, decisions = decider.classified(items, _probabilities(len(items), len(classifier.labels), seed))
    assert len(outputs) == len(decisions) == len(items)
    return outputs


@given(
    records=batches(),
    fmt=st.sampled_from(["json", "text"]),
    embed=st.booleans(),
    shadow=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    dead_letter_max=st.integers(1, 4096),
)
def test_every_record_ends_as_one_decision_or_one_dead_letter(
    classifier: Classifier,
    records: list[InputRecord],
    fmt: str,
    embed: bool,
    shadow: bool,
    seed: int,
    dead_letter_max: int,
) -> None:
    message = MessageSettings(format=fmt, text_field="text")  # type: ignore[arg-type]
    decider = Decider(Router(ROUTING, classifier.head), shadow, TOPICS, MODEL)
    cache = DecisionCache(64)
    by_offset = {record.offset: record for record in records}
    for turn in ("model", "cache"):  # the second turn finds every classified text in the cache
        intake = take_in([(record, 0) for record in records], message, embed, classifier.tokenize, cache)
        outputs = _route(classifier, intake.pending, decider, seed) + _route(classifier, intake.answered, decider, seed)
        outputs += [decider.failed(record, generation, failure) for record, generation, failure in intake.failed]
        assert sorted(out.source.offset for out in outputs) == sorted(by_offset), f"{turn}: each record exactly once"
        assert turn == "model" or not intake.pending, "every repeat is answered from the cache"
        for out in outputs:
            _check_output(out, by_offset[out.source.offset], fmt, embed)
        for pending in intake.pending:
            cache.put(pending.cache_key, np.full(len(classifier.labels), 0.2), pending.truncated)  # type: ignore[arg-type]
        for record, _, failure in intake.failed:
            fitted = fitted_dead_letter(record, failure, TOPICS["dead_letter"], dead_letter_max)
            form = dict(fitted.headers)["filter.value"]
            assert form == b"omitted" or fitted.size <= dead_letter_max, "a cut dead letter fits"
