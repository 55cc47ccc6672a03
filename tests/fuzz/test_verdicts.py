"""Verdict records, searched: whatever the review tool (or anyone with write access) sends, a verdict or a reason.

``parse_verdict`` reads a record of the verdict topic; a bad one is skipped with a reason from
``INVALID_REASONS`` and counted, never raised: one bad verdict must not stop the feedback service.
"""

from __future__ import annotations

import math
import re

import orjson
from hypothesis import given
from hypothesis import strategies as st

from filter_worker.moderation.verdicts import INVALID_REASONS, Invalid, Verdict, parse_verdict
from tests.fuzz.strategies import header_values, json_values, texts

DECISION = {
    "filter.action": [b"drop", b"quarantine", b"allow", b"dead_letter", b"\xff", b""],
    "filter.rule": [b"hostile", b"negative", b"rules[0]", b"\xc3"],
    "filter.scope": [b"default", b"kids", b""],
    "filter.score": [b"0.9", b"1.5", b"nan", b"-0.0", b"inf", b"1e-400", b"0_5", b" 0.25 ", b"\xff"],
    "filter.model": [b"m@rev#sha256:00", b"a b", b"x" * 300, b""],
}


@st.composite
def verdict_headers(draw: st.DrawFn) -> list[tuple[str, bytes | None]]:
    headers = []
    for name, choices in DECISION.items():
        for _ in range(draw(st.integers(0, 2))):  # absent, once, or twice (the last counts)
            headers.append((name, draw(st.one_of(st.sampled_from(choices), header_values))))
    extra = st.tuples(st.sampled_from(["filter.sampled", "filter.sample-probability", "x"]), header_values)
    return draw(st.permutations(headers + draw(st.lists(extra, max_size=2))))


@st.composite
def verdict_values(draw: st.DrawFn) -> bytes | None:
    body = {
        "source": draw(st.one_of(st.sampled_from(["in/0/1", "in/0/-1", "in/x/1", "in/١/٢", "/0/1", ""]), json_values)),
        "verdict": draw(st.one_of(st.sampled_from(["abuse", "ok", "ABUSE"]), json_values)),
        "reviewer": draw(st.one_of(texts, json_values)),
    }
    value = orjson.dumps({k: v for k, v in body.items() if draw(st.booleans())})
    return draw(st.one_of(st.just(value), st.none(), st.binary(max_size=40), st.just(b"[" * 3000)))


@given(headers=verdict_headers(), value=verdict_values())
def test_any_verdict_record_is_a_verdict_or_a_reason(headers, value) -> None:
    outcome = parse_verdict(headers, value)
    if isinstance(outcome, Invalid):
        assert outcome.reason in INVALID_REASONS and outcome.detail
        return
    assert isinstance(outcome, Verdict)
    assert 0.0 <= outcome.score <= 1.0 and not math.isnan(outcome.score)
    assert re.fullmatch(r"\S{1,256}", outcome.model)
    topic, partition, offset = outcome.source.rsplit("/", 2)
    assert topic and int(partition) >= 0 and int(offset) >= 0
