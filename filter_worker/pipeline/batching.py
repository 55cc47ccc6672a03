"""Micro-batching by padded-token budget.

A forward pass costs roughly (rows x longest row), so the batcher reasons in padded tokens, not
records: records are accumulated until a count, a token budget or a wait limit is reached, then sorted
by length and cut into forward batches so that one long message does not make thirty short ones pay
for its padding. Plain functions and a clock passed in, so it is tested without a model or Kafka.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

# What a forward pass on a CPU costs beyond its padded tokens, in tokens: fitted from passes of up to
# 64 rows x 256 tokens, it was 48 (torch float32), 94 (torch bfloat16) and 68-102 (OpenVINO bfloat16)
# on an AMX Xeon; the batches chosen with it cost within 4 % of each other for any value from 16 to
# 272 in a simulation of the bench mix (docs/performance.md, "Batches of the oldest record's length").
CPU_PASS_OVERHEAD_TOKENS = 64.0


def pass_overhead(device: str) -> float | None:
    """What a pass costs beyond its padded tokens on ``device``; ``None`` keeps batches whole.

    Measured on CPUs only. On a GPU a pass of a few thousand tokens costs mostly its launch, so
    smaller batches there would only add launches.
    """
    return CPU_PASS_OVERHEAD_TOKENS if device == "cpu" else None


def plan_batches(
    lengths: Sequence[int], max_size: int, max_tokens: int, min_efficiency: float = 0.5
) -> list[list[int]]:
    """Group indices into forward batches of at most ``max_size`` rows and ``max_tokens`` padded tokens.

    Indices are taken in ascending length order, so each batch holds similar lengths, and a batch is
    closed early when the next (longer) row would make less than ``min_efficiency`` of its padded
    tokens real: a few long messages then form their own batch instead of widening a full batch of
    short ones. A single row longer than the budget still gets a batch of its own: it must be
    classified, not dropped.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        # Ascending order: the newest row is the longest, so it sets the padded width.
        width = lengths[index]
        padded = (len(current) + 1) * width
        if current and (len(current) >= max_size or padded > max_tokens or real + width < min_efficiency * padded):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += width
    if current:
        batches.append(current)
    return batches


def choose_bucket(lengths: Sequence[int], size: int, pass_overhead: float | None = None) -> list[int]:
    """Indices of at most ``size`` items, contiguous in length order, that include item 0 and cost the least.

    Item 0 is the oldest. Without ``pass_overhead``, the batch is ``size`` items and the window with
    the fewest padded-but-empty tokens (rows x longest row - real tokens) wins; ties go to the shorter
    lengths. With it (what a pass costs beyond its padded tokens, in tokens), a smaller window may win:
    of ``size`` items or a power of two below it, the one whose cost (overhead + rows x longest row)
    is the smallest multiple of what its rows would cost in sorted full batches (overhead / size +
    its own length each). An old long message then goes with the few of its length instead of
    padding thirty short ones to its width, and short ones still fill whole batches, because a small
    batch pays the overhead for few rows. Ties go to the larger batch, then to the shorter lengths.
    Powers of two keep the choice to a dozen numpy passes at the largest batch size; in a simulation
    of the bench mix they chose batches as cheap as every size from 1 to 32 did (within 1 %).
    """
    widths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(widths, kind="stable")  # by length, then by age
    if len(order) <= size:
        return [int(i) for i in order]
    position = int(np.flatnonzero(order == 0)[0])
    ordered = widths[order]
    if pass_overhead is None:
        prefix = np.concatenate(([0], np.cumsum(ordered)))
        starts = np.arange(max(0, position - size + 1), min(position, len(order) - size) + 1)
        ends = starts + size
        waste = size * ordered[ends - 1] - (prefix[ends] - prefix[starts])
        best = int(starts[int(np.argmin(waste))])  # the first minimum: the shorter lengths
        return [int(i) for i in order[best : best + size]]
    ideal = np.concatenate(([0.0], np.cumsum(pass_overhead / size + ordered)))
    best_ratio, best_start, best_rows = np.inf, position, 1
    sizes = [size, *(1 << j for j in range(size.bit_length() - 1, -1, -1) if 1 << j < size)]
    for rows in sizes:  # larger batches first: they win ties
        starts = np.arange(max(0, position - rows + 1), min(position, len(order) - rows) + 1)
        ends = starts + rows
        ratios = (pass_overhead + rows * ordered[ends - 1]) / (ideal[ends] - ideal[starts])
        i = int(np.argmin(ratios))
        if ratios[i] < best_ratio * (1 - 1e-9):
            best_ratio, best_start, best_rows = float(ratios[i]), int(starts[i]), rows
    return [int(i) for i in order[best_start : best_start + best_rows]]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the forward passes will process, padding included."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)


@dataclass(slots=True)
class _Pending(Generic[T]):
    item: T
    tokens: int
    arrived: float


class BatchBuffer(Generic[T]):
    """Collects items until a batch is due: ``max_size`` items, ``max_tokens`` tokens, or ``max_wait_s``.

    The wait is measured from the oldest item, which bounds the latency a quiet stream adds.
    ``pass_overhead`` (see ``choose_bucket``) lets a batch taken from a backlog be smaller than
    ``max_size`` where that costs less per record.
    """

    def __init__(
        self,
        max_size: int,
        max_tokens: int,
        max_wait_s: float,
        clock: Callable[[], float],
        pass_overhead: float | None = None,
    ) -> None:
        self._max_size = max_size
        self._pass_overhead = pass_overhead
        self._max_tokens = max_tokens
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[_Pending[T]] = []
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, tokens: int) -> None:
        self._items.append(_Pending(item, tokens, self._clock()))
        self._tokens += tokens

    def due(self) -> bool:
        if not self._items:
            return False
        return self.full() or self._clock() - self._items[0].arrived >= self._max_wait_s

    def ready(self, model_busy: bool) -> bool:
        """Whether to hand the model a batch now.

        An idle model takes a due batch. A busy one takes a batch only when a whole batch is buffered,
        queued behind its running pass (``take`` may still choose fewer records from it, on a CPU): a
        partial buffer queued there would just wait while records that could have joined it arrive,
        adding a forward pass to their latency; taken when the pass ends, it includes them.
        """
        return self.due() and (not model_busy or self.full())

    def full(self) -> bool:
        """A whole batch is buffered (``max_size`` items or ``max_tokens`` tokens)."""
        return len(self._items) >= self._max_size or self._tokens >= self._max_tokens

    def time_to_due(self) -> float | None:
        """Seconds until the wait limit makes a batch due; ``None`` when empty."""
        if not self._items:
            return None
        return max(0.0, self._items[0].arrived + self._max_wait_s - self._clock())

    def take(self) -> list[T]:
        """Remove and return up to ``max_size`` items of similar length, always including the oldest.

        When more than a batch is buffered (a backlog: the model is the bottleneck), the batch is
        the run of items, in length order, around the oldest item that costs least
        (``choose_bucket``). Without this, batches cut in arrival order mix a dozen-token chat line
        with a few-hundred-token message and pay for its padding thirty times over; choosing only
        from the buffer's own length order would let a long message wait forever. Including the
        oldest item bounds every item's wait by the number of items ahead of it, in batches taken.
        A buffer of exactly ``max_size`` items (a burst's first read) goes out whole.

        The choice is made among everything buffered, which the caller bounds (the worker: 32 batches'
        worth). Choosing among the oldest few batches' worth only left the worker's padding, and so its
        keep-up, well below the whole buffer's at a backlog (docs/performance.md, "Batches chosen from
        the whole buffer"); the numpy choice over a thousand items takes well under a millisecond of the
        loop thread, beside passes of tens of milliseconds on the model's.
        """
        size = self._max_size
        items = self._items
        chosen: Sequence[int] = range(len(items))
        if len(items) > size:
            chosen = sorted(choose_bucket([p.tokens for p in items], size, self._pass_overhead))
        picked = set(chosen)
        taken = [items[i] for i in chosen]
        self._items = [p for i, p in enumerate(items) if i not in picked]
        self._tokens -= sum(p.tokens for p in taken)
        return [p.item for p in taken]

    def extract(self, match: Callable[[T], bool]) -> list[T]:
        """Remove and return the items ``match`` selects, in arrival order (repeats answered from a cache)."""
        taken = [p.item for p in self._items if match(p.item)]
        if taken:
            self._items = [p for p in self._items if not match(p.item)]
            self._tokens = sum(p.tokens for p in self._items)
        return taken

    def discard(self, keep: Callable[[T], bool]) -> int:
        """Drop items for which ``keep`` is false (revoked partitions); returns how many were dropped."""
        before = len(self._items)
        self._items = [p for p in self._items if keep(p.item)]
        self._tokens = sum(p.tokens for p in self._items)
        return before - len(self._items)
