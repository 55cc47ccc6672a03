"""Scale out and in: three worker processes in one group, started staggered; one stopped, one killed."""

from __future__ import annotations

import signal

import orjson

from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import start_worker, wait_for_committed, worker_env

RECORDS = 12_000
PARTITIONS = 6


def assigned_partitions(log: str) -> list[set[str]]:
    """Every 'partitions assigned' event in a worker's JSON log, in order."""
    events = []
    for line in log.splitlines():
        if line.startswith("{") and '"partitions assigned"' in line:
            events.append(set(orjson.loads(line)["partitions"]))
    return events


def test_three_workers_scale_out_and_in(bootstrap_servers, keyword_model):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=PARTITIONS)
    values = [orjson.dumps({"text": f"record {i} " + ("annoying" if i % 4 == 0 else "ok")}) for i in range(RECORDS)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    env = worker_env(settings)

    first = start_worker(env)
    wait_for_committed(settings, PARTITIONS, at_least=RECORDS // 10)
    second = start_worker(env)
    wait_for_committed(settings, PARTITIONS, at_least=RECORDS // 4)
    third = start_worker(env)
    try:
        wait_for_committed(settings, PARTITIONS, at_least=RECORDS * 2 // 5)
        first.send_signal(signal.SIGTERM)  # scale in gracefully ...
        first_log = first.communicate(timeout=60)[0].decode()
        wait_for_committed(settings, PARTITIONS, at_least=RECORDS * 3 // 5)
        second.send_signal(signal.SIGKILL)  # ... and a crash mid-stream
        second.wait(30)
        # Records on every partition after the kill: only an owner can commit them, so the commits
        # below prove the survivor took the killed worker's partitions (it may have finished them
        # before the kill, and the survivor then be stopped before the session timeout moved them).
        late = produce(bootstrap_servers, settings.topics.input[0], values[: PARTITIONS * 100], key_prefix="late")
        assert {p.partition for p in late} == set(range(PARTITIONS)), "a late record on every partition"
        produced += late
        committed = wait_for_commits(settings, end_offsets(produced), timeout_s=240)
        outputs = read_outputs(settings, expected=len(produced), timeout_s=60)
    finally:
        for worker in (first, second, third):
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        third_log = third.communicate(timeout=60)[0].decode()
    assert first.returncode == 0 and third.returncode == 0
    assert second.returncode == -signal.SIGKILL

    assert {o.source for o in outputs} == {(p.partition, p.offset) for p in produced}, "a record was not routed"
    assert committed == end_offsets(produced), "committed offsets must reach the end of every partition"
    everything = {f"{settings.topics.input[0]}/{p}" for p in range(PARTITIONS)}
    assert assigned_partitions(first_log)[0] == everything, "the first worker starts with every partition"
    # The survivor ends up owning every partition: none is left without an owner.
    assert assigned_partitions(third_log)[-1] == everything
