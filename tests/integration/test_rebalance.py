"""Group membership changes mid-stream (default eager 'range' assignment): nothing lost, nothing repeated."""

from __future__ import annotations

from collections import Counter

import orjson
from structlog.testing import capture_logs

from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import wait_for_outputs, wait_until


def test_second_worker_joins_then_first_leaves(bootstrap_servers, keyword_model, running_worker):
    settings = worker_settings(bootstrap_servers, str(keyword_model), batch={"max_size": 8, "max_wait_ms": 20})
    assert settings.kafka.assignment_strategy == "range"
    create_topics(settings, input_partitions=6)
    values = [orjson.dumps({"text": f"note {i} " + ("annoying" if i % 5 == 0 else "fine")}) for i in range(8000)]
    topic = settings.topics.input[0]
    produced = produce(bootstrap_servers, topic, values[:4000])

    def assigned(count: int) -> bool:
        return any(e["event"] == "partitions assigned" and len(e["partitions"]) == count for e in events)

    with capture_logs() as events, running_worker(settings):
        wait_for_outputs(settings, at_least=300)
        with running_worker(settings):  # joins: partitions are split between the two
            wait_until(lambda: assigned(3), 60, "the partitions to be split between the two workers")
            # Produced only now, so both workers are mid-stream when the second one leaves.
            produced += produce(bootstrap_servers, topic, values[4000:], key_prefix="late")
            wait_for_outputs(settings, at_least=5000)
        # the second worker left: the first owns everything again
        outputs = read_outputs(settings, expected=len(produced), timeout_s=180)
        committed = wait_for_commits(settings, end_offsets(produced))

    assignments = [len(e["partitions"]) for e in events if e["event"] == "partitions assigned"]
    assert assignments[0] == 6 and 3 in assignments and assignments[-1] == 6, assignments

    sources = Counter(o.source for o in outputs)
    assert set(sources) == {(p.partition, p.offset) for p in produced}, "a record is missing"
    duplicates = sum(n - 1 for n in sources.values())
    print(f"duplicates after two rebalances: {duplicates} of {len(produced)}")
    # A revocation finishes the records below published ones before committing: nothing is repeated.
    assert all(e["finished_in_time"] for e in events if e["event"] == "partitions revoked")
    assert duplicates == 0
    assert committed == end_offsets(produced)
