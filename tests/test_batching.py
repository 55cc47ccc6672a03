from __future__ import annotations

import random

from filter_worker.pipeline.batching import (
    CPU_PASS_OVERHEAD_TOKENS,
    BatchBuffer,
    choose_bucket,
    padded_tokens,
    pass_overhead,
    plan_batches,
)
from tests.clock import ManualClock


def test_batches_respect_size_and_token_budget_and_cover_every_index():
    rng = random.Random(3)
    lengths = [rng.choice([8, 10, 12, 14, 300]) for _ in range(200)]
    batches = plan_batches(lengths, max_size=32, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        assert len(batch) <= 32
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 1024


def test_length_sorting_cuts_padding():
    lengths = [300 if i % 32 == 0 else 10 for i in range(128)]
    arrival_order = [list(range(i, i + 32)) for i in range(0, 128, 32)]
    planned = plan_batches(lengths, max_size=32, max_tokens=100_000)
    assert padded_tokens(lengths, planned) < padded_tokens(lengths, arrival_order) / 4


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    assert plan_batches([5, 600, 5], max_size=8, max_tokens=100) == [[0, 2], [1]]


def test_buffer_is_due_on_count_tokens_or_wait():
    clock = ManualClock()
    buf: BatchBuffer[str] = BatchBuffer(max_size=3, max_tokens=50, max_wait_s=0.0625, clock=clock)
    assert not buf.due() and buf.time_to_due() is None
    buf.add("a", 10)
    buf.add("b", 10)
    assert not buf.due()
    assert abs(buf.time_to_due() - 0.0625) < 1e-9
    clock.now += 0.0625
    assert buf.due()
    clock.now -= 0.0625
    buf.add("c", 10)
    assert buf.due()  # count
    assert buf.take() == ["a", "b", "c"] and len(buf) == 0
    buf.add("big", 60)
    assert buf.due()  # tokens


def test_a_busy_model_is_handed_only_full_batches_an_idle_one_any_due_batch():
    clock = ManualClock()
    buf: BatchBuffer[str] = BatchBuffer(max_size=3, max_tokens=50, max_wait_s=0.0625, clock=clock)
    assert not buf.ready(model_busy=False)  # empty
    buf.add("a", 10)
    assert not buf.ready(model_busy=False)  # not yet waited for
    clock.now += 0.0625
    assert buf.ready(model_busy=False)
    assert not buf.ready(model_busy=True)  # due but partial: better taken when the running pass ends
    buf.add("b", 10)
    buf.add("c", 10)
    assert buf.full() and buf.ready(model_busy=True)  # full by count
    buf.take()
    buf.add("long", 50)
    assert buf.full() and buf.ready(model_busy=True)  # full by tokens


def test_take_keeps_overflow_with_its_original_age_and_discard_filters():
    clock = ManualClock()
    buf: BatchBuffer[int] = BatchBuffer(max_size=2, max_tokens=10**6, max_wait_s=1.0, clock=clock)
    for i in range(5):
        buf.add(i, 1)
    assert buf.take() == [0, 1]
    clock.now += 0.5
    assert abs(buf.time_to_due() - 0.5) < 1e-9  # item 2 arrived at t=100, not at take time
    assert buf.discard(lambda i: i != 3) == 1
    assert buf.take() == [2, 4]


def test_take_groups_similar_lengths_around_the_oldest_item():
    clock = ManualClock()
    buf: BatchBuffer[str] = BatchBuffer(max_size=3, max_tokens=10**6, max_wait_s=1.0, clock=clock)
    for name, tokens in [("long-old", 200), ("s1", 10), ("l1", 190), ("s2", 11), ("l2", 210), ("s3", 12)]:
        buf.add(name, tokens)
    assert buf.take() == ["long-old", "l1", "l2"]  # the oldest, with its closest lengths, arrival order
    assert buf.take() == ["s1", "s2", "s3"]
    assert len(buf) == 0


def test_every_item_is_taken_within_as_many_batches_as_were_buffered_ahead_of_it():
    rng = random.Random(5)
    clock = ManualClock()
    buf: BatchBuffer[int] = BatchBuffer(max_size=4, max_tokens=10**6, max_wait_s=1.0, clock=clock)
    for i in range(40):
        buf.add(i, rng.choice([5, 6, 7, 300]))
    taken_in: dict[int, int] = {}
    batch = 0
    while len(buf):
        for item in buf.take():
            taken_in[item] = batch
        batch += 1
    assert sorted(taken_in) == list(range(40))
    assert all(taken_in[i] <= i for i in range(40)), "the oldest item is always in the next batch"


def test_choose_bucket_minimises_padding_among_windows_holding_item_zero():
    lengths = [10, 50, 11, 12, 49, 48, 13]
    assert sorted(choose_bucket(lengths, 3)) == [0, 2, 3]
    assert sorted(choose_bucket([48, 10, 11, 12, 49, 50], 3)) == [0, 4, 5]


def test_extract_removes_matching_items_and_their_tokens():
    clock = ManualClock()
    buf: BatchBuffer[str] = BatchBuffer(max_size=10, max_tokens=25, max_wait_s=1.0, clock=clock)
    for name in ["a", "dup", "b", "dup"]:
        buf.add(name, 10)
    assert buf.due()  # 40 tokens
    assert buf.extract(lambda x: x == "dup") == ["dup", "dup"]
    assert len(buf) == 2 and not buf.due()  # 20 tokens left: below the budget
    assert buf.extract(lambda x: x == "z") == []
    assert buf.take() == ["a", "b"]


def test_take_chooses_the_batch_around_the_oldest_from_the_whole_buffer():
    """A record of the oldest's length far behind in the buffer still joins it, instead of a short one near."""
    clock = ManualClock()
    buf: BatchBuffer[str] = BatchBuffer(max_size=2, max_tokens=10**6, max_wait_s=1.0, clock=clock)
    buf.add("long-old", 200)
    for i in range(20):
        buf.add(f"short{i}", 10)
    buf.add("long-new", 200)
    assert buf.take() == ["long-old", "long-new"]
    assert buf.take() == ["short0", "short1"]


def test_with_a_pass_overhead_an_old_long_message_goes_with_the_few_of_its_length():
    lengths = [200] + [10] * 40 + [190, 205, 210]
    whole = choose_bucket(lengths, 32)
    assert len(whole) == 32 and sum(lengths[i] == 10 for i in whole) == 28  # 28 short rows padded to 200+
    assert sorted(choose_bucket(lengths, 32, pass_overhead=64.0)) == [0, 41, 42, 43]


def test_with_a_pass_overhead_short_messages_still_fill_whole_batches():
    assert len(choose_bucket([10] * 40, 32, pass_overhead=64.0)) == 32
    assert len(choose_bucket([12] + [10] * 20 + [11] * 20, 32, pass_overhead=64.0)) == 32


def _drain(lengths: list[int], size: int, pass_overhead: float | None) -> tuple[float, dict[int, int]]:
    """Take every item of a backlog; the passes' cost as (overhead + rows x longest), and each item's batch."""
    clock = ManualClock()
    buf: BatchBuffer[int] = BatchBuffer(size, 10**9, 1.0, clock, pass_overhead=pass_overhead)
    for i, n in enumerate(lengths):
        buf.add(i, n)
    cost, taken_in, batch = 0.0, {}, 0
    while len(buf):
        items = buf.take()
        cost += 64.0 + len(items) * max(lengths[i] for i in items)
        taken_in.update((i, batch) for i in items)
        batch += 1
    return cost, taken_in


def test_a_pass_overhead_lowers_the_cost_of_a_backlog_and_keeps_every_wait_bounded():
    """A long-tailed backlog (chat lines and a few long messages), seeded: cheaper under the same cost model."""
    rng = random.Random(11)
    lengths = [min(512, int(rng.lognormvariate(2.8, 0.8))) + 2 for _ in range(1024)]
    fixed, _ = _drain(lengths, 32, None)
    variable, taken_in = _drain(lengths, 32, 64.0)
    assert variable < 0.9 * fixed
    assert sorted(taken_in) == list(range(1024))
    assert all(taken_in[i] <= i for i in range(1024)), "the oldest item is always in the next batch"


def test_with_a_pass_overhead_a_batch_of_one_is_the_oldest_and_a_buffer_of_one_batch_goes_whole():
    assert choose_bucket([50, 10, 60], 1, pass_overhead=64.0) == [0]
    clock = ManualClock()
    buf: BatchBuffer[str] = BatchBuffer(max_size=3, max_tokens=10**6, max_wait_s=1.0, clock=clock, pass_overhead=64.0)
    for name, tokens in [("long", 300), ("s1", 10), ("s2", 10)]:
        buf.add(name, tokens)
    assert buf.take() == ["long", "s1", "s2"]  # exactly a batch: nothing to choose between


def test_smaller_batches_are_for_cpus_only():
    assert pass_overhead("cpu") == CPU_PASS_OVERHEAD_TOKENS
    assert pass_overhead("cuda") is None and pass_overhead("cuda:1") is None
