"""The dead-letter gate: a run that may still cross the limit is held back, in order, and bounded by it."""

from __future__ import annotations

import pytest

from filter_worker.config import DeadLetterSettings
from filter_worker.delivery.gate import DeadLetterGate
from filter_worker.exit_codes import ExitCode, FatalError
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import InputRecord, Outgoing, OutputRecord

FAILURE = DecodeFailure("invalid_json", "not JSON")


def item(offset: int, dead: bool, partition: int = 0) -> Outgoing:
    record = InputRecord("in", partition, offset, None, b"v", [], None)
    out = OutputRecord("dlq" if dead else "allow", None, b"v", [], None)
    return Outgoing(out, record, 1, "dead_letter" if dead else "allow", FAILURE if dead else None)


def offsets(items: list[Outgoing]) -> list[int]:
    return [i.source.offset for i in items]


def test_a_run_of_dead_letters_waits_until_a_success_ends_it_then_goes_first():
    released: list[Outgoing] = []
    gate = DeadLetterGate(DeadLetterSettings(max_consecutive=5), released.append)
    for offset, dead in [(0, False), (1, True), (2, True)]:
        gate.submit(item(offset, dead))
    assert offsets(released) == [0] and len(gate) == 2
    gate.submit(item(3, False))
    assert offsets(released) == [0, 1, 2, 3]


def test_a_run_that_crosses_the_limit_stops_with_its_dead_letters_never_released():
    released: list[Outgoing] = []
    gate = DeadLetterGate(DeadLetterSettings(max_consecutive=3, max_ratio=1.0), released.append)
    gate.submit(item(0, True))
    gate.submit(item(1, True))
    with pytest.raises(FatalError) as stopped:
        gate.submit(item(2, True))
    assert stopped.value.code == ExitCode.DEAD_LETTER_LIMIT
    assert released == [], "nothing of the failing run reaches the committer"


def test_open_releases_a_stalled_run_and_discard_drops_revoked_partitions():
    released: list[Outgoing] = []
    gate = DeadLetterGate(DeadLetterSettings(max_consecutive=10), released.append)
    for offset in range(3):
        gate.submit(item(offset, True, partition=offset % 2))
    gate.discard(lambda i: i.source.partition != 1)
    gate.open()
    assert offsets(released) == [0, 2] and len(gate) == 0


def test_without_a_consecutive_limit_nothing_is_held():
    """Holding exists for that limit alone; without it a run would be held for ever (and without bound)."""
    released: list[Outgoing] = []
    gate = DeadLetterGate(DeadLetterSettings(max_consecutive=0, max_ratio=1.0), released.append)
    for offset in range(5000):
        gate.submit(item(offset, True))
    assert len(released) == 5000 and len(gate) == 0


def test_a_batch_without_dead_letters_ends_the_run_and_passes_in_order():
    released: list[Outgoing] = []
    gate = DeadLetterGate(DeadLetterSettings(max_consecutive=3, max_ratio=1.0), released.append)
    gate.submit_many([item(0, True), item(1, True)])
    assert released == [] and len(gate) == 2
    gate.submit_many([item(2, False), item(3, False)])
    assert offsets(released) == [0, 1, 2, 3]
    gate.submit_many([item(4, True), item(5, True)])
    with pytest.raises(FatalError):
        gate.submit_many([item(6, True)])


def test_held_dead_letters_dropped_by_a_rewind_leave_the_run():
    """Read again after the rewind, they would otherwise be counted twice and trip the limit early."""
    released: list[Outgoing] = []
    gate = DeadLetterGate(DeadLetterSettings(max_consecutive=10, max_ratio=1.0), released.append)
    for offset in range(6):
        gate.submit(item(offset, dead=True))
    gate.discard(lambda _item: False)  # the partition was rewound
    for offset in range(9):  # the same six, read again, and three more: nine in a row, below ten
        gate.submit(item(offset, dead=True))
    assert len(gate) == 9 and released == []
