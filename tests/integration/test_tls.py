"""Every command that talks to Kafka, against a broker only reachable over TLS.

The embedded broker advertises a TLS front (``tls_front.py``), so bootstrap and partition
connections alike must speak TLS; a plain-text client is refused. Hostname verification is
librdkafka's default and stays on: the front's certificate names 127.0.0.1, and the certificate
tests show a wrong name refused. Mutual TLS: the front then requires a client certificate signed by
the test CA, and records the names it saw, so a test proves the certificate was presented.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from filter_worker.config import Settings
from filter_worker.kafka import clients
from filter_worker.security import tls
from filter_worker.tools.broker import EmbeddedBroker, free_port
from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import start_worker, wait_until, worker_env
from tests.integration.tls_front import TlsFront
from tests.tls_certs import KEY_PASSWORD, Pki, make_pki

TEXTS = [b'{"text": "a wonderful day"}', b'{"text": "you idiot"}', b'{"text": "this is broken"}', b"not json"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[tuple[EmbeddedBroker, TlsFront]]:
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    front = TlsFront(broker.advertised_port, broker.port, pki.server).up()
    try:
        yield broker, front
    finally:
        front.down()
        broker.stop()


@pytest.fixture
def front(tls_broker: tuple[EmbeddedBroker, TlsFront], pki: Pki) -> Iterator[TlsFront]:
    """The front, presenting the trusted server certificate and no client check unless a test says otherwise."""
    _, front = tls_broker
    front.serve(pki.server)
    yield front
    front.serve(pki.server)


def tls_variables(pki: Pki, key_password_file: Path | None = None) -> dict[str, str]:
    """Server verification only; with ``key_password_file``, mutual TLS with the encrypted key."""
    variables = {"FILTER_KAFKA__SECURITY_PROTOCOL": "SSL", "FILTER_KAFKA__SSL_CA_LOCATION": str(pki.ca)}
    if key_password_file is not None:
        key_password_file.write_text(KEY_PASSWORD + "\n")
        variables |= {
            "FILTER_KAFKA__SSL_CERTIFICATE_LOCATION": str(pki.client.cert),
            "FILTER_KAFKA__SSL_KEY_LOCATION": str(pki.client_encrypted_key),
            "FILTER_KAFKA__SSL_KEY_PASSWORD_FILE": str(key_password_file),
        }
    return variables


def tls_settings(front: TlsFront, model: str, pki: Pki, mutual: bool, **overrides: object) -> Settings:
    """The test's own clients' settings (topics, producing, reading back) for the same broker."""
    kafka: dict[str, object] = {"kafka__security_protocol": "SSL", "kafka__ssl_ca_location": str(pki.ca)}
    if mutual:
        kafka |= {
            "kafka__ssl_certificate_location": str(pki.client.cert),
            "kafka__ssl_key_location": str(pki.client.key),
        }
    return worker_settings(f"127.0.0.1:{front.listen_port}", model, **kafka, **overrides)


def _route_everything(settings: Settings, variables: dict[str, str], exactly_once: bool) -> None:
    create_topics(settings, input_partitions=2)
    config = settings.kafka.client_properties()
    produced = produce(settings.kafka.bootstrap_servers, settings.topics.input[0], TEXTS * 5, config=config)
    extra = {"FILTER_KAFKA__EXACTLY_ONCE": "true"} if exactly_once else {}
    worker = start_worker(worker_env(settings, **variables, **extra))
    try:
        outputs = read_outputs(settings, expected=len(produced))
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        log = worker.communicate(timeout=60)[0].decode()
    assert worker.returncode == 0, log
    assert sorted(o.source for o in outputs) == sorted((p.partition, p.offset) for p in produced), "each once"
    by_action = {o.headers["filter.action"] for o in outputs}
    assert by_action == {b"allow", b"drop", b"quarantine", b"dead_letter"}


def test_run_routes_everything_over_tls_and_plain_text_is_refused(front, pki, keyword_model):
    settings = tls_settings(front, str(keyword_model), pki, mutual=False)
    refused_before = front.refused
    _route_everything(settings, tls_variables(pki), exactly_once=False)
    assert front.handshakes > 0
    plain = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    with pytest.raises(KafkaException):
        plain.list_topics(timeout=3)
    assert front.refused > refused_before, "the plain-text client reached the front and was refused there"


def test_run_in_exactly_once_mode_over_mutual_tls(front, pki, keyword_model, tmp_path):
    front.serve(pki.server, client_ca=pki.ca)
    front.client_subjects.clear()
    settings = tls_settings(front, str(keyword_model), pki, mutual=True)
    _route_everything(settings, tls_variables(pki, tmp_path / "key-password"), exactly_once=True)
    assert front.client_subjects == {"client"}, "every connection presented the client certificate"


def test_produce_over_mutual_tls(front, pki, keyword_model, tmp_path):
    front.serve(pki.server, client_ca=pki.ca)
    settings = tls_settings(front, str(keyword_model), pki, mutual=True)
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]
    env = {**worker_env(settings), **tls_variables(pki, tmp_path / "key-password")}
    args = [sys.executable, "-m", "filter_worker", "produce", "--count", "25", "--rate", "500", "--topic", topic]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Counted by reading: the embedded broker's high watermark counts record batches, not records.
    consumer = Consumer({**settings.kafka.client_properties(), "group.id": f"count-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while len(values) < 25 and time.monotonic() < deadline:
            values += [m.value() for m in consumer.consume(100, 0.5) if m.error() is None]  # type: ignore[misc]
    finally:
        consumer.close()
    assert len(values) == 25 and all(orjson.loads(v)["text"] for v in values)


def _verdict(n: int, verdict: str, score: float) -> tuple[list[tuple[str, bytes]], bytes]:
    headers = [
        ("filter.action", b"drop"),
        ("filter.rule", b"very-negative"),
        ("filter.scope", b"default"),
        ("filter.score", f"{score:.6f}".encode()),
        ("filter.model", b"keyword@local#sha256:0011223344556677"),
    ]
    return headers, orjson.dumps({"source": f"messages/0/{n}", "verdict": verdict, "reviewer": "ann"})


def test_feedback_and_calibrate_from_feedback_over_mutual_tls(front, pki, keyword_model, tmp_path):
    front.serve(pki.server, client_ca=pki.ca)
    settings = tls_settings(front, str(keyword_model), pki, mutual=True)
    topic = f"verdicts-{uuid.uuid4().hex[:8]}"
    clients.create_topics(AdminClient(settings.kafka.client_properties()), [topic], 1)
    verdicts = [_verdict(n, "abuse" if n % 10 else "ok", 0.9 + n / 1000) for n in range(60)]
    producer = Producer(settings.kafka.client_properties())
    for headers, value in verdicts:
        producer.produce(topic, value=value, headers=headers)
    assert producer.flush(30) == 0
    port = free_port()
    env = {
        **worker_env(settings),
        **tls_variables(pki, tmp_path / "key-password"),
        "FILTER_FEEDBACK__TOPIC": topic,
        "FILTER_FEEDBACK__METRICS_PORT": str(port),
        "FILTER_FEEDBACK__WINDOW": "100",
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "filter_worker", "feedback"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    group = f"{settings.kafka.group_id}-feedback"
    reader = Consumer({**settings.kafka.client_properties(), "group.id": group})

    def committed() -> int:
        return reader.committed([TopicPartition(topic, 0)], timeout=10)[0].offset

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(lambda: committed() == len(verdicts), 90, "every verdict counted and committed")
        wait_until(ready, 10, "readiness: joined, broker reachable")
    finally:
        reader.close()
        service.send_signal(signal.SIGTERM)
        log = service.communicate(timeout=60)[0].decode()
    assert service.returncode == 0, log

    args = ["calibrate", "--from-feedback", topic, "--rule", "very-negative", "--target-precision", "0.6"]
    result = subprocess.run(
        [sys.executable, "-m", "filter_worker", *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert "60 verdicts on rule very-negative" in result.stdout
    rule = orjson.loads(result.stdout.splitlines()[-1])
    assert rule["name"] == "very-negative" and rule["action"] == "drop"


def test_bench_over_tls(front, pki, keyword_model, tmp_path):
    settings = tls_settings(front, str(keyword_model), pki, mutual=False)
    args = ["bench", "--model", str(keyword_model), "--bootstrap-servers", settings.kafka.bootstrap_servers]
    args += ["--messages", "40", "--rounds", "1", "--compare-dtypes", "none", "--naive-count", "5"]
    args += ["--latency-seconds", "2", "--json", str(tmp_path / "bench.json")]
    result = subprocess.run(
        [sys.executable, "-m", "filter_worker", *args],
        env={**worker_env(settings), **tls_variables(pki)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("served", "reason"),
    [
        ("untrusted_server", "unable to get local issuer certificate"),
        ("wrong_host_server", "IP address mismatch, certificate is not valid for '127.0.0.1'."),
        ("expired_server", "certificate has expired"),
    ],
)
def test_openssl_names_the_certificate_problem_librdkafka_reports_as_verify_failed(front, pki, served, reason):
    front.serve(getattr(pki, served))
    assert tls.broker_certificate_problem(f"127.0.0.1:{front.listen_port}", pki.ca) == reason
    front.serve(pki.server)
    assert tls.broker_certificate_problem(f"127.0.0.1:{front.listen_port}", pki.ca) is None


@pytest.mark.parametrize(
    ("command", "served", "named"),
    [
        ("run", "untrusted_server", "(unable to get local issuer certificate): it is not signed by a CA in"),
        ("feedback", "wrong_host_server", "the certificate is not valid for '127.0.0.1'"),
        ("feedback", "expired_server", "(certificate has expired): the broker's certificate has expired"),
    ],
)
def test_an_untrusted_certificate_stops_start_up_within_60_s_naming_it(
    front, pki, keyword_model, command, served, named
):
    front.serve(getattr(pki, served))
    settings = tls_settings(front, str(keyword_model), pki, mutual=False)
    env = worker_env(settings, **tls_variables(pki), FILTER_FEEDBACK__METRICS_PORT="0")
    process = subprocess.Popen(
        [sys.executable, "-m", "filter_worker", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    started = time.monotonic()
    try:
        log = process.communicate(timeout=75)[0].decode()
    except subprocess.TimeoutExpired:
        process.kill()
        log = process.communicate()[0].decode()
    assert process.returncode == 2, log[-3000:]
    assert time.monotonic() - started < 75, "within 60 s of waiting (the model loads first)"
    assert f"the certificate of the broker at 127.0.0.1:{front.listen_port} cannot be trusted" in log
    assert named in log and "Traceback" not in log
