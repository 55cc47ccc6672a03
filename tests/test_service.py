"""The service shell shared by ``run`` and ``feedback``: client errors, reload requests, the HTTP port."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka import KafkaError
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from filter_worker.config import ConfigError, KafkaSettings
from filter_worker.monitoring.health import Health
from filter_worker.service.shell import CLIENT_ERROR_LOG_INTERVAL_S, ServiceShell
from tests.clock import ManualClock


def shell(clock: ManualClock, port: int | None = None) -> ServiceShell:
    return ServiceShell(Health(60, clock), CollectorRegistry(), KafkaSettings(), port, "FILTER_METRICS__PORT", clock)


def test_a_client_error_repeated_hundreds_of_times_a_second_is_logged_once_per_interval():
    clock = ManualClock()
    service = shell(clock)
    with capture_logs() as logs:
        for attempt in range(500):
            err = f"x:9092/bootstrap: Failed to resolve 'x:9092' (after {attempt}ms in state CONNECT)"
            service.client_error(KafkaError(KafkaError._RESOLVE, err))
        clock.now += CLIENT_ERROR_LOG_INTERVAL_S
        service.client_error(KafkaError(KafkaError._RESOLVE, "x:9092/bootstrap: Failed to resolve 'x:9092'"))
    lines = [e for e in logs if e["event"] == "kafka client error"]
    assert [line["repeats"] for line in lines] == [0, 499]


def test_a_fatal_client_error_goes_to_the_failure_slot_and_an_unreachable_broker_only_unreadies():
    clock = ManualClock()
    service = shell(clock)
    service.health.broker_reachable = True
    service.client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all down"))
    assert not service.health.broker_reachable and service.failures.failure is None
    service.client_error(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    assert service.failures.failure is not None and "fenced" in str(service.failures.failure)


def test_a_reload_request_is_taken_once():
    service = shell(ManualClock())
    assert not service.reload_requested()
    service.request_reload()
    assert service.reload_requested() and not service.reload_requested()


def test_a_port_in_use_is_a_configuration_error_naming_the_setting():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"FILTER_METRICS__PORT={port}"):
            shell(ManualClock(), port).start_http()
