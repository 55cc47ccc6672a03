"""Input and output records, and the pure functions that turn a decision into what is published.

The output value is the input value byte for byte (unless embedding is asked for), key and timestamp
are kept, and the decision travels in ``filter.*`` headers, so downstream consumers that ignore
headers see exactly what was produced upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.routing import Decision

HEADER_PREFIX = "filter."
Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None


def _kept_headers(record: InputRecord) -> Headers:
    # Earlier filter.* headers (a record filtered twice) are replaced, so each name appears once.
    return [(k, v) for k, v in record.headers if not k.startswith(HEADER_PREFIX)]


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
    facts: list[tuple[str, str]] = [
        ("action", decision.action),
        ("label", decision.label),
        ("score", f"{decision.score:.6f}"),
        ("rule", decision.rule),
        ("scope", decision.scope),
        ("model", model),
        ("source", record.source),
    ]
    if truncated:
        facts.append(("truncated", "true"))
    if shadow:
        facts.append(("shadow", "true"))
    headers = _kept_headers(record) + [(HEADER_PREFIX + k, v.encode()) for k, v in facts]
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


def dead_letter(record: InputRecord, failure: DecodeFailure, topic: str) -> OutputRecord:
    """The dead-letter form: the untouched value plus what went wrong and where it came from."""
    headers = _kept_headers(record) + [
        ("filter.action", b"dead_letter"),
        ("filter.error", failure.error.encode()),
        ("filter.reason", failure.reason.encode()),
        ("filter.source", record.source.encode()),
    ]
    return OutputRecord(topic, record.key, record.value, headers, record.timestamp_ms)
