"""A bounded cache of recent model outputs, keyed by a hash of the normalized text.

Spam campaigns repeat one text thousands of times; classifying it once is enough. The cache holds
**probabilities**, not actions, so routing rules decide afresh for every record and a change of
rules never meets a stale decision. It is least-recently-used and bounded by ``FILTER_CACHE__SIZE``
entries (about 200 bytes each: a 16-byte key, a few floats, bookkeeping).

Normalization (what counts as "the same text"): Unicode NFKC, case folding, and runs of whitespace
collapsed to one space, with the ends stripped. Collapsing whitespace is exact for WordPiece/BERT
tokenizers, which split on whitespace anyway. NFKC and case folding are **not** exact for a cased
model such as the default one: ``FREE MONEY`` and ``free money`` tokenize differently, and the cache
answers the second with the probabilities of whichever variant it saw first. That is deliberate
(campaigns vary case and look-alike characters to slip past filters, and treating the variants as
one text is what an operator wants), but it means a hit can differ slightly from what the model
would say for that exact spelling. Turn the cache off (size 0) where that matters.

Keys are BLAKE2b digests, so the cache never holds message text, only hashes of it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the form two texts must share to share a cache entry."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def cache_key(text: str) -> bytes:
    """A 128-bit BLAKE2b digest of the normalized text (collisions are negligible at any cache size)."""
    return hashlib.blake2b(normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Cached:
    """What a forward pass said about a text: probabilities per label, and whether the text was truncated."""

    probs: np.ndarray
    truncated: bool


class DecisionCache:
    """LRU map from ``cache_key`` to ``Cached``. Not thread-safe: the Kafka loop is its only user."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1 (a size of 0 means: no cache at all)")
        self._size = size
        self._entries: OrderedDict[bytes, Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> Cached | None:
        """The entry for ``key`` (now the most recently used), or ``None``."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, probs: np.ndarray, truncated: bool) -> None:
        """Store a result, evicting the least recently used entry beyond ``size``."""
        # A copy, read-only: a row view would keep its whole batch's array alive, and a shared array
        # must not be changed by one of its users.
        stored = np.array(probs, dtype=np.float32, copy=True)
        stored.flags.writeable = False
        self._entries[key] = Cached(stored, truncated)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
