"""The console script as a user runs it: real processes, real output, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import typing
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from pydantic_settings import NoDecode

from filter_worker.config import Rule, Settings
from filter_worker.model.lockfile import LOCK_NAME
from tests.conftest import HUB_COMMIT, HUB_REPO
from tests.test_evaluation import write_csv


def cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FILTER_")}
    return subprocess.run(
        [sys.executable, "-m", "filter_worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=180,
    )


def test_classify_prints_one_json_decision_per_text(keyword_model, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("what a loser\n\nthe update is broken\n", encoding="utf-8")
    result = cli("classify", "a wonderful day", "--file", str(lines), "--model", str(keyword_model))
    assert result.returncode == 0, result.stderr
    decisions = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [d["text"] for d in decisions] == ["a wonderful day", "what a loser", "the update is broken"]
    assert [d["action"] for d in decisions] == ["allow", "drop", "quarantine"]
    assert decisions[1]["label"] == "Very Negative" and decisions[1]["rule"] == "very-negative"
    assert set(decisions[0]["scores"]) == {"Very Negative", "Negative", "Neutral", "Positive", "Very Positive"}
    assert decisions[0]["truncated"] is False


def test_classify_reads_stdin_and_uses_rules_from_the_environment(keyword_model):
    rules = '[{"action": "quarantine", "labels": ["Very Positive"], "min_score": 0.5, "name": "too-happy"}]'
    result = cli(
        "classify",
        "--file",
        "-",
        stdin="a wonderful day\n",
        FILTER_MODEL__NAME=str(keyword_model),
        FILTER_ROUTING__RULES=rules,
    )
    assert result.returncode == 0, result.stderr
    decision = orjson.loads(result.stdout)
    assert (decision["action"], decision["rule"]) == ("quarantine", "too-happy")


def test_unknown_rule_label_exits_2_listing_the_model_labels(keyword_model):
    rules = '[{"action": "drop", "labels": ["toxic"], "min_score": 0.5}]'
    result = cli("classify", "x", "--model", str(keyword_model), FILTER_ROUTING__RULES=rules)
    assert result.returncode == 2
    assert "FILTER_ROUTING__RULES" in result.stderr and "'Very Negative'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["run"], ["classify", "x"], ["demo"]])
def test_bad_configuration_exits_2_naming_the_setting(command):
    result = cli(*command, FILTER_BATCH__MAX_WAIT_MS="soon")
    assert result.returncode == 2
    assert "FILTER_BATCH__MAX_WAIT_MS" in result.stderr and "Traceback" not in result.stderr


def test_demo_without_hub_access_says_how_to_use_a_local_model():
    result = cli("demo", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 3
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("filter-worker:")]
    assert len(error_lines) == 1 and "--model DIR" in error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_demo_runs_end_to_end_on_a_local_model(keyword_model):
    result = cli("demo", "--model", str(keyword_model), "--messages", "300")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "routed 309 of 309 records" in out
    for action in ("allow", "quarantine", "drop", "dead_letter"):
        assert f"  {action}" in out
    assert "invalid_json" in out and "MISSING" not in out
    assert "metrics at http://127.0.0.1:" in out


@pytest.mark.integration
def test_produce_sends_paced_sample_messages(bootstrap_servers):
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient

    from filter_worker.kafka import clients

    topic = f"load-{uuid.uuid4().hex[:8]}"
    clients.create_topics(AdminClient({"bootstrap.servers": bootstrap_servers}), [topic], 1)
    result = cli(
        "produce", "--rate", "100", "--count", "40", "--topic", topic, FILTER_KAFKA__BOOTSTRAP_SERVERS=bootstrap_servers
    )
    assert result.returncode == 0, result.stderr
    assert "produced 40 messages" in result.stdout and "0 undelivered, 0 failed" in result.stdout

    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": uuid.uuid4().hex})
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got = []
    while len(got) < 40:
        got += [m for m in reader.consume(50, 5.0) if m.error() is None] or pytest.fail("messages missing")
    reader.close()
    bodies = [orjson.loads(m.value()) for m in got]
    assert [b["id"] for b in bodies] == [f"load-{i}" for i in range(40)]
    assert all(b["text"] for b in bodies)
    span = bodies[-1]["sent_at"] - bodies[0]["sent_at"]
    assert span >= 39 / 100 * 0.9, "the rate limit was not applied"


@pytest.mark.integration
def test_produce_refuses_a_topic_that_does_not_exist_unless_asked_to_create_it(bootstrap_servers):
    import uuid

    from confluent_kafka.admin import AdminClient

    topic = f"mesages-{uuid.uuid4().hex[:8]}"  # a typo of the input topic: many brokers would create it
    env = {"FILTER_KAFKA__BOOTSTRAP_SERVERS": bootstrap_servers}
    refused = cli("produce", "--count", "5", "--topic", topic, **env)
    assert refused.returncode == 4, refused.stderr
    assert f"topic '{topic}' does not exist on {bootstrap_servers}" in error_line(refused)
    assert "--create-topic" in error_line(refused) and "produced" not in refused.stdout
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    assert topic not in admin.list_topics(timeout=10).topics

    created = cli("produce", "--count", "5", "--rate", "100", "--topic", topic, "--create-topic", **env)
    assert created.returncode == 0, created.stderr
    assert f"created topic {topic} (3 partitions)" in created.stdout and "produced 5 messages" in created.stdout
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 3


def test_metrics_port_in_use_exits_2_naming_the_setting(keyword_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", FILTER_MODEL__NAME=str(keyword_model), FILTER_METRICS__PORT=str(port))
    assert result.returncode == 2
    assert f"FILTER_METRICS__PORT={port}" in result.stderr and "Traceback" not in result.stderr


def test_run_with_a_bad_drift_reference_exits_2_naming_the_setting(keyword_model, tmp_path):
    broken = tmp_path / "reference.json"
    broken.write_text('{"version": 1}', encoding="utf-8")
    for reference in (str(tmp_path / "missing.json"), str(broken)):
        result = cli("run", FILTER_MODEL__NAME=str(keyword_model), FILTER_DRIFT__REFERENCE=reference)
        assert result.returncode == 2, result.stderr
        assert "FILTER_DRIFT__REFERENCE" in result.stderr and "Traceback" not in result.stderr


def test_eval_prints_a_table_and_writes_json_and_an_html_report(keyword_model, tmp_path):
    data = write_csv(tmp_path / "labeled.csv")
    out, report = tmp_path / "eval.json", tmp_path / "eval.html"
    result = cli(
        "eval", str(data), "--model", str(keyword_model), "--lang-field", "lang",
        "--label-map", '{"ok": "Neutral"}', "--out-json", str(out), "--report", str(report),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "accuracy 0.7000" in result.stdout and "drop 3 (30.0%)" in result.stdout
    document = orjson.loads(out.read_bytes())
    assert document["accuracy"] == pytest.approx(0.7) and document["by_language"]["de"]["accuracy"] == 0.5
    assert report.read_text(encoding="utf-8").count('<img alt="chart" src="data:image/png;base64,') == 2


def test_eval_input_errors_exit_2_with_one_sentence(keyword_model, tmp_path):
    data = write_csv(tmp_path / "labeled.csv")
    result = cli("eval", str(data), "--model", str(keyword_model), "--text-field", "body")
    assert result.returncode == 2 and "no value for field 'body'" in result.stderr
    result = cli("eval", str(data), "--model", str(keyword_model))
    assert result.returncode == 2 and "label(s) ['ok'] are not labels of the model" in result.stderr
    assert "Traceback" not in result.stderr


def test_calibrate_prints_a_rule_the_routing_setting_accepts(keyword_model, tmp_path):
    data = tmp_path / "calibration.jsonl"
    rows = [("you idiot", "abuse"), ("so annoying", "abuse"), ("an annoying bug", "abuse"), ("what a loser", "abuse")]
    rows += [("the screen is broken", "fine"), ("hello there", "fine"), ("see you tomorrow", "fine")]
    data.write_text("".join(orjson.dumps({"msg": t, "y": y}).decode() + "\n" for t, y in rows), encoding="utf-8")
    args = ["calibrate", str(data), "--model", str(keyword_model), "--text-field", "msg", "--label-field", "y"]
    args += ["--label-map", '{"abuse": "Negative"}', "--action", "quarantine", "--labels", "Very Negative,Negative"]
    result = cli(*args, "--target-precision", "0.8", "--report", str(tmp_path / "c.html"))
    assert result.returncode == 0, result.stderr
    assert "precision 0.8000" in result.stdout and "recall 1.0000" in result.stdout
    rule = Rule(**orjson.loads(result.stdout.splitlines()[-1]))
    assert (rule.action, rule.labels, rule.name) == ("quarantine", ["Very Negative", "Negative"], "quarantine-p80")
    assert '<img alt="chart" src="data:image/png;base64,' in (tmp_path / "c.html").read_text(encoding="utf-8")
    # The highest-scoring example is not abuse, so no threshold gets above 1/2 precision.
    data.write_text('{"msg": "so annoying", "y": "fine"}\n{"msg": "the screen is broken", "y": "abuse"}\n')
    unreachable = cli(*args, "--target-precision", "0.9", "--resamples", "10")
    assert unreachable.returncode == 1 and "no min_score reaches precision 0.9 on this data" in unreachable.stdout
    assert "the best is 0.5000 (recall 1.0000) at min_score 0.86" in unreachable.stdout


def test_pull_then_verify_catches_a_flipped_byte_and_the_worker_refuses_to_load(hub_cache, tmp_path):
    target = tmp_path / "model"
    hub = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    pulled = cli("model", "pull", HUB_REPO, "--to", str(target), **hub)
    assert pulled.returncode == 0, pulled.stderr
    assert f"at commit {HUB_COMMIT}" in pulled.stdout and (target / LOCK_NAME).is_file()
    assert cli("model", "verify", str(target)).returncode == 0

    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    verified = cli("model", "verify", str(target))
    assert verified.returncode == 3 and "model.safetensors: sha256" in verified.stderr
    refused = cli("classify", "hello", "--model", str(target))
    assert refused.returncode == 3 and "model.safetensors: sha256" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_hub_load_reports_the_resolved_commit_and_warns_when_unpinned(hub_cache):
    hub = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    unpinned = cli("classify", "you idiot", "--model", HUB_REPO, **hub)
    assert unpinned.returncode == 0, unpinned.stderr
    decision = orjson.loads(unpinned.stdout)
    assert decision["model"].startswith(f"{HUB_REPO}@{HUB_COMMIT}#sha256:") and decision["action"] == "drop"
    assert "model revision is not pinned" in unpinned.stderr
    pinned = cli("classify", "you idiot", "--model", HUB_REPO, FILTER_MODEL__REVISION=HUB_COMMIT, **hub)
    assert pinned.returncode == 0, pinned.stderr
    assert "not pinned" not in pinned.stderr and orjson.loads(pinned.stdout)["model"] == decision["model"]


# ------------------------------------------------------------------------- bad input: exit 2, one line


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``filter-worker:`` line a refused start prints; anything like a traceback fails the test."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("filter-worker:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_classify_refuses_invalid_utf8_in_a_file_and_on_stdin(keyword_model, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_bytes(b"fine\n\xff\xfe broken\n")
    from_file = cli("classify", "--file", str(data), "--model", str(keyword_model))
    assert from_file.returncode == 2
    assert f"--file {data} line 2: not valid UTF-8" in error_line(from_file)

    piped = subprocess.run(
        [sys.executable, "-m", "filter_worker", "classify", "--file", "-", "--model", str(keyword_model)],
        input=b"fine\n\xff\xfe broken\n",
        capture_output=True,
        timeout=180,
    )
    result = subprocess.CompletedProcess(piped.args, piped.returncode, piped.stdout.decode(), piped.stderr.decode())
    assert result.returncode == 2 and "standard input" in error_line(result) and not result.stdout


def test_classify_reports_empty_text_as_the_worker_would_dead_letter_it(keyword_model):
    result = cli("classify", "", "  ", "a wonderful day", "--model", str(keyword_model))
    assert result.returncode == 0, result.stderr
    empty, blank, fine = (orjson.loads(line) for line in result.stdout.splitlines())
    for decision in (empty, blank):
        assert (decision["action"], decision["error"]) == ("dead_letter", "empty_text")
        assert decision["reason"] and "label" not in decision
    assert (fine["action"], fine["label"]) == ("allow", "Very Positive")
    only_empty = cli("classify", "", "--model", str(keyword_model))
    assert only_empty.returncode == 0 and orjson.loads(only_empty.stdout)["error"] == "empty_text"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FILTER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "FILTER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512"},
         "FILTER_KAFKA__SASL_USERNAME and FILTER_KAFKA__SASL_PASSWORD are required"),
        ({"FILTER_KAFKA__PROPERTIES": '{"bogus.property": "1"}'}, "FILTER_KAFKA__PROPERTIES"),
        ({"FILTER_KAFKA__CONSUMER_PROPERTIES": '{"fetch.wait.max.ms": "never"}'}, "FILTER_KAFKA__CONSUMER_PROPERTIES"),
        ({"FILTER_KAFKA__PRODUCER_PROPERTIES": '{"compression.type": "zipzap-secret"}'},
         "FILTER_KAFKA__PRODUCER_PROPERTIES"),
        ({"FILTER_ROUTING__RULES": "not json"}, "FILTER_ROUTING__RULES is not valid JSON"),
        ({"FILTER_KAFKA__BOOTSTRAP_SERVERS": ""}, "FILTER_KAFKA__BOOTSTRAP_SERVERS"),
        ({"FILTER_MODEL__NAME": "/no/such/dir"}, "FILTER_MODEL__NAME"),
    ],
)  # fmt: skip
def test_bad_settings_stop_run_before_the_model_loads(env, named):
    # The hub is unreachable, so reaching the model load would end in exit code 3 instead.
    result = cli("run", HF_ENDPOINT="http://127.0.0.1:9", **env)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert named in line
    assert "zipzap-secret" not in result.stderr, "pass-through values are secrets"


def test_model_paths_that_do_not_exist_are_setting_errors_and_incomplete_directories_model_errors(tmp_path):
    missing = cli("classify", "x", "--model", "./nope")
    assert missing.returncode == 2 and "--model: './nope' looks like a path" in error_line(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    incomplete = cli("classify", "x", "--model", str(empty))
    assert incomplete.returncode == 3
    assert "has no config.json, no tokenizer.json, no *.safetensors weights" in error_line(incomplete)


def test_hub_failure_recommends_the_projects_own_commands():
    result = cli("classify", "x", "--model", "acme/not-cached", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 3
    line = error_line(result)
    assert "filter-worker model pull NAME --to DIR" in line and "filter-worker model synth DIR" in line
    assert "huggingface-cli" not in line


def test_model_pull_without_hub_access_says_so_in_one_sentence(tmp_path):
    result = cli("model", "pull", "acme/not-cached", "--to", str(tmp_path / "m"), HF_HUB_CACHE=str(tmp_path / "c"),
                 HF_HUB_OFFLINE="1")  # fmt: skip
    assert result.returncode == 3
    line = error_line(result)
    assert "the Hugging Face Hub is unreachable from here" in line and "local_files_only" not in line


def test_model_lock_then_verify_and_load_report_the_locked_identity(keyword_model, tmp_path):
    import shutil

    target = tmp_path / "mine"
    shutil.copytree(keyword_model, target)
    locked = cli("model", "lock", str(target), "--name", "acme/mine", "--revision", "v1")
    assert locked.returncode == 0, locked.stderr
    assert (target / LOCK_NAME).is_file() and "acme/mine@v1" in locked.stdout
    assert cli("model", "verify", str(target)).returncode == 0
    again = cli("model", "lock", str(target))
    assert again.returncode == 3 and "--force" in error_line(again)
    decision = cli("classify", "you idiot", "--model", str(target))
    assert decision.returncode == 0, decision.stderr
    assert orjson.loads(decision.stdout)["model"].startswith("acme/mine@v1#sha256:")
    (target / "vocab.txt").write_text("sneaked in\n")
    assert cli("model", "verify", str(target)).returncode == 3


@pytest.mark.parametrize("command", [["verify"], ["lock"]])
def test_model_commands_on_a_missing_directory_exit_2(command, tmp_path):
    result = cli("model", *command, str(tmp_path / "nope"))
    assert result.returncode == 2 and "does not exist" in error_line(result)


def test_config_after_the_subcommand_is_used_and_help_names_the_sources(keyword_model, tmp_path):
    config = tmp_path / "filter.toml"
    config.write_text('[[routing.rules]]\naction = "quarantine"\nlabels = ["Very Positive"]\nmin_score = 0.5\n'
                      'name = "from-file"\n')  # fmt: skip
    result = cli("classify", "a wonderful day", "--model", str(keyword_model), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["rule"] == "from-file"
    missing = cli("classify", "x", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "--config" in error_line(missing)
    helped = cli("run", "--help")
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "--config FILE" in text and "FILTER_* environment variables over the TOML file given with --config" in text
    assert "docs/configuration.md lists every setting" in text and "README" not in text


def _wrong_value(field: Any) -> str:
    """A value of the wrong kind for ``field``'s type, as an operator might type it."""
    annotation = field.annotation
    members = [a for a in typing.get_args(annotation) if a is not type(None)] if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else [annotation]  # fmt: skip
    first = members[0]
    if first is bool:
        return "maybe"
    if first is int:
        return "many"
    if first is float:
        return "lots"
    if typing.get_origin(first) is typing.Literal:
        return "no-such-choice"
    if typing.get_origin(first) in (list, dict):
        return "bad topic!" if NoDecode in field.metadata else "not json"
    return ""  # free text (names, ids, secrets): empty is the one value that is always wrong


def setting_fields() -> dict[str, Any]:
    """Every FILTER_ variable with its pydantic field, derived from the Settings class."""
    fields = {}
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            fields |= {f"FILTER_{name.upper()}__{sub.upper()}": f for sub, f in section.model_fields.items()}
        else:
            fields[f"FILTER_{name.upper()}"] = field
    return fields


# Settings whose wrong value the field's type does not tell: any text is a label name, but not an empty one.
WRONG_VALUES = {"FILTER_MODEL__LABELS": "ham,,spam"}


def test_every_setting_with_a_wrong_value_exits_2_naming_it(monkeypatch, capsys):
    # In this process: about 70 starts of `run`, each refused at the settings before any model or broker
    # is touched; one process each took two of the fast suite's minutes on a busy 2-core machine. The
    # process boundary (exit code, stderr) is test_bad_configuration_exits_2_naming_the_setting's.
    from filter_worker.cli import main

    fields = setting_fields()
    assert len(fields) >= 40 and "FILTER_SHUTDOWN_TIMEOUT_S" in fields
    for key in [k for k in os.environ if k.startswith("FILTER_")]:
        monkeypatch.delenv(key)
    problems = []
    for name in sorted(fields):
        with monkeypatch.context() as env:
            value = WRONG_VALUES.get(name, _wrong_value(fields[name]))
            env.setenv(name, value)
            code = main(["run"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("filter-worker:")]
        if code != 2 or len(lines) != 1 or name not in lines[0]:
            problems.append(f"{name}={value!r}: exit {code}, {err.strip()[:300]}")
    assert not problems, "\n".join(problems)


@pytest.mark.integration
def test_broker_creates_the_topics_of_the_settings_and_stops_on_sigterm():
    import queue
    import signal
    import socket
    import threading

    from confluent_kafka.admin import AdminClient

    from filter_worker.tools.broker import free_port

    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FILTER_")}
    env = {**clean, "FILTER_TOPICS__INPUT": "in-a,in-b", "FILTER_TOPICS__DEAD_LETTER": "bad"}
    args = [sys.executable, "-m", "filter_worker", "broker", "--port", str(port), "--topics", "--partitions", "2"]
    broker = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in broker.stdout], daemon=True)
    reader.start()
    try:
        printed = ""
        while "Ctrl-C stops the broker." not in printed:
            try:
                printed += lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"the broker printed no instructions within 60 s: {printed!r}")
        assert f"FILTER_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{port}" in printed
        assert "FILTER_KAFKA__SESSION_TIMEOUT_MS=6000" in printed
        # Offline the default model cannot load: the hint names a model, and how to write one.
        assert "filter-worker model synth ./demo-model" in printed
        assert "filter-worker run --model ./demo-model" in printed

        topics = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10).topics
        expected = {"in-a", "in-b", "messages.allow", "messages.quarantine", "messages.drop", "bad"}
        assert expected <= set(topics)
        assert {len(topics[name].partitions) for name in expected} == {2}
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=30)
        reader.join(timeout=10)  # the pipe is closed: the reader has read everything
    assert broker.returncode == 0, printed
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert rest[-1:] == ["broker stopped\n"], rest
    with socket.socket() as again:  # the broker process is gone with it
        again.bind(("127.0.0.1", port))
