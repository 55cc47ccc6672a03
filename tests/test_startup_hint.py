"""The one hint a service logs when Kafka has not answered for a while (``kafka/startup.py``)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import ClusterMetadata
from structlog.testing import capture_logs

from filter_worker.config import KafkaSettings
from filter_worker.kafka.startup import HINT_AFTER_S, StartupWatch, embedded_broker_hint
from tests.clock import ManualClock

REFUSED = "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused"


def _hints(bootstrap: str, seconds: list[float]) -> list[dict[str, object]]:
    """The hints logged by a watch checked at each of ``seconds`` after start-up began."""
    clock = ManualClock()
    started = clock.now
    watch = StartupWatch(KafkaSettings(bootstrap_servers=bootstrap), clock)
    try:
        with capture_logs() as logs:
            watch.error(KafkaError(KafkaError._TRANSPORT, REFUSED))
            for second in seconds:
                clock.now = started + second
                watch.check()
    finally:
        watch.reached()
    return [e for e in logs if e["event"] == "Kafka has not answered yet; still waiting"]


def test_no_hint_while_a_broker_may_still_be_coming_up():
    assert _hints("localhost:9092", [0, 5, HINT_AFTER_S - 0.1]) == []


def test_a_local_address_gets_what_was_tried_the_error_and_how_to_start_the_embedded_broker_once():
    hints = _hints("localhost:9092", [0, HINT_AFTER_S, HINT_AFTER_S + 10, HINT_AFTER_S + 20])
    assert len(hints) == 1
    assert hints[0]["tried"] == "localhost:9092" and hints[0]["error"] == REFUSED
    assert "`filter-worker broker --topics`" in str(hints[0]["hint"])


@pytest.mark.parametrize("bootstrap", ["kafka-0.kafka:9092", "127.0.0.1:9092,kafka-1:9092"])
def test_a_remote_address_is_not_told_to_start_the_embedded_broker(bootstrap):
    hints = _hints(bootstrap, [HINT_AFTER_S])
    assert len(hints) == 1 and "broker --topics" not in str(hints[0]["hint"])
    assert "FILTER_KAFKA__BOOTSTRAP_SERVERS" in str(hints[0]["hint"])


def _metadata(cluster_id: str) -> ClusterMetadata:
    metadata = ClusterMetadata()
    metadata.cluster_id = cluster_id
    return metadata


@pytest.mark.parametrize(
    ("cluster_id", "session_timeout_ms", "hinted"),
    [("tansu_cluster", 45_000, True), ("tansu_cluster", 6_000, False), ("kafka-prod-7Xq", 45_000, False)],
)
def test_the_embedded_broker_with_a_long_session_timeout_is_named_once(cluster_id, session_timeout_ms, hinted):
    kafka = KafkaSettings(session_timeout_ms=session_timeout_ms)
    with capture_logs() as logs:
        embedded_broker_hint(_metadata(cluster_id), kafka)
    assert len(logs) == int(hinted)
    if hinted:
        assert "joining will take about 23 s" in logs[0]["event"]
        assert "FILTER_KAFKA__SESSION_TIMEOUT_MS=6000" in logs[0]["event"]
