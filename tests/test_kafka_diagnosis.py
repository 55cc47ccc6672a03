"""The start-up diagnosis, fed what librdkafka 2.16.0 said in each situation (captured against the
embedded broker, its TLS front and a name that does not resolve): what is logged when, and what stops.
"""

from __future__ import annotations

import pytest

from filter_worker.config import KafkaSettings
from filter_worker.exit_codes import ExitCode
from filter_worker.kafka.diagnosis import (
    AUTHENTICATION,
    RESOLVE,
    TLS_CLOSED,
    UNREACHABLE,
    UNTRUSTED,
    WANTS_PLAINTEXT,
    WANTS_TLS,
    KafkaDiagnosis,
    classify,
)

RESOLVE_LINE = (
    "[thrd:locahost:9092/bootstrap]: locahost:9092/bootstrap: Failed to resolve 'locahost:9092': Name or service "
    "not known (after {n}ms in state CONNECT)"
)
RESOLVE_ERROR = (
    "locahost:9092/bootstrap: Failed to resolve 'locahost:9092': Name or service not known (after 0ms in state CONNECT)"  # noqa: E501
)
REFUSED_LINE = (
    "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection "
    "refused (after 0ms in state CONNECT)"
)
VERIFY_ERROR = (
    "ssl://127.0.0.1:55643/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: "
    "broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA "
    "certificates are installed (install ca-certificates package) (after 4ms in state SSL_HANDSHAKE)"
)
SCRAM_ERROR = (
    "sasl_plaintext://127.0.0.1:57757/bootstrap: SASL authentication error: SASL SCRAM authentication failed: "
    "broker responded with unknown-user (after 17ms in state AUTH_REQ)"
)
PLAIN_UNSUPPORTED = (
    "sasl_plaintext://127.0.0.1:57757/bootstrap: SASL PLAIN mechanism handshake failed: Local: Broker transport "
    "failure: broker's supported mechanisms: (n/a) (after 0ms in state DOWN)"
)
TLS_CLOSED_LINE = (
    "[thrd:ssl://127.0.0.1:58811/bootstrap]: ssl://127.0.0.1:58811/bootstrap: Disconnected: SSL connection closed "
    "by peer (after 0ms in state APIVERSION_QUERY)"
)
PLAIN_TO_TLS_LINE = (
    "[thrd:127.0.0.1:58811/bootstrap]: 127.0.0.1:58811/bootstrap: Disconnected: connection closed by peer: receive 0 "
    "after POLLIN (after 1ms in state APIVERSION_QUERY)"
)
# A TLS client at a plain-text listener (librdkafka 2.16.0): Apache Kafka resets the connection; a broker
# that waits for the rest of what it read as a request (the embedded one) lets the handshake time out.
TLS_TO_PLAIN_RESET = (
    "[thrd:ssl://127.0.0.1:37273/bootstrap]: ssl://127.0.0.1:37273/bootstrap: SSL handshake failed: Disconnected: "
    "connection reset by peer: connecting to a PLAINTEXT broker listener? (after 0ms in state SSL_HANDSHAKE)"
)
TLS_TO_PLAIN_TIMEOUT = (
    "[thrd:ssl://127.0.0.1:46533/bootstrap]: ssl://127.0.0.1:46533/bootstrap: Connection setup timed out in state "
    "SSL_HANDSHAKE (after 30078ms in state SSL_HANDSHAKE)"
)
TLS = KafkaSettings(security_protocol="SSL")


@pytest.mark.parametrize(
    ("text", "tls", "code", "kind", "broker"),
    [
        (RESOLVE_LINE.format(n=3), False, None, RESOLVE, "locahost:9092"),
        (RESOLVE_ERROR, False, "_RESOLVE", RESOLVE, "locahost:9092"),
        (REFUSED_LINE, False, None, UNREACHABLE, "127.0.0.1:9092"),
        (VERIFY_ERROR, True, "_SSL", UNTRUSTED, "127.0.0.1:55643"),
        (SCRAM_ERROR, False, "_AUTHENTICATION", AUTHENTICATION, "127.0.0.1:57757"),
        (PLAIN_UNSUPPORTED, False, None, AUTHENTICATION, "127.0.0.1:57757"),
        (TLS_CLOSED_LINE, True, None, TLS_CLOSED, "127.0.0.1:58811"),
        (PLAIN_TO_TLS_LINE, False, None, WANTS_TLS, "127.0.0.1:58811"),
        (TLS_TO_PLAIN_RESET, True, None, WANTS_PLAINTEXT, "127.0.0.1:37273"),
        (TLS_TO_PLAIN_TIMEOUT, True, None, WANTS_PLAINTEXT, "127.0.0.1:46533"),
    ],
    ids=[
        "resolve-log",
        "resolve-error",
        "refused",
        "untrusted",
        "scram",
        "plain-unsupported",
        "tls-closed",
        "plain",
        "tls-to-plain-reset",
        "tls-to-plain-timeout",
    ],
)
def test_librdkafkas_words_are_classified(text, tls, code, kind, broker):
    cause = classify(text, tls, code)
    assert cause is not None and (cause.kind, cause.broker) == (kind, broker)
    assert "(after" not in cause.text, "the timing suffix is no part of the cause"


def test_summaries_are_no_cause():
    assert classify("1/1 brokers are down", False, "_ALL_BROKERS_DOWN") is None


def test_a_name_that_never_resolves_is_logged_at_once_then_at_a_bounded_rate_and_stops_after_the_window():
    diagnosis = KafkaDiagnosis(KafkaSettings(bootstrap_servers="locahost:9092"), started=0.0, window_s=60, repeat_s=30)
    for i in range(500):  # librdkafka retried about 150 times a second
        diagnosis.log_line(i * 0.004, "FAIL", RESOLVE_LINE.format(n=i % 4))
    (first,) = diagnosis.due(2.0)
    assert first.cause.kind == RESOLVE and first.repeats == 499
    assert "Failed to resolve 'locahost:9092'" in first.cause.text
    assert diagnosis.stop(2.0) is None, "DNS can lag at a pod's start: not yet"
    logged = []
    for second in range(3, 60):
        diagnosis.error(float(second), "_RESOLVE", RESOLVE_ERROR)
        logged += diagnosis.due(float(second))
        assert diagnosis.stop(float(second)) is None
    # logged at 2 s, then at 32 s with the 30 events of seconds 3 to 32, and not again before 62 s
    assert [report.repeats for report in logged] == [30], "once in 30 s, with the repeats in between"
    diagnosis.log_line(60.0, "FAIL", RESOLVE_LINE.format(n=0))
    stop = diagnosis.stop(60.0)
    assert stop is not None and stop.code == ExitCode.CONFIG
    assert stop.message.startswith("Kafka cannot be reached: the broker name 'locahost' did not resolve for 60 s")
    assert stop.message.endswith("check FILTER_KAFKA__BOOTSTRAP_SERVERS=locahost:9092")


def test_a_broker_that_is_not_up_yet_is_waited_for():
    diagnosis = KafkaDiagnosis(KafkaSettings(bootstrap_servers="127.0.0.1:9092"), started=0.0, window_s=60)
    for second in range(600):
        diagnosis.log_line(float(second), "FAIL", REFUSED_LINE)
        assert diagnosis.stop(float(second)) is None
    assert [r.cause.kind for r in diagnosis.due(600.0)] == [UNREACHABLE]


def test_a_name_that_resolves_but_is_refused_is_waited_for():
    # Several bootstrap servers, one a typo: the others answer at the TCP level, so waiting can help.
    kafka = KafkaSettings(bootstrap_servers="locahost:9092,127.0.0.1:9092")
    diagnosis = KafkaDiagnosis(kafka, started=0.0, window_s=60)
    for second in range(120):
        diagnosis.log_line(float(second), "FAIL", RESOLVE_LINE.format(n=0))
        diagnosis.log_line(float(second), "FAIL", REFUSED_LINE)
    assert diagnosis.stop(120.0) is None


def test_an_untrusted_certificate_stops_at_once_naming_the_ca_setting_and_the_reason():
    asked = []

    def explain(broker: str) -> str:
        asked.append(broker)
        return "unable to get local issuer certificate"

    kafka = KafkaSettings(security_protocol="SSL")
    diagnosis = KafkaDiagnosis(kafka, started=0.0, explain_certificate=explain)
    diagnosis.error(0.5, "_SSL", VERIFY_ERROR)
    stop = diagnosis.stop(0.5)
    assert stop is not None and asked == ["127.0.0.1:55643"]
    assert stop.message == (
        "the certificate of the broker at 127.0.0.1:55643 cannot be trusted (unable to get local issuer certificate): "
        "it is not signed by a CA in FILTER_KAFKA__SSL_CA_LOCATION (unset: the system's CA store is used)"
    )


@pytest.mark.parametrize(
    ("detail", "fix"),
    [
        ("certificate has expired", "the broker's certificate has expired: renew it on the broker"),
        (
            "Hostname mismatch, certificate is not valid for '127.0.0.1'.",
            "the certificate is not valid for '127.0.0.1': FILTER_KAFKA__BOOTSTRAP_SERVERS",
        ),
        ("IP address mismatch, certificate is not valid for '127.0.0.1'.", "must use a name the certificate lists"),
        (None, "(certificate verify failed): it is not signed by a CA in FILTER_KAFKA__SSL_CA_LOCATION"),
    ],
)
def test_the_certificate_problem_decides_the_setting_named(detail, fix):
    diagnosis = KafkaDiagnosis(TLS, started=0.0, explain_certificate=lambda _: detail)
    diagnosis.error(1.0, "_SSL", VERIFY_ERROR)
    stop = diagnosis.stop(1.0)
    assert stop is not None and fix in stop.message


def test_refused_authentication_stops_at_once_naming_the_credentials():
    kafka = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="hunter2-pw"
    )
    diagnosis = KafkaDiagnosis(kafka, started=0.0)
    diagnosis.error(0.2, "_AUTHENTICATION", SCRAM_ERROR)
    stop = diagnosis.stop(0.2)
    assert stop is not None and stop.code == ExitCode.CONFIG
    assert "refused authentication (SASL authentication error: SASL SCRAM authentication failed" in stop.message
    assert (
        "FILTER_KAFKA__SASL_USERNAME" in stop.message and "FILTER_KAFKA__SASL_MECHANISM=SCRAM-SHA-512" in stop.message
    )
    assert "hunter2-pw" not in stop.message


def test_tls_connections_closed_after_the_handshake_stop_after_the_window_asking_for_a_client_certificate():
    diagnosis = KafkaDiagnosis(TLS, started=0.0, window_s=30)
    for second in range(31):
        diagnosis.log_line(float(second), "FAIL", TLS_CLOSED_LINE)
    stop = diagnosis.stop(30.0)
    assert stop is not None and "closed every TLS connection right after the handshake for 30 s" in stop.message
    assert "set FILTER_KAFKA__SSL_CERTIFICATE_LOCATION and FILTER_KAFKA__SSL_KEY_LOCATION" in stop.message


def test_plain_text_connections_closed_at_the_first_request_stop_asking_for_tls():
    diagnosis = KafkaDiagnosis(KafkaSettings(), started=0.0, window_s=30)
    diagnosis.log_line(1.0, "FAIL", PLAIN_TO_TLS_LINE)
    assert diagnosis.stop(29.0) is None
    stop = diagnosis.stop(30.0)
    assert stop is not None and "FILTER_KAFKA__SECURITY_PROTOCOL is PLAINTEXT (use SSL or SASL_SSL)" in stop.message


@pytest.mark.parametrize("line", [TLS_TO_PLAIN_RESET, TLS_TO_PLAIN_TIMEOUT], ids=["reset", "timed-out"])
def test_tls_handshakes_a_plain_text_listener_never_completes_stop_after_the_window_asking_for_plain_text(line):
    diagnosis = KafkaDiagnosis(TLS, started=0.0, window_s=30)
    diagnosis.log_line(1.0, "FAIL", line)
    assert diagnosis.stop(29.0) is None
    stop = diagnosis.stop(30.0)
    assert stop is not None and "completed no TLS handshake for 30 s" in stop.message
    assert "FILTER_KAFKA__SECURITY_PROTOCOL is SSL (use PLAINTEXT or SASL_PLAINTEXT" in stop.message


def test_a_handshake_timeout_without_tls_is_waited_for():
    """A plain-text client never handshakes: a timeout in that state cannot be about TLS."""
    cause = classify(TLS_TO_PLAIN_TIMEOUT, False)
    assert cause is not None and cause.kind == UNREACHABLE


def test_once_kafka_answered_nothing_seen_before_stops_start_up():
    diagnosis = KafkaDiagnosis(TLS, started=0.0)
    diagnosis.error(1.0, "_SSL", VERIFY_ERROR)
    diagnosis.reached()
    diagnosis.error(2.0, "_SSL", VERIFY_ERROR)
    assert diagnosis.stop(2.0) is None and diagnosis.due(2.0) == []


def test_other_facilities_are_not_causes():
    diagnosis = KafkaDiagnosis(KafkaSettings(), started=0.0, window_s=1)
    assert diagnosis.log_line(0.0, "CONNECT", RESOLVE_LINE.format(n=0)) is None
    assert diagnosis.stop(100.0) is None
