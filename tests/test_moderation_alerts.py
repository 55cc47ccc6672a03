"""deploy/prometheus/moderation-alerts.yml: valid rules, passing promtool unit tests, real metric names.

promtool comes with Prometheus (Debian: ``apt-get install prometheus``). The promtool tests run
wherever it is on PATH; without it they are skipped on a developer machine and fail under CI=true, so
CI cannot pass without running them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from filter_worker.moderation.verdicts import INVALID_REASONS
from filter_worker.monitoring.metrics import FeedbackMetrics, Metrics

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = PROMETHEUS / "moderation-alerts.yml"
RULE_TESTS = PROMETHEUS / "moderation-alerts.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not on PATH; CI must run the alert rule tests (apt-get install prometheus)")
        pytest.skip("promtool is not on PATH (apt-get install prometheus)")
    return found


def exported_names() -> set[str]:
    """Every series name the worker and the feedback service export (histograms and counters expanded)."""
    names = set()
    for registry in (Metrics().registry, FeedbackMetrics(INVALID_REASONS).registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_promtool_checks_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_queries_exported_metrics_and_is_unit_tested():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    exported = exported_names() | {"up"}  # up{job=...}: written by Prometheus for every scrape target
    for rule in rules:
        selectors = re.sub(r"\{[^}]*\}", "", rule["expr"])  # label matchers hold values, not metric names
        used = set(re.findall(r"\b(?:filter_[a-z_]+|up)\b", selectors))
        assert used and used <= exported, f"{rule['alert']}: {sorted(used - exported)} are not exported"
        assert rule["labels"]["severity"] in {"critical", "warning"} and rule["annotations"]["summary"]
        assert rule["alert"] in tested, f"{rule['alert']} has no promtool test that makes it fire"


def test_every_alert_has_a_case_where_it_stays_silent_and_one_where_it_fires():
    """Noise and real degradation: an alert tested only where it fires could be firing on anything."""
    rules = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in rules:
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == alert}
        assert outcomes == {False, True}, f"{alert}: cases {outcomes or 'none'}"

