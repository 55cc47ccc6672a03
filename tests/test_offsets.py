from __future__ import annotations

import random

import pytest

from filter_worker.delivery.offsets import OffsetTracker

TP = ("in", 0)


def test_watermark_waits_for_the_lowest_unacknowledged_offset():
    t = OffsetTracker()
    gen = t.assign(TP)
    assert t.watermark(TP) is None and t.committable() == {}
    for offset in (10, 11, 12, 13):
        t.track(TP, offset)
    assert t.watermark(TP) == 10
    t.ack(TP, 12, gen)
    t.ack(TP, 11, gen)
    assert t.watermark(TP) == 10
    t.ack(TP, 10, gen)
    assert t.watermark(TP) == 13
    t.ack(TP, 13, gen)
    assert t.watermark(TP) == 14 and t.in_flight() == 0


def test_random_acknowledgement_order_never_commits_past_a_gap():
    rng = random.Random(5)
    t = OffsetTracker()
    gen = t.assign(TP)
    offsets = list(range(0, 400, 2))  # gaps, as after compaction or transaction markers
    for o in offsets:
        t.track(TP, o)
    acked: set[int] = set()
    for o in rng.sample(offsets, len(offsets)):
        t.ack(TP, o, gen)
        acked.add(o)
        mark = t.watermark(TP)
        assert all(x in acked for x in offsets if x < mark)
        unacked = [x for x in offsets if x not in acked]
        assert mark == (unacked[0] if unacked else offsets[-1] + 1)


def test_committable_reports_only_moved_watermarks():
    t = OffsetTracker()
    gen = t.assign(TP)
    other = ("in", 1)
    gen1 = t.assign(other)
    t.track(TP, 0)
    t.track(other, 5)
    t.ack(TP, 0, gen)
    assert t.committable() == {TP: 1, other: 5}
    t.committed({TP: 1, other: 5})
    assert t.committable() == {}
    t.ack(other, 5, gen1)
    assert t.committable() == {other: 6}
    assert t.committable([TP]) == {}


def test_acknowledgements_from_an_old_assignment_are_ignored():
    t = OffsetTracker()
    old = t.assign(TP)
    t.track(TP, 0)
    t.revoke(TP)
    t.ack(TP, 0, old)  # late: partition gone
    new = t.assign(TP)
    assert new != old and not t.is_current(TP, old) and t.is_current(TP, new)
    t.track(TP, 0)
    t.ack(TP, 0, old)
    assert t.watermark(TP) == 0
    t.ack(TP, 0, new)
    assert t.watermark(TP) == 1


def test_out_of_order_consumption_is_a_bug_not_silently_accepted():
    t = OffsetTracker()
    t.assign(TP)
    t.track(TP, 5)
    with pytest.raises(ValueError):
        t.track(TP, 5)
    with pytest.raises(ValueError):
        t.track(TP, 4)


def test_in_flight_counts_records_and_bytes_until_they_are_acknowledged():
    tracker = OffsetTracker()
    gen = tracker.assign(TP)
    for offset, size in ((5, 100), (6, 10), (7, 1)):
        tracker.track(TP, offset, size)
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (3, 111)
    tracker.ack(TP, 6, gen)  # acknowledged behind a gap: not committable yet, but it holds no memory
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (2, 101)
    assert tracker.watermark(TP) == 5
    tracker.ack(TP, 6, gen)  # a second report for the same record changes nothing
    assert tracker.in_flight() == 2
    tracker.ack(TP, 5, gen)
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (1, 1) and tracker.watermark(TP) == 7
    tracker.revoke(TP)
    assert (tracker.in_flight(), tracker.in_flight_bytes()) == (0, 0)


def test_rewind_goes_to_the_last_commit_or_else_the_first_record_consumed():
    """Never to where auto.offset.reset points: records consumed since the last commit would be skipped."""
    tracker = OffsetTracker()
    first = tracker.assign(TP)
    for offset in (40, 41, 42):
        tracker.track(TP, offset)
    assert tracker.rewind(TP) == 40, "before any commit: the first record consumed in this assignment"
    second = tracker.generation(TP)
    assert second != first and tracker.in_flight() == 0
    for offset in (40, 41, 42):
        tracker.track(TP, offset)
    tracker.ack(TP, 40, second)
    tracker.committed({TP: 41})
    tracker.track(TP, 43)
    assert tracker.rewind(TP) == 41, "after a commit: the committed offset"
    tracker.track(TP, 41)
    tracker.committed({TP: 42})
    tracker.ack(TP, 41, tracker.generation(TP))
    assert tracker.rewind(TP) is None, "nothing consumed past the commit: no seek"
    assert tracker.rewind(("other", 0)) is None


def test_highest_decided_ignores_records_still_waiting():
    tracker = OffsetTracker()
    gen = tracker.assign(("t", 0))
    for offset in range(10, 16):
        tracker.track(("t", 0), offset)
    tracker.ack(("t", 0), 10, gen)  # the watermark moves past 10
    assert tracker.highest_decided(("t", 0), undecided={11, 15}) == 14
    assert tracker.highest_decided(("t", 0), undecided={11, 12, 13, 14, 15}) is None
    assert tracker.highest_decided(("t", 1), undecided=set()) is None


def test_a_record_with_a_second_output_is_acknowledged_once_both_are():
    tracker = OffsetTracker()
    generation = tracker.assign(("t", 0))
    for offset in range(3):
        tracker.track(("t", 0), offset, 10)
    tracker.expect_another(("t", 0), 1, generation)  # offset 1 also has a copy for review
    tracker.ack(("t", 0), 0, generation)
    tracker.ack(("t", 0), 1, generation)
    assert tracker.watermark(("t", 0)) == 1 and tracker.in_flight() == 2, "one of 1's two outputs is out"
    tracker.ack(("t", 0), 1, generation)
    tracker.ack(("t", 0), 2, generation)
    assert tracker.watermark(("t", 0)) == 3 and tracker.in_flight() == 0
