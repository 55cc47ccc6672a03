"""The deploy checklist (docs/operations.md) as an operator runs it: no placeholder survives its edits.

The marked steps (``<!-- checklist: NAME -->`` before a shell block) are run as written, in bash, on a
copy of ``deploy/`` with the checklist's variables set; then the overlay they write is rendered with
``kubectl kustomize`` and read as Kubernetes would get it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import DEPLOY, K8S, ROOT, kubectl

OPERATIONS = ROOT / "docs" / "operations.md"
VALUES = {
    "REGISTRY": "registry.internal/moderation",
    "TAG": "0.1.0",
    "NAMESPACE": "moderation",
    "KAFKA_BOOTSTRAP": "kafka-0.kafka.svc:9093",
    "MODEL_REVISION": "0123456789abcdef0123456789abcdef01234567",
}
# What the base leaves for the operator to fill: an image of nobody's registry, a revision that is no
# commit, credentials that are no credentials.
PLACEHOLDERS = re.compile(r"REPLACE|ghcr\.io/example")
OPTIONAL = {"without-keda": {"ScaledObject", "TriggerAuthentication"}, "without-prometheus-operator": {
    "PodMonitor", "PrometheusRule"}}  # fmt: skip


def checklist_steps() -> dict[str, str]:
    """Each marked shell block of the checklist by its mark, dedented as a reader copies it."""
    text = OPERATIONS.read_text(encoding="utf-8")
    marked = re.findall(r"^ *<!-- checklist: ([\w-]+) -->\n( *)```sh\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)
    return {name: textwrap.dedent(indent + body) for name, indent, body in marked}


def render(path: Path) -> tuple[str, list[dict]]:
    command = [kubectl(), "kustomize", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_base_has_the_placeholders_the_checklist_fills():
    text, _ = render(K8S / "base")
    for placeholder in ("REPLACE_WITH_MODEL_COMMIT_SHA", "REPLACE_ME", "ghcr.io/example/filter-worker"):
        assert placeholder in text and PLACEHOLDERS.search(placeholder)


@pytest.mark.parametrize("optional", [[], ["without-keda"], ["without-keda", "without-prometheus-operator"]])
def test_after_the_checklist_no_placeholder_is_left(tmp_path: Path, optional: list[str]):
    steps = checklist_steps()
    assert set(steps) == {"overlay", *OPTIONAL}, "the marks the test runs"
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    for name in ["overlay", *optional]:
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", steps[name]], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **VALUES},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr

    text, docs = render(tmp_path / "deploy" / "k8s" / "overlays" / "production")
    assert not PLACEHOLDERS.search(text), PLACEHOLDERS.findall(text)
    kinds = {doc["kind"] for doc in docs}
    assert "Secret" not in kinds, "the credentials come from kubectl create secret, not from git"
    left_out = set().union(*(OPTIONAL[name] for name in optional))
    assert {"Deployment", "ConfigMap", "PodDisruptionBudget", *(set().union(*OPTIONAL.values()) - left_out)} <= kinds
    assert not kinds & left_out
    assert {doc["metadata"].get("namespace") for doc in docs} == {VALUES["NAMESPACE"]}

    images = {
        container["image"]
        for doc in docs
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"{VALUES['REGISTRY']}/filter-worker:{VALUES['TAG']}"}, "the workers and the feedback service"
    config = next(doc["data"] for doc in docs if doc["metadata"]["name"] == "filter-worker-config")
    assert config["FILTER_MODEL__REVISION"] == VALUES["MODEL_REVISION"]
    assert config["FILTER_KAFKA__BOOTSTRAP_SERVERS"] == VALUES["KAFKA_BOOTSTRAP"]
    for scaler in (doc for doc in docs if doc["kind"] == "ScaledObject"):
        assert scaler["spec"]["triggers"][0]["metadata"]["bootstrapServers"] == VALUES["KAFKA_BOOTSTRAP"]


def test_the_checklist_creates_the_secret_the_pods_read_and_applies_the_overlay_it_wrote():
    text = OPERATIONS.read_text(encoding="utf-8")
    checklist = text[text.index("## Deploy checklist") : text.index("## Kubernetes")]
    created = set(re.findall(r"create secret generic ([\w-]+)", checklist))
    _, docs = render(K8S / "base")
    referenced = {
        volume["secret"]["secretName"]
        for doc in docs
        if doc["kind"] == "Deployment"
        for volume in doc["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in volume
    }
    assert referenced and referenced <= created
    assert "kubectl apply -k deploy/k8s/overlays/production" in checklist
    assert "rollout status deployment/filter-worker " in checklist and "/readyz" in checklist
