"""Secrets never reach a log line, a metric or an error message, at the most verbose logging there is.

The worker runs with ``FILTER_LOG__LEVEL=DEBUG``, every librdkafka debug context (``debug=all``: the
project allows all of them, because every line passes the redaction processor), message text in logs
allowed, SCRAM credentials (the password from a file) and mutual TLS with an encrypted key. The broker
behind the TLS front requires authentication and, with its memory storage, knows no user: every
attempt is refused, so the credentials are used again and again while the test reads every line.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import orjson

from filter_worker.tools.broker import EmbeddedBroker, free_port
from tests.integration.kafka_helpers import worker_settings
from tests.integration.processes import start_worker, wait_until, worker_env
from tests.integration.tls_front import TlsFront
from tests.tls_certs import KEY_PASSWORD, make_pki

SASL_PASSWORD = "sasl-password-that-must-stay-hidden"


def _pem_body_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]


def test_no_secret_in_any_log_line_metric_or_message_at_the_most_verbose_level(keyword_model, tmp_path):
    pki = make_pki(tmp_path / "pki")
    broker = EmbeddedBroker(advertised_port=free_port(), authentication=True).start()
    front = TlsFront(broker.advertised_port, broker.port, pki.server, client_ca=pki.ca).up()
    (tmp_path / "sasl-password").write_text(SASL_PASSWORD + "\n")
    (tmp_path / "key-password").write_text(KEY_PASSWORD + "\n")
    port = free_port()
    settings = worker_settings(f"127.0.0.1:{front.listen_port}", str(keyword_model))
    env = worker_env(
        settings,
        FILTER_KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        FILTER_KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
        FILTER_KAFKA__SASL_USERNAME="filter-worker",
        FILTER_KAFKA__SASL_PASSWORD_FILE=str(tmp_path / "sasl-password"),
        FILTER_KAFKA__SSL_CA_LOCATION=str(pki.ca),
        FILTER_KAFKA__SSL_CERTIFICATE_LOCATION=str(pki.client.cert),
        FILTER_KAFKA__SSL_KEY_LOCATION=str(pki.client_encrypted_key),
        FILTER_KAFKA__SSL_KEY_PASSWORD_FILE=str(tmp_path / "key-password"),
        FILTER_KAFKA__PROPERTIES=orjson.dumps({"debug": "all"}).decode(),
        FILTER_LOG__LEVEL="DEBUG",
        FILTER_LOG__INCLUDE_TEXT="true",
        FILTER_METRICS__PORT=str(port),
    )
    worker = start_worker(env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in worker.stdout), daemon=True)  # type: ignore[union-attr]
    reader.start()
    metrics = ""
    try:
        # librdkafka's lines reach the log when its queue is served; while start-up waits for Kafka that may
        # be only at the stop. Wait for attempts at the front, then read whatever was logged by the end.
        wait_until(lambda: front.handshakes >= 5, 120, "five TLS handshakes, each followed by a login")
        if worker.poll() is None:  # a worker that stops on refused credentials has no endpoint left to read
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                metrics = response.read().decode()
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        reader.join(timeout=30)
        front.down()
        broker.stop()
    output = "".join(lines) + metrics
    assert len(lines) > 100, "librdkafka's debug lines were logged"
    assert "SASL authentication error" in output, "the credentials were used, and refused"
    assert front.client_subjects == {"client"}, "the client certificate was presented"
    assert any('"librdkafka"' in line and '"debug"' in line for line in lines)
    secrets = {
        "the SASL password": SASL_PASSWORD,
        "the key's password": KEY_PASSWORD,
        "the key's path": str(pki.client_encrypted_key),
        **{f"line {n} of the key": line for n, line in enumerate(_pem_body_lines(pki.client_encrypted_key))},
    }
    leaked = [what for what, secret in secrets.items() if secret in output]
    assert not leaked, f"found in the output: {leaked}"
    assert str(pki.client.cert) in output or str(pki.ca) in output, "the test reads the output it means to"
