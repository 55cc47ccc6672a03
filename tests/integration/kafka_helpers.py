"""Test-side Kafka helpers: produce inputs, read every output back, read committed offsets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from filter_worker.config import Settings, load_settings
from filter_worker.kafka import clients
from filter_worker.logs import librdkafka_logger

# The helpers' own clients log like the worker's (through structlog, each line at most every 30 s), so
# a test that stops the broker does not flood the output with their connection errors.
_LOGGER = {"logger": librdkafka_logger()}


@dataclass(frozen=True)
class Produced:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    header_list: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    @property
    def source(self) -> tuple[int, int]:
        _, partition, offset = self.headers["filter.source"].decode().rsplit("/", 2)
        return int(partition), int(offset)


def texts(count: int, start: int = 0) -> list[bytes]:
    """JSON records ``start`` to ``count``; every fifth is hostile ("idiot"), the rest fine."""
    return [orjson.dumps({"text": f"message {i} " + ("idiot" if i % 5 == 0 else "fine")}) for i in range(start, count)]


def worker_settings(
    bootstrap: str, model: str, partitions_topic_prefix: str | None = None, **overrides: object
) -> Settings:
    """Settings for a test worker on fresh, uniquely named topics."""
    prefix = partitions_topic_prefix or f"t{uuid.uuid4().hex[:8]}"
    env = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{prefix}-group",
            "session_timeout_ms": 6000,
            "commit_interval_ms": 200,
        },
        "topics": {
            "input": [f"{prefix}.in"],
            "allow": f"{prefix}.allow",
            "quarantine": f"{prefix}.quarantine",
            "drop": f"{prefix}.drop",
            "dead_letter": f"{prefix}.dlq",
        },
        "model": {"name": model},
        "batch": {"max_size": 16, "max_wait_ms": 20},
        "metrics": {"port": 0},  # several workers share one process or machine: any free port
        "shutdown_timeout_s": 10,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            env.setdefault(section, {})[field] = value  # type: ignore[index]
        else:
            env[section] = value
    return load_settings(**env)


def create_topics(settings: Settings, input_partitions: int) -> None:
    admin = AdminClient({**settings.kafka.client_properties(), **_LOGGER})
    clients.create_topics(admin, settings.topics.input, input_partitions)
    clients.create_topics(admin, settings.topics.outputs().values(), 1)


def produce(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes | None],
    key_prefix: str = "k",
    headers: Sequence[tuple[str, bytes]] = (("trace-id", b"abc"),),
    config: dict[str, object] | None = None,
) -> list[Produced]:
    """Produce values round-robin over partitions (by key) and return where each landed."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 10, **_LOGGER, **(config or {})}
    )
    landed: list[Produced] = []
    errors: list[str] = []

    def report(err: object, msg: object) -> None:
        if err is not None:
            errors.append(str(err))
            return
        landed.append(
            Produced(
                msg.partition(),
                msg.offset(),
                msg.key(),
                msg.value(),
                tuple(msg.headers() or ()),  # type: ignore[attr-defined]
                msg.timestamp()[1],
            )  # type: ignore[attr-defined]
        )

    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(
                    topic, key=f"{key_prefix}{i}".encode(), value=value, headers=list(headers), on_delivery=report
                )
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0
    assert not errors, errors
    return landed


class _OutputReader:
    """Every partition of the four output topics from the beginning, including partitions created later
    (a worker creating its output topics, say)."""

    def __init__(self, settings: Settings) -> None:
        self._topics = list(settings.topics.outputs().values())
        self._consumer = Consumer(
            {
                **settings.kafka.client_properties(),  # TLS and SASL too, where the test uses them
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                **_LOGGER,
            }
        )
        self._assigned: set[tuple[str, int]] = set()
        self._checked = 0.0
        self._consumer.assign([])

    def _assign_new_partitions(self) -> None:
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        metadata = self._consumer.list_topics(timeout=10).topics
        found = {(t, p) for t in self._topics if t in metadata for p in metadata[t].partitions}
        new = sorted(found - self._assigned)
        if new:
            self._consumer.incremental_assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in new])
            self._assigned |= set(new)

    def consume(self) -> list[Message]:
        self._assign_new_partitions()
        return self._consumer.consume(500, 0.2)

    def close(self) -> None:
        self._consumer.close()


def _output(message: Message) -> Output:
    assert message.error() is None, message.error()
    header_list = tuple(message.headers() or ())  # type: ignore[arg-type]
    return Output(
        message.topic(),  # type: ignore[arg-type]
        message.key(),  # type: ignore[arg-type]
        message.value(),  # type: ignore[arg-type]
        dict(header_list),
        header_list,
        message.timestamp()[1],
    )


def read_outputs(settings: Settings, expected: int, timeout_s: float = 120.0, settle_s: float = 1.0) -> list[Output]:
    """Every record of the output topics, once there are at least ``expected`` (then ``settle_s`` more).

    Fails when fewer than ``expected`` arrived within ``timeout_s``: a missing output is a test failure,
    not a shorter list.
    """
    reader = _OutputReader(settings)
    outputs: list[Output] = []
    deadline = time.monotonic() + timeout_s
    settled_at: float | None = None
    try:
        while True:
            outputs += [_output(m) for m in reader.consume()]
            if len(outputs) >= expected:
                settled_at = settled_at or time.monotonic()
                if time.monotonic() - settled_at >= settle_s:
                    return outputs
            elif time.monotonic() > deadline:
                raise AssertionError(f"{len(outputs)} outputs after {timeout_s}s, expected at least {expected}")
    finally:
        reader.close()


def read_all_outputs(settings: Settings, quiet_s: float = 3.0) -> list[Output]:
    """Every record the output topics hold now: read until nothing new came for ``quiet_s``.

    For asserting what is *not* there (a record not published, nothing repeated), where no count is
    known to wait for.
    """
    reader = _OutputReader(settings)
    outputs: list[Output] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < quiet_s:
            batch = reader.consume()
            if batch:
                outputs += [_output(m) for m in batch]
                last = time.monotonic()
    finally:
        reader.close()
    return outputs


def committed_offsets(settings: Settings, partitions: int) -> dict[int, int]:
    """The group's committed offsets per input partition (-1001 when none)."""
    consumer = Consumer(
        {
            **settings.kafka.client_properties(),
            "group.id": settings.kafka.group_id,
            "enable.auto.commit": False,
            **_LOGGER,
        }
    )
    try:
        topic = settings.topics.input[0]
        result = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in result}
    finally:
        consumer.close()


def end_offsets(produced: Iterable[Produced]) -> dict[int, int]:
    """One past the last produced offset per partition (from delivery reports, not watermarks)."""
    ends: dict[int, int] = {}
    for record in produced:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    return ends


def wait_for_commits(settings: Settings, ends: dict[int, int], timeout_s: float = 30.0) -> dict[int, int]:
    """The group's committed offsets once every partition reached ``ends``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        committed = committed_offsets(settings, max(ends) + 1)
        if all(committed.get(p, -1) >= end for p, end in ends.items()):
            return committed
        if time.monotonic() > deadline:
            raise AssertionError(f"committed {committed} after {timeout_s}s, expected {ends}")
        time.sleep(0.3)
