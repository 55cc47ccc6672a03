"""librdkafka judges the pass-through properties at start-up; the error names the variable, never a value."""

from __future__ import annotations

import pytest

from filter_worker.config import ConfigError, KafkaSettings
from filter_worker.kafka.client_check import check_clients


def test_the_default_and_a_valid_pass_through_configuration_are_accepted():
    check_clients(KafkaSettings())
    check_clients(
        KafkaSettings(
            properties={"socket.keepalive.enable": "true"},
            consumer_properties={"fetch.min.bytes": "1"},
            producer_properties={"compression.type": "zstd"},
            exactly_once=True,
        )
    )


@pytest.mark.parametrize(
    ("field", "props", "named"),
    [
        ("properties", {"bogus.property": "1"}, "FILTER_KAFKA__PROPERTIES: librdkafka refuses property 'bogus"),
        ("consumer_properties", {"fetch.wait.max.ms": "never"}, "FILTER_KAFKA__CONSUMER_PROPERTIES"),
        ("producer_properties", {"linger.ms": "soon"}, "FILTER_KAFKA__PRODUCER_PROPERTIES"),
    ],
)
def test_a_refused_property_names_its_variable(field, props, named):
    with pytest.raises(ConfigError, match=named):
        check_clients(KafkaSettings(**{field: props}))


def test_a_tls_file_that_does_not_exist_is_blamed_on_the_property_naming_it(tmp_path):
    props = {"security.protocol": "SSL", "ssl.ca.location": str(tmp_path / "ca.pem")}
    with pytest.raises(ConfigError, match="FILTER_KAFKA__PROPERTIES: librdkafka refuses property 'ssl.ca.location'"):
        check_clients(KafkaSettings(properties=props))


def test_values_never_appear_in_the_message():
    # librdkafka echoes an invalid value ('Invalid value "..." for configuration property ...').
    with pytest.raises(ConfigError) as err:
        check_clients(KafkaSettings(producer_properties={"compression.type": "hunter2-secret"}))
    assert "hunter2-secret" not in str(err.value) and '"***"' in str(err.value)
