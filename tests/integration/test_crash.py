"""kill -9 at random points, three times, while a worker process works through tens of thousands of records.

At-least-once: every input reaches an output; duplicates are only records that were published but not
yet committed when the process died, and the test measures exactly that bound after each kill.
Exactly-once: a read_committed consumer of the outputs sees every input once. The embedded broker
(Tansu) shows records of aborted transactions to read_committed consumers, so the outputs are judged
by resolving the transaction markers in the log (``committed_log.py``), as Kafka's consumer does.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import orjson
import pytest

from tests.integration.committed_log import read_committed_outputs
from tests.integration.kafka_helpers import (
    committed_offsets,
    create_topics,
    end_offsets,
    produce,
    read_all_outputs,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import start_worker, wait_for_committed, worker_env

RECORDS = 20_000
PARTITIONS = 4
KILLS = 3


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_kill_9_three_times_loses_nothing(bootstrap_servers, keyword_model, exactly_once):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=PARTITIONS)
    values = [orjson.dumps({"text": f"record {i} " + ("loser" if i % 9 == 0 else "ok")}) for i in range(RECORDS)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    extra = {"FILTER_KAFKA__EXACTLY_ONCE": "true", "FILTER_KAFKA__TRANSACTIONAL_ID": "w1"} if exactly_once else {}
    env = worker_env(settings, **extra)
    rng = random.Random(7)

    in_flight_at_kills = 0
    for k in range(KILLS):
        worker = start_worker(env)
        target = int(RECORDS * rng.uniform(0.15 + 0.25 * k, 0.3 + 0.25 * k))
        try:
            wait_for_committed(settings, PARTITIONS, at_least=target)
            time.sleep(rng.uniform(0.0, 0.4))  # land anywhere between two commits (or transactions)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(30)
        # Published but not committed when it died: the most that may be repeated.
        published = len({o.source for o in read_all_outputs(settings, quiet_s=1)})
        committed = sum(max(0, o) for o in committed_offsets(settings, PARTITIONS).values())
        in_flight_at_kills += max(0, published - committed)

    last = start_worker(env)
    try:
        committed_end = wait_for_commits(settings, end_offsets(produced), timeout_s=240)
        outputs = read_outputs(settings, expected=RECORDS, timeout_s=60)
    finally:
        last.send_signal(signal.SIGTERM)
        last.communicate(timeout=60)
    assert last.returncode == 0

    if exactly_once:
        log = read_committed_outputs(settings)
        assert not log.open, "a transaction left open"
        outputs = log.committed
    counts = Counter(o.source for o in outputs)
    assert set(counts) == {(p.partition, p.offset) for p in produced}, "an input is missing from the outputs"
    assert committed_end == end_offsets(produced)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"\n{KILLS} kills: {duplicates} duplicates; {in_flight_at_kills} were published but uncommitted at the kills")
    if not exactly_once:
        assert duplicates <= in_flight_at_kills
        return
    assert duplicates == 0, "read_committed consumers must see every input exactly once"
