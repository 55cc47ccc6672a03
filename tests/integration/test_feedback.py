"""``filter-worker feedback`` and ``calibrate --from-feedback`` against the real broker.

Verdicts go in; the precision gauges must equal what the test computes by hand from the same
verdicts, bad verdict records are counted by reason and skipped, offsets are committed after
counting, and a restart refills the windows without counting anything twice.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from structlog.testing import capture_logs

from filter_worker.config import Rule, Settings, load_settings
from filter_worker.exit_codes import ExitCode
from filter_worker.kafka import clients
from filter_worker.service.feedback import FeedbackService
from tests.integration.processes import wait_until

MODEL_A = "acme/keyword@0123456789abcdef0123456789abcdef01234567#sha256:00112233aabbccdd"
MODEL_B = "acme/keyword@fedcba9876543210fedcba9876543210fedcba98#sha256:99887766ffeeddcc"
KIDS = {
    "name": "kids",
    "match": {"header": "tenant", "values": ["kids-app"]},
    "rules": [{"action": "drop", "labels": ["Very Negative", "Negative"], "min_score": 0.3, "name": "strict"}],
}


def settings_for(bootstrap: str, topic: str, window: int = 50) -> Settings:
    prefix = f"fb{uuid.uuid4().hex[:8]}"
    return load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": prefix,
            "session_timeout_ms": 6000,
            "commit_interval_ms": 200,
        },
        routing={"scopes": [KIDS]},
        feedback={"topic": topic, "window": window, "metrics_port": 0, "models": ["acme/keyword"]},
    )


def verdict(n: int, verdict: str, scope: str, rule: str, action: str, score: float, model: str, source: str = ""):
    headers = [
        ("filter.action", action.encode()),
        ("filter.rule", rule.encode()),
        ("filter.scope", scope.encode()),
        ("filter.score", f"{score:.6f}".encode()),
        ("filter.model", model.encode()),
    ]
    value = {"source": source or f"messages/0/{n}", "verdict": verdict, "reviewer": "ann"}
    return headers, orjson.dumps(value)


def produce(bootstrap: str, topic: str, records: list[tuple[list, bytes]]) -> None:
    """Keyed by the decision headers, so each (scope, rule, model)'s verdicts keep their order in one partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for headers, value in records:
        key = b"|".join(v for k, v in headers if k in ("filter.scope", "filter.rule", "filter.model"))
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0


def create_topic(bootstrap: str, partitions: int = 1) -> str:
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    clients.create_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic], partitions)
    return topic


def committed(settings: Settings, partitions: int) -> dict[int, int]:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": settings.feedback.group(settings.kafka)}
    )
    try:
        tps = [TopicPartition(settings.feedback.topic, p) for p in range(partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
    finally:
        consumer.close()


@contextmanager
def running(settings: Settings, reload_routing=None) -> Iterator[FeedbackService]:
    service = FeedbackService(settings, reload_routing)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service.run()), daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(timeout=60)
    assert not thread.is_alive(), "feedback service did not stop"
    assert codes == [ExitCode.OK]


def value(service: FeedbackService, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


def key(scope: str, rule: str, action: str, model: str) -> dict[str, str]:
    return {"scope": scope, "rule": rule, "action": action, "model": model}


NEGATIVE_A = key("default", "negative", "quarantine", MODEL_A)
STRICT_A = key("kids", "strict", "drop", MODEL_A)
VERY_NEGATIVE_B = key("default", "very-negative", "drop", MODEL_B)


def verdicts_and_expectations() -> tuple[list, dict, dict, dict]:
    """The verdicts, and by hand: precision and window per key, counts per (key, verdict), skips per reason."""
    negative = ["ok", "ok"] + ["abuse"] * 40 + ["ok"] * 10  # window 50: the last fifty, 40 abuse
    records = [
        verdict(i, v, "default", "negative", "quarantine", 0.8 + i / 1000, MODEL_A) for i, v in enumerate(negative)
    ]
    records += [
        verdict(100 + i, v, "kids", "strict", "drop", 0.5, MODEL_A) for i, v in enumerate(["ok", "ok", "abuse"])
    ]
    records += [
        verdict(200, "abuse", "default", "very-negative", "drop", 0.95, MODEL_B),
        verdict(201, "ok", "default", "very-negative", "drop", 0.95, MODEL_B, source="messages/0/200"),  # revised
    ]
    good_headers, good_value = verdict(300, "abuse", "default", "negative", "quarantine", 0.9, MODEL_A)
    bad = {
        "not_json": (good_headers, b"not json at all"),
        "bad_verdict": (good_headers, orjson.dumps({"source": "messages/0/301", "verdict": "maybe"})),
        "bad_source": (good_headers, orjson.dumps({"source": "somewhere", "verdict": "ok"})),
        "missing_header": ([h for h in good_headers if h[0] != "filter.scope"], good_value),
        "bad_header": ([*good_headers, ("filter.score", b"high")], good_value),
        "not_moderated": (verdict(302, "ok", "default", "default", "allow", 0.9, MODEL_A)),
        "unknown_scope": (verdict(303, "ok", "adults", "negative", "quarantine", 0.9, MODEL_A)),
        "unknown_rule": (verdict(304, "ok", "kids", "negative", "quarantine", 0.9, MODEL_A)),
        "unknown_model": (verdict(305, "ok", "default", "negative", "quarantine", 0.9, "made-up@1")),
        "below_threshold": (verdict(306, "ok", "default", "negative", "quarantine", 0.6, MODEL_A)),
    }
    # Bad records sit between good ones: each is skipped and the stream behind it is still counted.
    records = records[:3] + list(bad.values()) + records[3:]
    precision = {
        tuple(NEGATIVE_A.values()): (0.8, 50),
        tuple(STRICT_A.values()): (round(1 / 3, 9), 3),
        tuple(VERY_NEGATIVE_B.values()): (0.0, 1),  # one source, its verdict revised
    }
    counts = {
        (*NEGATIVE_A.values(), "abuse"): 40,
        (*NEGATIVE_A.values(), "ok"): 12,
        (*STRICT_A.values(), "abuse"): 1,
        (*STRICT_A.values(), "ok"): 2,
        (*VERY_NEGATIVE_B.values(), "abuse"): 1,
        (*VERY_NEGATIVE_B.values(), "ok"): 1,
    }
    return records, precision, counts, dict.fromkeys(bad, 1)


def gauges(service: FeedbackService) -> dict[tuple[str, ...], tuple[float, float]]:
    found = {}
    for family in service.metrics.registry.collect():
        if family.name == "filter_feedback_precision":
            for sample in family.samples:
                labels = tuple(sample.labels[k] for k in ("scope", "rule", "action", "model"))
                found[labels] = (
                    round(sample.value, 9),
                    value(service, "filter_feedback_window_verdicts", **sample.labels),
                )
    return found


def counted(service: FeedbackService, counts: dict) -> dict:
    """``counts``' keys with the service's verdict counters (0 where absent)."""
    names = [*NEGATIVE_A, "verdict"]
    return {
        k: value(service, "filter_feedback_verdicts_total", **dict(zip(names, k, strict=True))) or 0 for k in counts
    }


def test_verdicts_become_precision_gauges_and_bad_records_are_counted_and_skipped(bootstrap_servers):
    topic = create_topic(bootstrap_servers)
    settings = settings_for(bootstrap_servers, topic)
    records, precision, counts, skipped = verdicts_and_expectations()
    produce(bootstrap_servers, topic, records)
    total = sum(counts.values())

    with capture_logs() as events, running(settings) as service:
        wait_until(lambda: counted(service, counts) == counts, timeout_s=60, what=f"{total} verdicts counted")
        wait_until(lambda: committed(settings, 1)[0] == len(records), timeout_s=30, what="offsets committed to the end")
        assert gauges(service) == precision
        for reason, expected in skipped.items():
            assert value(service, "filter_feedback_invalid_total", reason=reason) == expected, reason
        wait_until(lambda: service.http_port is not None, what="the metrics endpoint")
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert (
            'filter_feedback_precision{action="quarantine",model="' + MODEL_A + '",rule="negative",scope="default"} 0.8'
            in text
        )
    skipped_lines = [e for e in events if e["event"] == "verdict skipped"]
    assert sorted(e["reason"] for e in skipped_lines) == sorted(skipped)
    assert all(e["topic"] == topic and e["offset"] >= 0 and e["detail"] for e in skipped_lines)


def test_a_restart_refills_the_windows_without_counting_twice(bootstrap_servers):
    topic = create_topic(bootstrap_servers, partitions=2)
    settings = settings_for(bootstrap_servers, topic)
    records, precision, counts, _ = verdicts_and_expectations()
    produce(bootstrap_servers, topic, records)
    with running(settings) as service:
        wait_until(lambda: gauges(service) == precision, timeout_s=60, what="the first run's gauges")
        wait_until(lambda: sum(committed(settings, 2).values()) == len(records), timeout_s=30, what="offsets committed")

    with capture_logs() as events, running(settings) as service:
        wait_until(lambda: gauges(service) == precision, timeout_s=60, what="the windows refilled")
        assert set(counted(service, counts).values()) == {0}, "replayed verdicts are not counted again"
        assert not any(e["event"] == "verdict skipped" for e in events), "replayed bad records are not logged again"
        # A new verdict slides the window on from where the first run left it: one abuse out, one ok in.
        produce(bootstrap_servers, topic, [verdict(60, "ok", "default", "negative", "quarantine", 0.9, MODEL_A)])
        labels = {**NEGATIVE_A, "verdict": "ok"}
        wait_until(lambda: value(service, "filter_feedback_verdicts_total", **labels) == 1, what="the new verdict")
        assert value(service, "filter_feedback_precision", **NEGATIVE_A) == pytest.approx(39 / 50)


def test_verdicts_on_a_rule_added_by_a_reload_count_after_sighup(bootstrap_servers):
    topic = create_topic(bootstrap_servers)
    settings = settings_for(bootstrap_servers, topic)
    new_rule = Rule(action="drop", labels=["Negative"], min_score=0.99, name="new")
    added = settings.routing.model_copy(update={"rules": [*settings.routing.rules, new_rule]})
    with running(settings, reload_routing=lambda: added) as service:
        produce(bootstrap_servers, topic, [verdict(1, "abuse", "default", "new", "drop", 0.995, MODEL_A)])
        wait_until(lambda: value(service, "filter_feedback_invalid_total", reason="unknown_rule") == 1, what="refusal")
        service.request_reload()
        produce(bootstrap_servers, topic, [verdict(2, "abuse", "default", "new", "drop", 0.995, MODEL_A)])
        new = key("default", "new", "drop", MODEL_A)
        wait_until(lambda: value(service, "filter_feedback_window_verdicts", **new) == 1, what="the new rule's verdict")
        assert value(service, "filter_routing_reloads_total", result="applied") == 1


def test_feedback_command_exits_4_when_the_topic_is_missing(bootstrap_servers):
    result = subprocess.run(
        [sys.executable, "-m", "filter_worker", "feedback"],
        env={
            "PATH": "/usr/bin:/bin",
            "FILTER_KAFKA__BOOTSTRAP_SERVERS": bootstrap_servers,
            "FILTER_FEEDBACK__TOPIC": f"absent-{uuid.uuid4().hex[:8]}",
            "FILTER_FEEDBACK__METRICS_PORT": "0",
            "FILTER_LOG__FORMAT": "json",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == ExitCode.TOPICS, result.stderr
    assert "FILTER_FEEDBACK__TOPIC" in result.stderr and "Traceback" not in result.stderr


def test_calibrate_from_a_verdict_topic_proposes_a_higher_threshold(bootstrap_servers, tmp_path):
    topic = create_topic(bootstrap_servers, partitions=2)
    # Rule "negative" quarantines from 0.75. Reviewers call everything below 0.9 ok (40), above it abuse
    # (60). The scan tests every tenth of the verdicts by score at 0.25 % each: Clopper-Pearson's lower
    # bound of 60 abuse among 60 is 0.905, of 60 among 70 below 0.9: 0.91.
    scores = [0.76 + i * 0.0026 for i in range(40)] + [0.91 + i * 0.0014 for i in range(60)]
    records = [
        verdict(i, "abuse" if s > 0.9 else "ok", "default", "negative", "quarantine", s, MODEL_A)
        for i, s in enumerate(scores)
    ]
    records.append(records[70])  # delivered twice: counted once
    records.append((records[0][0], b"garbage"))
    produce(bootstrap_servers, topic, records)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "filter_worker",
            "calibrate",
            "--from-feedback",
            topic,
            "--rule",
            "negative",
            "--target-precision",
            "0.9",
            "--resamples",
            "200",
            "--out-json",
            str(tmp_path / "c.json"),
        ],
        env={"PATH": "/usr/bin:/bin", "FILTER_KAFKA__BOOTSTRAP_SERVERS": bootstrap_servers},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("100 verdicts on rule negative (scope default, model " + MODEL_A)
    assert "{'not_json': 1}" in lines[0] and lines[1].startswith("101 verdict records on these 100 sources")
    assert "never lowering it" in result.stdout and "from 0.75 to 0.910000 stops taking 40" in result.stdout
    rule = orjson.loads(lines[-1])
    assert rule == {
        "action": "quarantine",
        "labels": ["Very Negative", "Negative"],
        "min_score": 0.91,
        "name": "negative",
    }
    assert orjson.loads((tmp_path / "c.json").read_bytes())["precision"] == 1.0


def test_the_feedback_command_reloads_a_changed_config_file_without_a_signal(bootstrap_servers, tmp_path):
    """The Kubernetes path for the feedback service: the mounted ConfigMap changes, nobody sends SIGHUP."""
    import os
    import signal

    from filter_worker.tools.broker import free_port
    from tests.k8s_config import ConfigMapVolume

    topic = create_topic(bootstrap_servers)
    rules = '[[routing.rules]]\naction = "quarantine"\nlabels = ["Negative"]\nmin_score = 0.5\nname = "{name}"\n'
    volume = ConfigMapVolume(tmp_path / "etc", "filter-worker.toml", rules.format(name="first"))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FILTER_")},
        "FILTER_KAFKA__BOOTSTRAP_SERVERS": bootstrap_servers,
        "FILTER_KAFKA__GROUP_ID": f"fb{uuid.uuid4().hex[:8]}",
        "FILTER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "FILTER_FEEDBACK__TOPIC": topic,
        "FILTER_FEEDBACK__METRICS_PORT": str(port),
        "FILTER_FEEDBACK__MODELS": '["acme/keyword"]',
        "FILTER_LOG__FORMAT": "json",
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "filter_worker", "feedback", "--config", str(volume.path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def scraped(name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def scrape_or_zero(name: str, **labels: str) -> float:
        try:
            return scraped(name, **labels)
        except OSError:  # not listening yet
            return 0.0

    try:
        produce(bootstrap_servers, topic, [verdict(1, "abuse", "default", "second", "quarantine", 0.9, MODEL_A)])
        wait_until(lambda: scrape_or_zero("filter_feedback_invalid_total", reason="unknown_rule") == 1, 60, "refusal")
        volume.update(rules.format(name="second"))
        wait_until(lambda: scraped("filter_routing_reloads_total", result="applied") == 1, 30, "the reload")
        produce(bootstrap_servers, topic, [verdict(2, "abuse", "default", "second", "quarantine", 0.9, MODEL_A)])
        second = key("default", "second", "quarantine", MODEL_A)
        wait_until(lambda: scraped("filter_feedback_window_verdicts", **second) == 1, 30, "the new rule's verdict")
    finally:
        service.send_signal(signal.SIGTERM)
        log = service.communicate(timeout=60)[0].decode()
    assert service.returncode == 0, log
    assert '"config file changed; reloading the routing settings"' in log
