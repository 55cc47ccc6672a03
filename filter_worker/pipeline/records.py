"""Input and output records, and the pure functions that turn a decision into what is published.

The output value is the input value byte for byte (unless embedding is asked for), key and timestamp
are kept, and the decision travels in ``filter.*`` headers, so downstream consumers that ignore
headers see exactly what was produced upstream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.routing import Decision

HEADER_PREFIX = "filter."
# A header without a value (``None``) is possible in Kafka, and kept as it came.
Headers = list[tuple[str, bytes | None]]


# A NamedTuple, not a frozen dataclass: as immutable, built in a third of the time (one per record).
class InputRecord(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None
    # Why the client could not hand over the headers (a header name that is not UTF-8), or None. Such
    # a record is dead-lettered, without its headers: nothing can read them.
    unreadable_headers: str | None = None

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


# A NamedTuple, not a frozen dataclass: as immutable, built in a third of the time (one per record).
class OutputRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None

    @property
    def size(self) -> int:
        """Bytes of key, value and headers: what a size limit is checked against (batch overhead aside)."""
        headers = sum(len(k) + len(v or b"") for k, v in self.headers)
        return len(self.key or b"") + len(self.value or b"") + headers


@dataclass(slots=True)
class Outgoing:
    """An output on its way to the broker, carrying the input record whose offset it settles.

    ``action`` is where it goes (allow, quarantine, drop, dead_letter, or review for a copy drawn for
    review); ``failure`` is why a dead letter is one. ``review`` is that copy of the routed output,
    when the record was drawn (``pipeline/sampling.py``): it is published with the output, and the
    record counts as acknowledged once both are.
    """

    out: OutputRecord
    source: InputRecord
    generation: int
    action: str
    failure: DecodeFailure | None = None
    review: OutputRecord | None = None

    @property
    def error(self) -> str | None:
        return self.failure.error if self.failure is not None else None


@functools.lru_cache(maxsize=4096)
def _decision_headers(action: str, label: str, rule: str, scope: str, model: str) -> Headers:
    """The headers a decision shares with every record decided alike, encoded once.

    All five come from configuration and the model, so the combinations are few; per record only the
    score and the source are formatted.
    """
    return [
        ("filter.action", action.encode()),
        ("filter.label", label.encode()),
        ("filter.rule", rule.encode()),
        ("filter.scope", scope.encode()),
        ("filter.model", model.encode()),
    ]


def _kept_headers(record: InputRecord) -> Headers:
    # Earlier filter.* headers (a record filtered twice, or a producer imitating a decision) are
    # replaced, so each name appears once. In any case: Kafka header names are case-sensitive, but
    # HTTP bridges and sink connectors turn them into HTTP headers, where FILTER.ACTION is filter.action.
    return [(k, v) for k, v in record.headers if k[:7].lower() != HEADER_PREFIX] if record.headers else []


def routed(
    record: InputRecord,
    decision: Decision,
    topic: str,
    model: str,
    truncated: bool,
    embed_into: dict[str, Any] | None = None,
    shadow: bool = False,
) -> OutputRecord:
    """The published form of a classified record.

    ``embed_into`` (the parsed JSON object, or ``{"text": ...}`` for plain-text input) switches to the
    embedded form: a JSON value holding the original fields plus a ``moderation`` object. ``shadow``
    marks a decision that was recorded but not enforced (the record goes to the allow topic).
    """
    headers = _kept_headers(record)
    headers += _decision_headers(decision.action, decision.label, decision.rule, decision.scope, model)
    headers += [("filter.score", b"%.6f" % decision.score), ("filter.source", record.source.encode())]
    if truncated:
        headers.append(("filter.truncated", b"true"))
    if shadow:
        headers.append(("filter.shadow", b"true"))
    value = record.value
    if embed_into is not None:
        moderation = {
            "action": decision.action,
            "label": decision.label,
            "score": decision.score,
            "rule": decision.rule,
            "scope": decision.scope,
            "scores": decision.scores,
            "model": model,
            "source": record.source,
            "truncated": truncated,
            "shadow": shadow,
        }
        value = orjson.dumps({**embed_into, "moderation": moderation})
    return OutputRecord(topic, record.key, value, headers, record.timestamp_ms)


def _dead_letter_headers(record: InputRecord, failure: DecodeFailure) -> Headers:
    return [
        ("filter.action", b"dead_letter"),
        ("filter.error", failure.error.encode()),
        ("filter.reason", failure.reason.encode()),
        ("filter.source", record.source.encode()),
    ]


def dead_letter(record: InputRecord, failure: DecodeFailure, topic: str) -> OutputRecord:
    """The dead-letter form: the untouched value plus what went wrong and where it came from."""
    headers = _kept_headers(record) + _dead_letter_headers(record, failure)
    return OutputRecord(topic, record.key, record.value, headers, record.timestamp_ms)


# Room left for what a size limit counts beyond key, value and headers (record and batch framing).
_FRAMING_BYTES = 1024


def fitted_dead_letter(record: InputRecord, failure: DecodeFailure, topic: str, max_bytes: int) -> OutputRecord:
    """A dead letter that fits in ``max_bytes``: the value cut to fit, or left out with the record's own headers.

    A record too big for the outputs must still leave its partition, or everything behind it waits
    forever. What is kept says so: ``filter.value`` is ``cut`` (the first bytes of the value) or
    ``omitted`` (no value, and only the ``filter.*`` headers), and ``filter.original-size`` gives the
    value's size, so the record can be fetched from the input topic by ``filter.source`` while it is
    retained.
    """
    original = len(record.value or b"")
    facts = _dead_letter_headers(record, failure) + [("filter.original-size", str(original).encode())]
    kept = _kept_headers(record)
    cut = OutputRecord(topic, record.key, None, [*kept, *facts, ("filter.value", b"cut")], record.timestamp_ms)
    room = max_bytes - cut.size - _FRAMING_BYTES
    if room > 0:
        return OutputRecord(topic, record.key, (record.value or b"")[:room], cut.headers, record.timestamp_ms)
    return omitted_dead_letter(record, failure, topic, max_bytes)


def omitted_dead_letter(
    record: InputRecord, failure: DecodeFailure, topic: str, max_bytes: int | None = None, keep_key: bool = True
) -> OutputRecord:
    """The smallest dead letter: where it came from and why; no value, none of the record's headers.

    The key stays unless it alone is too large (more than ``max_bytes`` with the rest) or ``keep_key``
    is false (it was refused with the key): the last form must fit whatever the record held, or the
    partition stops behind it. Then ``filter.key`` is ``omitted`` and ``filter.original-key-size`` says
    how large it was.
    """
    original = len(record.value or b"")
    headers = _dead_letter_headers(record, failure) + [
        ("filter.original-size", str(original).encode()),
        ("filter.value", b"omitted"),
    ]
    key = record.key
    if key is not None:
        size = len(key) + sum(len(k) + len(v or b"") for k, v in headers) + _FRAMING_BYTES
        if not keep_key or (max_bytes is not None and size > max_bytes):
            headers += [("filter.key", b"omitted"), ("filter.original-key-size", str(len(key)).encode())]
            key = None
    return OutputRecord(topic, key, None, headers, record.timestamp_ms)
