"""librdkafka's verdict on the Kafka client configuration, before anything slow (a model load) starts.

``FILTER_KAFKA__*PROPERTIES`` pass any librdkafka property through, so only librdkafka can say whether
one is valid, and it says so when a client is constructed (construction reads files such as
``ssl.ca.location`` but does not wait for the network). Without this check a typo in a property
surfaced as a ``KafkaException`` traceback after the model had loaded. Refusals name the variable
and the property; values never appear, since every pass-through value is treated as a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from filter_worker.config import ConfigError, KafkaSettings
from filter_worker.kafka import clients

# Each client the worker builds: its configuration, and which pass-through variables feed it.
_CLIENTS: tuple[tuple[str, Callable[[KafkaSettings], dict[str, object]], type, tuple[str, ...]], ...] = (
    ("consumer", clients.consumer_config, Consumer, ("properties", "consumer_properties")),
    ("producer", clients.producer_config, Producer, ("properties", "producer_properties")),
    ("admin", clients.admin_config, AdminClient, ("properties",)),
)
_PASS_THROUGH = ("properties", "consumer_properties", "producer_properties")
# Shorter values are not looked for in messages: "1" or "all" would also match ordinary words.
_MIN_REDACTED_LENGTH = 3


def _quiet() -> logging.Logger:
    """A sink for librdkafka's own log lines during the check (warnings about ignored properties, say)."""
    logger = logging.getLogger("filter_worker.kafka.client_check")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    return logger


def _refusal(client: type, config: dict[str, object]) -> str | None:
    """librdkafka's reason for refusing ``config``, or None when it builds a client from it."""
    try:
        instance = client({**config, "logger": _quiet()})
    except KafkaException as exc:
        return str(exc.args[0].str() if exc.args else exc)
    close = getattr(instance, "close", None)  # the admin client has none
    if close is not None:
        close()
    return None


def variable(field: str) -> str:
    return f"FILTER_KAFKA__{field.upper()}"


def _redact(message: str, kafka: KafkaSettings) -> str:
    secrets = [v.get_secret_value() for field in _PASS_THROUGH for v in getattr(kafka, field).values()]
    secrets += kafka.secret_values()  # passwords, and where the private key lies
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_REDACTED_LENGTH:
            message = message.replace(secret, "***")
    return message


def check_clients(kafka: KafkaSettings) -> None:
    """Raise ``ConfigError`` naming the variable (and property) when librdkafka refuses a client's configuration."""
    for role, build, client, fields in _CLIENTS:
        reason = _refusal(client, build(kafka))
        if reason is not None:
            raise ConfigError(_redact(_blame(kafka, role, build, client, fields, reason), kafka))


def _blame(
    kafka: KafkaSettings,
    role: str,
    build: Callable[[KafkaSettings], dict[str, object]],
    client: type,
    fields: tuple[str, ...],
    reason: str,
) -> str:
    """Which variable and property made librdkafka refuse ``role``'s configuration.

    The culprit is the property whose removal makes the configuration acceptable; removal rather than
    trying each property alone, because properties work together (credentials, TLS files).
    """
    for field in fields:
        # Properties that the reason names first: removing either security.protocol or ssl.ca.location
        # fixes "ssl.ca.location failed", but the file is what is wrong.
        for key in sorted(getattr(kafka, field), key=lambda k: k not in reason):
            rest = {k: v for k, v in getattr(kafka, field).items() if k != key}
            if _refusal(client, build(kafka.model_copy(update={field: rest}))) is None:
                return f"{variable(field)}: librdkafka refuses property {key!r} ({role} client): {reason}"
    used = [variable(field) for field in fields if getattr(kafka, field)]
    if "SASL mechanism" in reason:  # GSSAPI, with a librdkafka built without Cyrus SASL (the PyPI wheels)
        return f"FILTER_KAFKA__SASL_MECHANISM={kafka.sasl_mechanism}: librdkafka refuses it ({role} client): {reason}"
    if not used:
        return f"the Kafka {role} client configuration from the FILTER_KAFKA__* settings is refused: {reason}"
    return f"{' and '.join(used)}: librdkafka refuses the {role} client configuration: {reason}"
