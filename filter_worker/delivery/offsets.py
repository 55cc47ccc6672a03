"""Per-partition watermarks: what may be committed, where to rewind to, and what is in flight.

Records of one partition are consumed in offset order but their outputs are acknowledged by the
broker in any order (different output topics, retries, batches cut by length). The committable
offset of a partition is one past the highest offset below which *every* consumed record has been
acknowledged. Committing anything higher could lose a record on a crash; committing less only
repeats work.

Partitions carry a generation that changes on every assignment and every rewind, so late work from
an earlier one (results of an inference started before a rebalance or an aborted transaction) is
recognised and ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass(slots=True)
class _PartitionState:
    generation: int
    pending: deque[int] = field(default_factory=deque)  # consumed and not yet committable, in offset order
    acked: set[int] = field(default_factory=set)  # acknowledged but not yet at the front
    sizes: dict[int, int] = field(default_factory=dict)  # bytes of each unacknowledged record
    # Outputs beyond the first that a record's acknowledgement waits for (a copy drawn for review).
    more: dict[int, int] = field(default_factory=dict)
    bytes: int = 0  # sum of ``sizes``
    first: int | None = None  # the first offset consumed in this generation
    next_offset: int | None = None  # one past the highest consumed offset
    committed: int | None = None  # last offset handed to a successful commit


class OffsetTracker:
    """Not thread-safe by design: only the Kafka loop thread touches it."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._generations = 0
        self._records = 0
        self._bytes = 0

    def assign(self, tp: TopicPartition) -> int:
        """Start tracking a newly assigned partition; returns its generation."""
        self.revoke(tp)
        self._generations += 1
        self._partitions[tp] = _PartitionState(self._generations)
        return self._generations

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a partition; later acknowledgements for it are ignored."""
        state = self._partitions.pop(tp, None)
        if state is not None:
            self._records -= len(state.sizes)
            self._bytes -= state.bytes

    def rewind(self, tp: TopicPartition) -> int | None:
        """Forget the partition's uncommitted work under a new generation; returns the offset to seek to.

        That is the last committed offset, or, before any commit in this assignment, the first offset
        consumed in it: never past a record that was consumed but not committed, whatever
        ``auto.offset.reset`` says. ``None`` when nothing was consumed since the last commit.
        """
        state = self._partitions.get(tp)
        if state is None:
            return None
        position = state.committed if state.committed is not None else state.first
        self.assign(tp)
        self._partitions[tp].committed = state.committed
        if position is None or position == state.next_offset:
            return None
        return position

    def assigned(self) -> list[TopicPartition]:
        return list(self._partitions)

    def generation(self, tp: TopicPartition) -> int | None:
        state = self._partitions.get(tp)
        return state.generation if state else None

    def is_current(self, tp: TopicPartition, generation: int) -> bool:
        state = self._partitions.get(tp)
        return state is not None and state.generation == generation

    def track(self, tp: TopicPartition, offset: int, size: int = 0) -> int:
        """Register a consumed record of ``size`` bytes; it blocks the watermark until acknowledged.

        Returns the partition's generation, which the record's acknowledgement must carry.
        """
        state = self._partitions[tp]
        if state.next_offset is not None and offset < state.next_offset:
            raise ValueError(f"offset {offset} of {tp} consumed out of order after {state.next_offset - 1}")
        state.pending.append(offset)
        state.sizes[offset] = size
        state.bytes += size
        self._records += 1
        self._bytes += size
        if state.first is None:
            state.first = offset
        state.next_offset = offset + 1
        return state.generation

    def expect_another(self, tp: TopicPartition, offset: int, generation: int) -> None:
        """The record has one more output to be acknowledged before it counts as acknowledged."""
        state = self._partitions.get(tp)
        if state is not None and state.generation == generation and offset in state.sizes:
            state.more[offset] = state.more.get(offset, 0) + 1

    def ack(self, tp: TopicPartition, offset: int, generation: int) -> bool:
        """Mark one of a record's outputs as acknowledged by the broker (the record, once all are).

        ``False`` when the output is of another generation (revoked or rewound since): ignored.
        """
        state = self._partitions.get(tp)
        if state is None or state.generation != generation:
            return False
        if offset not in state.sizes:
            return True
        if state.more:  # almost always empty: no lookup per record
            waiting = state.more.pop(offset, 0)
            if waiting:
                if waiting > 1:
                    state.more[offset] = waiting - 1
                return True
        size = state.sizes.pop(offset)
        state.bytes -= size
        self._records -= 1
        self._bytes -= size
        state.acked.add(offset)
        while state.pending and state.pending[0] in state.acked:
            state.acked.discard(state.pending.popleft())
        return True

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
        """Records consumed whose output is not acknowledged yet, across all partitions.

        What holds memory: a record acknowledged behind a gap (a lower offset still in the model)
        is one integer here until the watermark passes it, so it does not count.
        """
        return self._records

    def in_flight_bytes(self) -> int:
        """The input bytes (key and value) of those records."""
        return self._bytes

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
            if state is not None and (state.committed is None or offset > state.committed):
                state.committed = offset
