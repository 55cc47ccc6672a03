"""Consumed records -> what the model must classify, what the cache already knows, and what cannot be classified.

The first step after consume: decode every record of a fetched batch, answer repeats from the decision
cache, and tokenize the rest in one call (the fast tokenizer works on the whole list in Rust). Each
result carries its input record, and with it the source offset, to the end of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from filter_worker.config import MessageSettings
from filter_worker.pipeline.cache import DecisionCache, cache_key
from filter_worker.pipeline.decode import DecodeFailure, decode
from filter_worker.pipeline.records import InputRecord


class Tokens(Protocol):
    """What the tokenizer returns per text: token ids, and whether the text was cut to fit."""

    @property
    def ids(self) -> list[int]: ...

    @property
    def truncated(self) -> bool: ...


Tokenize = Callable[[Sequence[str]], Sequence[Tokens]]


@dataclass(slots=True)
class Pending:
    """A record waiting for the model.

    It keeps no parsed JSON value: parsed, a value takes up to 24 times its size in memory (measured
    on ``[[],[],...]``), and up to 32 batches wait here, so an attacker's values could turn the
    in-flight budget's 64 MiB into gigabytes. ``document`` (for scopes that match a field, decided
    under the rules in force then) and ``embed_into`` (what the embedded output extends) parse the
    value again when asked: never without field scopes or embedding, once or twice per record with.
    """

    record: InputRecord
    generation: int
    ids: list[int]
    truncated: bool
    is_json: bool  # the value is a JSON object (format json), not plain text
    embed: bool  # the output is the embedded form
    cache_key: bytes | None = None  # set when the decision cache is on

    @property
    def document(self) -> dict[str, Any] | None:
        """The value's JSON object (``None`` for text)."""
        return _reparsed(self.record) if self.is_json else None

    @property
    def embed_into(self) -> dict[str, Any] | None:
        """What the embedded output extends: the JSON object, or ``{"text": ...}``; ``None`` without embedding."""
        if not self.embed:
            return None
        return _reparsed(self.record) if self.is_json else {"text": (self.record.value or b"").decode("utf-8")}


def _reparsed(record: InputRecord) -> dict[str, Any]:
    """The JSON object ``decode`` already accepted once, so it parses again."""
    document: dict[str, Any] = orjson.loads(record.value or b"")
    return document


@dataclass(slots=True)
class Answered:
    """A record whose text the cache (or a finished batch) already classified."""

    record: InputRecord
    generation: int
    probs: np.ndarray
    truncated: bool
    document: dict[str, Any] | None
    embed_into: dict[str, Any] | None


@dataclass(slots=True)
class Intake:
    pending: list[Pending] = field(default_factory=list)
    answered: list[Answered] = field(default_factory=list)
    failed: list[tuple[InputRecord, int, DecodeFailure]] = field(default_factory=list)


def take_in(
    records: Sequence[tuple[InputRecord, int]],
    message: MessageSettings,
    embed: bool,
    tokenize: Tokenize,
    cache: DecisionCache | None,
) -> Intake:
    """Sort a fetched batch (records with their partition generation) into the three kinds."""
    intake = Intake()
    texts: list[str] = []
    waiting: list[tuple[InputRecord, int, bytes | None]] = []
    is_json = message.format == "json"
    for record, generation in records:
        if record.unreadable_headers is not None:
            intake.failed.append((record, generation, DecodeFailure("invalid_header", record.unreadable_headers)))
            continue
        decoded = decode(record.value, message.format, message.text_field)
        if isinstance(decoded, DecodeFailure):
            intake.failed.append((record, generation, decoded))
            continue
        key = cache_key(decoded.text) if cache is not None else None
        hit = cache.get(key) if cache is not None and key is not None else None
        if hit is not None:  # decided in this turn: the parsed value lives no longer than the record's intake
            embed_into = None
            if embed:
                embed_into = decoded.document if decoded.document is not None else {"text": decoded.text}
            intake.answered.append(Answered(record, generation, hit.probs, hit.truncated, decoded.document, embed_into))
            continue
        texts.append(decoded.text)
        waiting.append((record, generation, key))
    if texts:
        for (record, generation, key), tokens in zip(waiting, tokenize(texts), strict=True):
            intake.pending.append(Pending(record, generation, tokens.ids, tokens.truncated, is_json, embed, key))
    return intake
