"""Per-partition acknowledged watermarks: what may be committed.

Records of one partition are consumed in offset order but their outputs are acknowledged by the
broker in any order (different output topics, retries, batches split by the model). The committable
offset of a partition is one past the highest offset below which *every* consumed record has been
acknowledged. Committing anything higher could lose a record on a crash; committing less only
repeats work.

Partitions carry a generation that changes on every assignment, so late work from a previous
ownership (results of an inference started before a rebalance) is recognised and ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass(slots=True)
class _PartitionState:
    generation: int
    pending: deque[int] = field(default_factory=deque)  # consumed, in offset order
    acked: set[int] = field(default_factory=set)  # acknowledged but not yet at the front
    next_offset: int | None = None  # one past the highest consumed offset
    committed: int | None = None  # last offset handed to a successful commit


class OffsetTracker:
    """Not thread-safe by design: only the Kafka loop thread touches it."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._generations = 0

    def assign(self, tp: TopicPartition) -> int:
        """Start tracking a newly assigned partition; returns its generation."""
        self._generations += 1
        self._partitions[tp] = _PartitionState(self._generations)
        return self._generations

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a partition; later acknowledgements for it are ignored."""
        self._partitions.pop(tp, None)

    def assigned(self) -> list[TopicPartition]:
        return list(self._partitions)

    def generation(self, tp: TopicPartition) -> int | None:
        state = self._partitions.get(tp)
        return state.generation if state else None

    def is_current(self, tp: TopicPartition, generation: int) -> bool:
        state = self._partitions.get(tp)
        return state is not None and state.generation == generation

    def track(self, tp: TopicPartition, offset: int) -> None:
        """Register a consumed record; it blocks the watermark until acknowledged."""
        state = self._partitions[tp]
        if state.pending and offset <= state.pending[-1]:
            raise ValueError(f"offset {offset} of {tp} consumed out of order after {state.pending[-1]}")
        state.pending.append(offset)
        state.next_offset = offset + 1

    def ack(self, tp: TopicPartition, offset: int, generation: int) -> None:
        """Mark a record's output as acknowledged by the broker."""
        state = self._partitions.get(tp)
        if state is None or state.generation != generation:
            return
        state.acked.add(offset)
        while state.pending and state.pending[0] in state.acked:
            state.acked.discard(state.pending.popleft())

    def unacknowledged(self, tp: TopicPartition) -> list[int]:
        """Consumed offsets of ``tp`` still waiting for acknowledgement, in offset order (a copy)."""
        state = self._partitions.get(tp)
        return [o for o in state.pending if o not in state.acked] if state else []

    def highest_decided(self, tp: TopicPartition, undecided: set[int]) -> int | None:
        """The highest consumed offset above the watermark that is not in ``undecided`` (still buffered)."""
        state = self._partitions.get(tp)
        if state is None:
            return None
        return max((o for o in state.pending if o not in undecided), default=None)

    def watermark(self, tp: TopicPartition) -> int | None:
        """The offset a commit may carry now (the next record to read), or ``None`` before any record."""
        state = self._partitions.get(tp)
        if state is None:
            return None
        if state.pending:
            return state.pending[0]
        return state.next_offset

    def in_flight(self) -> int:
        """Records consumed but not yet acknowledged, across all partitions."""
        return sum(len(s.pending) for s in self._partitions.values())

    def committable(self, tps: list[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Watermarks that moved past the last successful commit."""
        result: dict[TopicPartition, int] = {}
        for tp in self._partitions if tps is None else tps:
            state = self._partitions.get(tp)
            mark = self.watermark(tp)
            if state is not None and mark is not None and (state.committed is None or mark > state.committed):
                result[tp] = mark
        return result

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record a successful commit."""
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = offset
