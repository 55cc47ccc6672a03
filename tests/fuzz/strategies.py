"""What hostile producers send, as hypothesis strategies: any bytes, and JSON that is nearly right.

Random bytes alone rarely get past the JSON parser, so values mix three kinds: arbitrary bytes,
JSON objects whose text field is missing, mistyped, empty, or holds NULs and escaped lone
surrogates, and text with invalid UTF-8 spliced in. Header names are what a Kafka client can hand
over (valid UTF-8, so no lone surrogates), chosen often among the decision's own names.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

from filter_worker.pipeline.records import InputRecord

DECISION_NAMES = [
    "filter.action",
    "filter.label",
    "filter.rule",
    "filter.scope",
    "filter.score",
    "filter.model",
    "filter.source",
    "filter.truncated",
    "filter.shadow",
    "filter.error",
    "filter.reason",
    "filter.value",
    "filter.original-size",
]
# Header names a Kafka client can deliver: any UTF-8 text (C strings: no NUL either).
header_names = st.one_of(
    st.sampled_from([*DECISION_NAMES, "FILTER.ACTION", "Filter.Score", "tenant", "trace", "lang"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
)
header_values = st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"allow", b"kids", b"\xff\xfe", b""]))
headers = st.lists(st.tuples(header_names, header_values), max_size=6)

# Text that JSON can carry and the tokenizer must take: NULs, control characters, emoji, RTL marks.
texts = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.sampled_from(["\x00", "a\x00b", "idiot", "wonderful", " \t\n", "\u202eevil", "😀" * 5, "x" * 3000]),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False), texts
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    """A JSON object with a text field that is right, wrong or absent, and maybe a nested scope field."""
    document: dict[str, Any] = draw(st.dictionaries(texts, json_values, max_size=4))
    text = draw(st.one_of(texts, json_values))
    if draw(st.booleans()):
        document["text"] = text
    if draw(st.booleans()):
        document["meta"] = {"lang": draw(st.sampled_from(["de", "en", 3, None]))}
    if draw(st.booleans()):
        document["moderation"] = {"action": "allow"}  # imitates the embedded decision
    return orjson.dumps(document)


# Escaped lone surrogates and raw NULs are invalid JSON; CESU-8 surrogates and stray bytes invalid UTF-8.
broken_json = st.sampled_from(
    [
        b'{"text": "\\ud800"}',
        b'{"text": "a\\udc00b"}',
        b'{"text": "a\x00b"}',
        b'{"text": "\xed\xa0\x80"}',
        b'{"text": "caf\xe9"}',
        b'{"text": "x"',
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b"\xef\xbb\xbf{}",
        b"null",
        b"",
        b'{"text": "big numbers", "n": 123456789012345678901234567890, "f": 1e308}',
        b'{"text": "kept", "text": 3}',
    ]
)
values = st.one_of(st.none(), st.binary(max_size=200), json_documents(), broken_json, texts.map(str.encode))


@st.composite
def input_records(draw: st.DrawFn, offset: int) -> InputRecord:
    unreadable = draw(st.one_of(st.none(), st.just("a header name is not valid UTF-8 (byte 3 of the name)")))
    return InputRecord(
        topic="in",
        partition=draw(st.integers(0, 3)),
        offset=offset,
        key=draw(st.one_of(st.none(), st.binary(max_size=20))),
        value=draw(values),
        headers=[] if unreadable else draw(headers),
        timestamp_ms=draw(st.one_of(st.none(), st.integers(0, 2**41))),
        unreadable_headers=unreadable,
    )


@st.composite
def batches(draw: st.DrawFn) -> list[InputRecord]:
    """Records with distinct offsets, so each output can be traced to exactly one input."""
    size = draw(st.integers(1, 8))
    return [draw(input_records(offset)) for offset in range(size)]
