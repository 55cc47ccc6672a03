"""The console script as a user runs it: real processes, real output, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from filter_worker.config import Rule
from filter_worker.lockfile import LOCK_NAME
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

    from filter_worker import kafka_io

    topic = f"load-{uuid.uuid4().hex[:8]}"
    kafka_io.create_topics(AdminClient({"bootstrap.servers": bootstrap_servers}), [topic], 1)
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
