"""The decision cache: bounded LRU of probabilities keyed by a hash of the normalized text."""

from __future__ import annotations

import numpy as np
import pytest

from filter_worker.pipeline.cache import DecisionCache, cache_key, normalize


def test_normalization_folds_case_width_and_whitespace_only():
    assert normalize("  FREE\tMoney\n\nnow ") == "free money now"
    assert normalize("ＦＲＥＥ money") == "free money"  # NFKC: full-width letters
    assert normalize("Straße") == normalize("STRASSE")  # case folding, not just lower()
    assert cache_key("Win  a PRIZE") == cache_key("win a prize")
    assert cache_key("win a prize") != cache_key("win a prize!")
    assert len(cache_key("x")) == 16


def test_hit_miss_and_stored_values():
    cache = DecisionCache(size=4)
    key = cache_key("hello")
    assert cache.get(key) is None and key not in cache
    probs = np.array([0.1, 0.9], dtype=np.float32)
    cache.put(key, probs, truncated=True)
    probs[0] = 0.5  # the cache keeps its own copy
    hit = cache.get(key)
    assert hit is not None and hit.truncated is True
    assert np.allclose(hit.probs, [0.1, 0.9])
    with pytest.raises(ValueError):
        hit.probs[0] = 1.0  # shared between records: read-only


def test_least_recently_used_entry_is_evicted_at_the_bound():
    cache = DecisionCache(size=2)
    a, b, c = (cache_key(t) for t in "abc")
    row = np.array([1.0], dtype=np.float32)
    cache.put(a, row, False)
    cache.put(b, row, False)
    assert cache.get(a) is not None  # a is now more recent than b
    cache.put(c, row, False)
    assert len(cache) == 2
    assert a in cache and c in cache and b not in cache


def test_size_zero_is_not_a_cache():
    with pytest.raises(ValueError):
        DecisionCache(0)
