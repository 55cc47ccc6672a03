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

    ``document`` is the parsed JSON value (``None`` for text): scopes match its fields when the
    record is decided, under the rules in force then. ``embed_into`` is what the embedded output
    extends, when embedding is on.
    """

    record: InputRecord
    generation: int
    ids: list[int]
    truncated: bool
    document: dict[str, Any] | None
    embed_into: dict[str, Any] | None
    cache_key: bytes | None = None  # set when the decision cache is on


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
    waiting: list[tuple[InputRecord, int, dict[str, Any] | None, dict[str, Any] | None, bytes | None]] = []
    for record, generation in records:
        decoded = decode(record.value, message.format, message.text_field)
        if isinstance(decoded, DecodeFailure):
            intake.failed.append((record, generation, decoded))
            continue
        embed_into = None
        if embed:
            embed_into = decoded.document if decoded.document is not None else {"text": decoded.text}
        key = cache_key(decoded.text) if cache is not None else None
        hit = cache.get(key) if cache is not None and key is not None else None
        document = decoded.document
        if hit is not None:
            intake.answered.append(Answered(record, generation, hit.probs, hit.truncated, document, embed_into))
            continue
        texts.append(decoded.text)
        waiting.append((record, generation, document, embed_into, key))
    if texts:
        for (record, generation, document, embed_into, key), tokens in zip(waiting, tokenize(texts), strict=True):
            intake.pending.append(Pending(record, generation, tokens.ids, tokens.truncated, document, embed_into, key))
    return intake
