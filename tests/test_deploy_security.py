"""Secrets and certificates in the deployment files: mounted as files, where the settings point.

The base manifests read the SASL password from the Secret mounted as a file; the ``mtls`` overlay and
the compose override ``deploy/compose/kafka-tls.yml`` mount the CA, the client certificate and key.
Each path a setting names must be inside a mount of the right Secret key, and the settings must
validate once real files lie there (the shipped placeholders do not, on purpose).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from filter_worker.config import ConfigError, load_settings
from tests.test_deploy import (
    COMPOSE,
    FEEDBACK_DEPLOYMENT,
    K8S,
    ROOT,
    WORKER_DEPLOYMENT,
    compose_binary,
    container,
    k8s_docs,
    kubectl,
    one,
    valid_env_names,
)
from tests.tls_certs import make_pki

TLS_OVERRIDE = ROOT / "deploy" / "compose" / "kafka-tls.yml"
FILE_SETTINGS = (
    "FILTER_KAFKA__SASL_PASSWORD_FILE",
    "FILTER_KAFKA__SSL_CA_LOCATION",
    "FILTER_KAFKA__SSL_CERTIFICATE_LOCATION",
    "FILTER_KAFKA__SSL_KEY_LOCATION",
)


def _secret_files(deployment: dict, name: str, keys_of: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """Each file a Secret volume puts in the container: its path -> (secret name, key).

    ``keys_of`` gives each Secret's keys, for volumes that mount all of them.
    """
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    files = {}
    for mount in container(deployment, name)["volumeMounts"]:
        secret = volumes.get(mount["name"])
        if secret is None:
            continue
        assert mount.get("readOnly") is True, f"{mount['name']} is mounted writable"
        items = secret.get("items") or [{"key": k, "path": k} for k in keys_of[secret["secretName"]]]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (secret["secretName"], item["key"])
        assert secret.get("defaultMode") == 0o440, "readable by the pod's group only"
    return files


def _file_settings(deployment: dict, name: str) -> dict[str, str]:
    env = container(deployment, name).get("env", [])
    return {e["name"]: e["value"] for e in env if e["name"] in FILE_SETTINGS}


@pytest.mark.parametrize(("path", "name"), [(WORKER_DEPLOYMENT, "worker"), (FEEDBACK_DEPLOYMENT, "feedback")])
def test_the_sasl_password_is_a_mounted_file_not_an_environment_variable(path, name):
    deployment = one(path, "Deployment")
    env = {e["name"] for e in container(deployment, name)["env"]}
    assert "FILTER_KAFKA__SASL_PASSWORD" not in env
    settings = _file_settings(deployment, name)
    secret = one(K8S / "base" / "secret.yaml", "Secret")
    files = _secret_files(deployment, name, {secret["metadata"]["name"]: list(secret["stringData"])})
    assert files[settings["FILTER_KAFKA__SASL_PASSWORD_FILE"]] == (
        secret["metadata"]["name"],
        "password",
    )
    assert "password" in secret["stringData"]


def _built(overlay: str) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_mtls_overlay_mounts_the_ca_certificate_and_key_where_the_settings_point(tmp_path, monkeypatch):
    docs = _built("overlays/mtls")
    secrets = {doc["metadata"]["name"]: list(doc["stringData"]) for doc in docs if doc["kind"] == "Secret"}
    tls = {"stringData": dict.fromkeys(secrets["filter-worker-kafka-tls"])}
    assert set(tls["stringData"]) == {"ca.crt", "tls.crt", "tls.key"}
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    pki = make_pki(tmp_path / "pki")
    real = {"ca.crt": pki.ca, "tls.crt": pki.client.cert, "tls.key": pki.client.key, "password": None}
    pairs = ((deployments["filter-worker"], "worker"), (deployments["filter-worker-feedback"], "feedback"))
    for deployment, name in pairs:
        files, settings = _secret_files(deployment, name, secrets), _file_settings(deployment, name)
        assert set(settings) == set(FILE_SETTINGS)
        expected = {
            "FILTER_KAFKA__SSL_CA_LOCATION": ("filter-worker-kafka-tls", "ca.crt"),
            "FILTER_KAFKA__SSL_CERTIFICATE_LOCATION": ("filter-worker-kafka-tls", "tls.crt"),
            "FILTER_KAFKA__SSL_KEY_LOCATION": ("filter-worker-kafka-tls", "tls.key"),
            "FILTER_KAFKA__SASL_PASSWORD_FILE": ("filter-worker-kafka", "password"),
        }
        assert {variable: files[path] for variable, path in settings.items()} == expected
        # The settings validate once the Secrets hold real files: each path, moved under tmp_path.
        for key in [k for k in os.environ if k.startswith("FILTER_")]:
            monkeypatch.delenv(key)
        config = one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"]
        for variable, value in config.items():
            monkeypatch.setenv(variable, value)
        for variable, path in settings.items():
            local = tmp_path / name / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            source = real[files[path][1]]
            local.write_bytes(source.read_bytes() if source else b"a-password\n")
            monkeypatch.setenv(variable, str(local))
        monkeypatch.setenv("FILTER_KAFKA__SASL_USERNAME", "filter-worker")
        kafka = load_settings().kafka
        assert kafka.client_properties()["ssl.certificate.location"].endswith("/etc/kafka/tls/tls.crt")
    auth = next(doc for doc in docs if doc["kind"] == "TriggerAuthentication")
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert refs["ca"] == ("filter-worker-kafka-tls", "ca.crt") and refs["key"] == ("filter-worker-kafka-tls", "tls.key")


def test_the_compose_tls_override_mounts_every_file_a_setting_names():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILTER_")}
    args = [*compose_binary(), "-f", str(COMPOSE), "-f", str(TLS_OVERRIDE), "config", "--format", "json"]
    missing = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert missing.returncode != 0 and "is missing a value" in missing.stderr, "the cluster and user must be named"
    env |= {"KAFKA_BOOTSTRAP_SERVERS": "broker.example.com:9093", "KAFKA_SASL_USERNAME": "filter-worker"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    for service in ("worker", "feedback", "loadgen"):
        spec = resolved["services"][service]
        mounted = {s["target"]: s["source"] for s in spec["secrets"]}
        environment = spec["environment"]
        assert set(environment) <= valid_env_names()
        for variable in FILE_SETTINGS:
            source = mounted[environment[variable]]
            assert Path(resolved["secrets"][source]["file"]).parent == ROOT / "secrets"
        assert environment["FILTER_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert "/secrets/" in (ROOT / ".gitignore").read_text().splitlines(), "secrets never go into git"


def test_the_mtls_overlay_placeholder_secret_is_refused_at_start_up(tmp_path, monkeypatch):
    tls = next(doc for doc in k8s_docs(K8S / "overlays" / "mtls" / "tls-secret.yaml") if doc["kind"] == "Secret")
    (tmp_path / "ca.crt").write_text(tls["stringData"]["ca.crt"])
    monkeypatch.setenv("FILTER_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("FILTER_KAFKA__SSL_CA_LOCATION", str(tmp_path / "ca.crt"))
    with pytest.raises(ConfigError, match="FILTER_KAFKA__SSL_CA_LOCATION: .* holds no PEM certificate"):
        load_settings()
