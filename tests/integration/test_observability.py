"""Metrics and health endpoints during a real run: values match what the test produced."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections import Counter

import orjson
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_and_probes_reflect_the_run(bootstrap_servers, keyword_model, running_worker):
    settings = worker_settings(bootstrap_servers, str(keyword_model), metrics={"port": 0})
    create_topics(settings, input_partitions=3)
    values = [orjson.dumps({"text": t}) for t in ["you idiot", "so annoying", "hello"] * 100] + [b"{bad"] * 7
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    topic = settings.topics.input[0]

    with capture_logs() as events, running_worker(settings) as worker:
        while worker.http_port is None:
            time.sleep(0.01)
        port = worker.http_port
        statuses = []
        while True:
            status, body = get(port, "/readyz")
            statuses.append(status)
            if status == 200:
                assert worker.health.joined and worker.health.model_ready
                break
            time.sleep(0.02)
        assert statuses[0] == 503, "ready before the group was joined"
        outputs = read_outputs(settings, expected=len(produced))
        wait_for_commits(settings, end_offsets(produced))
        time.sleep(settings.kafka.commit_interval_ms / 1000 * 3)  # lag gauges refresh at commit time
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/nope")[0] == 404
        status, text = get(port, "/metrics")
    assert status == 200
    dead = [e for e in events if e["event"] == "dead-lettering record"]
    assert len(dead) == 7
    for event in dead:  # every record log line says where the record is; none carries its content
        assert event["topic"] == topic and event["offset"] >= 0 and "partition" in event
        assert "value" not in event and "text" not in event
    m = samples(text)
    per_topic = Counter(o.topic.rsplit(".", 1)[1] for o in outputs)
    assert m[("filter_records_consumed_total", (("topic", topic),))] == len(produced)
    for action, suffix in [("allow", "allow"), ("quarantine", "quarantine"), ("drop", "drop"), ("dead_letter", "dlq")]:
        assert m[("filter_records_published_total", (("action", action), ("topic", topic)))] == per_topic[suffix]
    assert per_topic == {"allow": 100, "quarantine": 100, "drop": 100, "dlq": 7}
    assert m[("filter_dead_letters_total", (("error", "invalid_json"),))] == 7
    assert m[("filter_batch_size_sum", ())] == 300  # every classified record went through one forward pass
    assert m[("filter_batch_padded_tokens_sum", ())] >= 300
    assert m[("filter_forward_seconds_count", ())] == m[("filter_batch_size_count", ())] > 0
    assert m[("filter_end_to_end_latency_seconds_count", ())] == len(produced)
    assert m[("filter_commits_total", ())] > 0
    assert m[("filter_in_flight_records", ())] == 0
    assert m[("filter_rebalances_total", (("kind", "assign"),))] >= 1
    lags = {labels: v for (name, labels), v in m.items() if name == "filter_consumer_lag"}
    assert len(lags) == 3 and set(lags.values()) == {0.0}
    info = next(labels for (name, labels), v in m.items() if name == "filter_model_info")
    weights = hashlib.sha256((keyword_model / "model.safetensors").read_bytes()).hexdigest()
    assert dict(info) == {
        "name": str(keyword_model),
        "revision": "local",
        "weights_sha256": weights,
        "device": "cpu",
        "dtype": "float32",
        "backend": "torch",
        "precision_source": "setting",  # the worker was given a classifier, not auto's choice
    }


def test_a_slow_group_join_is_logged_with_the_group_state(bootstrap_servers, keyword_model, classifier):
    """After a member was killed, the coordinator waits for its session to time out before the join ends."""
    import signal

    from tests.integration.processes import start_worker, wait_for_committed, worker_env
    from tests.integration.worker_thread import worker_thread

    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=2)
    produce(bootstrap_servers, settings.topics.input[0], [orjson.dumps({"text": "fine"})] * 20)
    killed = start_worker(worker_env(settings))
    try:
        wait_for_committed(settings, partitions=2, at_least=20)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    with capture_logs() as logs, worker_thread(settings, classifier) as (worker, _, _thread):
        started = time.monotonic()
        while not worker.health.joined:
            assert time.monotonic() - started < 90, "no join after 90 s"
            time.sleep(0.1)
    waits = [e for e in logs if e["event"] == "waiting to join the consumer group"]
    print(
        f"joined after {time.monotonic() - started:.1f}s; logged: {[(e['waited_s'], e['join_state']) for e in waits]}"
    )
    assert waits, "a join that took longer than 5 s says so"
    assert waits[0]["group"] == settings.kafka.group_id and waits[0]["session_timeout_ms"] == 6000
    assert waits[0]["state"] is not None and waits[0]["join_state"] is not None
