"""A worker process stopped with SIGTERM mid-stream and restarted loses nothing and repeats nothing."""

from __future__ import annotations

import signal
import time

import orjson

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
from tests.integration.processes import start_worker, wait_for_outputs, worker_env


def test_sigterm_mid_stream_then_restart_loses_nothing(bootstrap_servers, keyword_model):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=4)
    values = [orjson.dumps({"text": f"message {i} " + ("idiot" if i % 7 == 0 else "ok")}) for i in range(6000)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    env = worker_env(settings)

    first = start_worker(env)
    try:
        wait_for_outputs(settings, at_least=300)
        first.send_signal(signal.SIGTERM)
        log = first.communicate(timeout=60)[0].decode()
    finally:
        first.kill()
    assert first.returncode == 0, log
    assert "worker stopped" in log

    partial = read_all_outputs(settings, quiet_s=1)
    assert 0 < len(partial) < len(produced), "SIGTERM should have landed mid-stream"
    committed = committed_offsets(settings, partitions=4)
    # The stop log says what the README says: records fetched but not started are read again by the
    # next owner (at most every record not committed), and nothing reads like data loss.
    events = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    revoked = [e for e in events if e["event"] == "partitions revoked"]
    assert revoked and all(e["finished_in_time"] for e in revoked)
    read_again = sum(e["read_again_by_next_owner"] for e in revoked)
    assert 0 <= read_again <= len(produced) - sum(max(offset, 0) for offset in committed.values())
    assert "dropped" not in log
    # Graceful stop: everything published was acknowledged and committed before leaving the group.
    published_per_partition: dict[int, int] = {}
    for out in partial:
        partition, offset = out.source
        published_per_partition[partition] = max(published_per_partition.get(partition, 0), offset + 1)
    for partition, end in published_per_partition.items():
        assert committed[partition] >= end

    second = start_worker(env)
    try:
        outputs = read_outputs(settings, expected=len(produced), timeout_s=180)
        ends = wait_for_commits(settings, end_offsets(produced))
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=60)
    assert second.returncode == 0
    sources = [o.source for o in outputs]
    assert set(sources) == {(p.partition, p.offset) for p in produced}
    assert len(sources) == len(set(sources)), "a graceful stop must not repeat records"
    assert ends == end_offsets(produced)


def test_sighup_during_start_up_is_a_reload_applied_once_running(bootstrap_servers, keyword_model):
    """A reload sent to every pod (``kill -HUP``) reaches one still importing and loading its model.

    Before: the handler was installed once the service ran, so Python's default ended the process by
    the signal, with no log line.
    """
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=1)
    worker = start_worker(worker_env(settings))
    started = time.monotonic()
    try:
        for at_s in (1.0, 2.5):  # seconds after start: importing, then loading the model
            time.sleep(max(0.0, started + at_s - time.monotonic()))
            assert worker.poll() is None, "the worker died of the signal"
            worker.send_signal(signal.SIGHUP)
        produced = produce(bootstrap_servers, settings.topics.input[0], [orjson.dumps({"text": "you idiot"})])
        outputs = read_outputs(settings, expected=1, timeout_s=60)
        wait_for_commits(settings, end_offsets(produced))
    finally:
        worker.send_signal(signal.SIGTERM)
        log = worker.communicate(timeout=60)[0].decode()
    assert worker.returncode == 0, log
    assert [o.topic for o in outputs] == [settings.topics.drop]
    assert '"routing reloaded"' in log, "the reload asked for during start-up is applied once the loop runs"
