"""The Kafka edge: client configuration, message conversion, topic checks.

Delivery guarantees are decided here: manual commits only (no auto-commit, no auto offset store),
producer ``acks=all`` with idempotence.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from filter_worker.config import KafkaSettings, TopicSettings
from filter_worker.pipeline.records import Headers, InputRecord

_TIMESTAMP_NOT_AVAILABLE = 0
# librdkafka's default message.max.bytes: the largest record the producer sends unless told otherwise.
PRODUCER_MAX_BYTES_DEFAULT = 1_000_000


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


def headers_of(message: Message) -> Headers:
    """A record's headers as (name, bytes or None) pairs, in order: what confluent-kafka returns for a
    consumed record (a list of tuples, or None without headers)."""
    return message.headers() or []  # type: ignore[return-value]  # typed for produce's wider input


def to_input_record(message: Message) -> InputRecord:
    """A consumed record (never an error event: those carry no topic, partition or offset).

    Kafka allows any bytes in a header name, but confluent-kafka hands names over as ``str`` and fails
    on one that is not UTF-8: a ``UnicodeDecodeError``, raised as such or (inside the worker's loop)
    as the cause of a ``SystemError`` ("returned a result with an exception set"). Left to propagate,
    that one record would stop the worker on every restart; instead it comes back marked, for the
    dead-letter topic.
    """
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None, "an error event, not a record"
    kind, timestamp = message.timestamp()
    unreadable = None
    try:
        headers = headers_of(message)
    except (UnicodeDecodeError, SystemError) as exc:
        cause = exc if isinstance(exc, UnicodeDecodeError) else exc.__cause__
        if not isinstance(cause, UnicodeDecodeError):
            raise
        headers, unreadable = [], f"a header name is not valid UTF-8 (byte {cause.start} of the name)"
    return InputRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        key=message.key(),
        value=message.value(),
        headers=headers,
        timestamp_ms=None if kind == _TIMESTAMP_NOT_AVAILABLE else timestamp,
        unreadable_headers=unreadable,
    )


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


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """The largest record each topic accepts (``max.message.bytes``, ``None`` where unknown) and the producer sends."""

    topics: dict[str, int | None]
    producer: int

    def accepted_by(self, topic: str) -> int:
        """The most ``topic`` takes from this producer: a dead letter is cut to this."""
        limit = self.topics.get(topic)
        return self.producer if limit is None else min(limit, self.producer)

    def mismatches(self, settings: TopicSettings, outputs: Iterable[str]) -> list[str]:
        """One sentence per input topic that accepts records some of ``outputs`` would refuse."""
        inputs = [t for t in settings.input if not t.startswith("^")]
        found = []
        for name in inputs:
            limit = self.topics.get(name)
            if limit is None:
                continue
            smaller = {t: self.accepted_by(t) for t in sorted(outputs) if self.accepted_by(t) < limit}
            if smaller:
                found.append(
                    f"input topic {name} accepts records up to {limit} bytes, but {smaller} take less "
                    "(topic max.message.bytes, or the producer's message.max.bytes): larger records will be "
                    "dead-lettered with their value cut to fit (FILTER_DEAD_LETTER__OVERSIZED)"
                )
        return found


def producer_max_bytes(settings: KafkaSettings) -> int:
    """The producer's ``message.max.bytes``, as configured through the pass-through properties."""
    merged = {
        **settings.client_properties(),
        **{k: v.get_secret_value() for k, v in settings.producer_properties.items()},
    }
    try:
        return int(merged.get("message.max.bytes", PRODUCER_MAX_BYTES_DEFAULT))
    except ValueError:
        return PRODUCER_MAX_BYTES_DEFAULT  # librdkafka itself refuses the value at start-up


def size_limits(admin: AdminClient, topics: list[str], producer: int, timeout_s: float = 10.0) -> SizeLimits:
    """Each topic's ``max.message.bytes`` as the broker reports it; ``None`` where it does not say.

    A broker that cannot describe configurations (or denies it) leaves every limit unknown: the
    check is advice, not a requirement for starting.
    """
    limits: dict[str, int | None] = dict.fromkeys(topics)
    try:
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics])
    except KafkaException:
        return SizeLimits(limits, producer)
    for resource, future in futures.items():
        try:
            entry = future.result(timeout=timeout_s).get("max.message.bytes")
        except Exception:  # noqa: BLE001 - KafkaException, or a timeout: the limit stays unknown
            continue
        if entry is not None and entry.value is not None and str(entry.value).isdigit():
            limits[resource.name] = int(entry.value)
    return SizeLimits(limits, producer)
