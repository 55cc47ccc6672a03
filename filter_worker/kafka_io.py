"""The Kafka edge: client configuration, message conversion, topic checks.

Only this module and ``worker.py`` import confluent_kafka. Delivery guarantees are decided here:
manual commits only (no auto-commit, no auto offset store), producer ``acks=all`` with idempotence.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from confluent_kafka import Message
from confluent_kafka.admin import AdminClient, NewTopic

from filter_worker.config import KafkaSettings
from filter_worker.pipeline.records import InputRecord, OutputRecord

_TIMESTAMP_NOT_AVAILABLE = 0


def client_id(role: str) -> str:
    """Distinct per pod and process, so broker logs and quotas can tell workers apart."""
    return f"filter-worker-{role}-{socket.gethostname()}-{os.getpid()}"


def consumer_config(settings: KafkaSettings) -> dict[str, object]:
    return {
        **settings.client_properties(),
        "client.id": client_id("consumer"),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        "partition.assignment.strategy": settings.assignment_strategy,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 3),
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        # Inputs written by transactional producers: only committed ones are classified.
        "isolation.level": "read_committed",
        **{k: v.get_secret_value() for k, v in settings.consumer_properties.items()},
    }


def transactional_id(settings: KafkaSettings) -> str:
    """Stable across restarts of one pod (its hostname), distinct between pods of one group."""
    return settings.transactional_id or f"{settings.group_id}-{socket.gethostname()}"


def producer_config(settings: KafkaSettings) -> dict[str, object]:
    config: dict[str, object] = {
        **settings.client_properties(),
        "client.id": client_id("producer"),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        # Ride out broker outages of any length instead of failing records after 5 minutes: nothing is
        # committed past an unacknowledged record anyway, and the pause keeps memory bounded meanwhile.
        "message.timeout.ms": 0,
    }
    if settings.exactly_once:
        config["transactional.id"] = transactional_id(settings)
        config["message.timeout.ms"] = 60_000  # must not exceed transaction.timeout.ms (default 60 s)
    return {**config, **{k: v.get_secret_value() for k, v in settings.producer_properties.items()}}


def admin_config(settings: KafkaSettings) -> dict[str, object]:
    return {**settings.client_properties(), "client.id": client_id("admin")}


def to_input_record(message: Message) -> InputRecord:
    kind, timestamp = message.timestamp()
    return InputRecord(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        value=message.value(),
        headers=list(message.headers() or ()),
        timestamp_ms=None if kind == _TIMESTAMP_NOT_AVAILABLE else timestamp,
    )


def produce_kwargs(record: OutputRecord) -> dict[str, object]:
    """Arguments for ``Producer.produce``; timestamp 0 lets the producer stamp records that had none."""
    return {
        "topic": record.topic,
        "key": record.key,
        "value": record.value,
        "headers": record.headers,
        "timestamp": record.timestamp_ms or 0,
    }


def missing_topics(admin: AdminClient, names: Iterable[str], timeout_s: float = 10.0) -> list[str]:
    existing = admin.list_topics(timeout=timeout_s).topics
    return sorted(set(names) - set(existing))


def create_topics(admin: AdminClient, names: Iterable[str], partitions: int, timeout_s: float = 30.0) -> None:
    """Create topics that do not exist yet; an already existing topic is not an error."""
    todo = missing_topics(admin, names, timeout_s)
    if not todo:
        return
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions) for name in todo], operation_timeout=timeout_s
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - KafkaException wraps a KafkaError
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc
