"""Safe rollout against the real broker: shadow mode, and routing rules reloaded on SIGHUP."""

from __future__ import annotations

import signal
import threading
import time

import orjson

from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import start_worker, worker_env
from tests.k8s_config import ConfigMapVolume


def test_shadow_mode_publishes_everything_to_allow_with_the_would_be_decision(
    bootstrap_servers, keyword_model, running_worker
):
    settings = worker_settings(bootstrap_servers, str(keyword_model), routing={"shadow": True})
    create_topics(settings, input_partitions=1)
    texts = {"you idiot": "drop", "this is annoying": "quarantine", "see you at noon": "allow"}
    values = [orjson.dumps({"text": t}) for t in texts] + [b"not json"]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with running_worker(settings) as worker:
        outputs = read_outputs(settings, expected=len(values))
        wait_for_commits(settings, end_offsets(produced))
        shadow = {
            s.labels["action"]: s.value
            for m in worker.metrics.shadow_decisions.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
    by_text = {orjson.loads(o.value)["text"]: o for o in outputs if o.topic != settings.topics.dead_letter}
    for text, would_be in texts.items():
        out = by_text[text]
        assert out.topic == settings.topics.allow, "shadow mode enforces nothing"
        assert out.headers["filter.action"].decode() == would_be
        assert out.headers["filter.shadow"] == b"true"
    assert shadow == {"drop": 1.0, "quarantine": 1.0, "allow": 1.0}
    # Malformed records still go to the dead-letter topic: there is no decision to shadow.
    assert [o.topic for o in outputs if o.source[1] == 3] == [settings.topics.dead_letter]


def _rules_toml(action: str, labels: list[str], name: str) -> str:
    labels_toml = orjson.dumps(labels).decode()
    return f'[[routing.rules]]\naction = "{action}"\nlabels = {labels_toml}\nmin_score = 0.5\nname = "{name}"\n'


def test_sighup_reloads_rules_and_refuses_invalid_ones(bootstrap_servers, keyword_model, tmp_path):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=1)
    config = tmp_path / "filter.toml"
    config.write_text(_rules_toml("drop", ["Very Negative"], "first"))
    topic = settings.topics.input[0]
    env = worker_env(settings)
    worker = start_worker(env, str(config))
    try:
        produce(bootstrap_servers, topic, [orjson.dumps({"text": "idiot one"})])
        read_outputs(settings, expected=1, settle_s=0)

        config.write_text(_rules_toml("quarantine", ["Very Negative"], "second"))
        worker.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        produce(bootstrap_servers, topic, [orjson.dumps({"text": "idiot two"})])
        read_outputs(settings, expected=2, settle_s=0)

        config.write_text(_rules_toml("drop", ["No Such Label"], "broken"))
        worker.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        produced = produce(bootstrap_servers, topic, [orjson.dumps({"text": "idiot three"})])
        outputs = read_outputs(settings, expected=3)
        wait_for_commits(settings, {0: produced[0].offset + 1})
    finally:
        worker.send_signal(signal.SIGTERM)
        log = worker.communicate(timeout=60)[0].decode()
    assert worker.returncode == 0, log
    decided = {orjson.loads(o.value)["text"]: (o.topic, o.headers["filter.rule"].decode()) for o in outputs}
    assert decided == {
        "idiot one": (settings.topics.drop, "first"),
        "idiot two": (settings.topics.quarantine, "second"),
        "idiot three": (settings.topics.quarantine, "second"),  # the invalid rules were refused
    }
    assert '"routing reloaded"' in log
    assert '"routing reload refused; the previous rules stay in force"' in log and "No Such Label" in log


def test_a_changed_config_file_reloads_the_rules_without_a_signal(bootstrap_servers, keyword_model, tmp_path):
    """The Kubernetes path: the mounted ConfigMap changes (a symlink swap), nobody sends SIGHUP."""
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=1)
    volume = ConfigMapVolume(tmp_path / "etc", "filter-worker.toml", _rules_toml("drop", ["Very Negative"], "first"))
    topic = settings.topics.input[0]
    worker = start_worker(worker_env(settings), str(volume.path))
    lines: list[str] = []
    reloaded = threading.Event()

    def read_log() -> None:
        assert worker.stdout is not None
        for raw in worker.stdout:
            lines.append(raw.decode())
            if '"routing reloaded"' in lines[-1]:
                reloaded.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        produce(bootstrap_servers, topic, [orjson.dumps({"text": "idiot one"})])
        read_outputs(settings, expected=1, settle_s=0)
        volume.update(_rules_toml("quarantine", ["Very Negative"], "second"))
        assert reloaded.wait(30), "the worker did not reload the changed file:\n" + "".join(lines)
        produced = produce(bootstrap_servers, topic, [orjson.dumps({"text": "idiot two"})])
        outputs = read_outputs(settings, expected=2)
        wait_for_commits(settings, {0: produced[0].offset + 1})
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        reader.join(timeout=10)
    log = "".join(lines)
    assert worker.returncode == 0, log
    decided = {orjson.loads(o.value)["text"]: (o.topic, o.headers["filter.rule"].decode()) for o in outputs}
    assert decided == {
        "idiot one": (settings.topics.drop, "first"),
        "idiot two": (settings.topics.quarantine, "second"),
    }
    assert '"config file changed; reloading the routing settings"' in log
