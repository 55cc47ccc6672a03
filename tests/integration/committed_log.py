"""The output topics as a correct ``read_committed`` consumer sees them, on a broker that does not say.

The embedded broker writes transaction markers (control batches: attributes bit 5, key type 0 = abort,
1 = commit, carrying the producer id) but its fetch responses list no aborted transactions, so every
client library delivers aborted records to ``read_committed`` consumers there. Exactly-once tests
must not be judged by such a reader: a record lost from the committed output would still be counted.

This reader fetches the raw record batches (a Fetch v4 request on a plain socket; kafka-python's record
parser reads the batches) and resolves the markers itself, as Kafka's consumer does with the aborted
transaction list: a transactional record counts once its producer's commit marker follows it, is
dropped when an abort marker follows, and is left out while its transaction is still open.
"""

from __future__ import annotations

import socket
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient
from kafka.record.default_records import ControlRecord
from kafka.record.memory_records import MemoryRecords

from filter_worker.config import Settings
from filter_worker.logs import librdkafka_logger
from tests.integration.kafka_helpers import Output

_FETCH, _FETCH_VERSION = 1, 4
_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class CommittedLog:
    """One topic partition's records, resolved: what read_committed shows, and what it hides."""

    committed: list[Output] = field(default_factory=list)
    aborted: list[Output] = field(default_factory=list)
    open: list[Output] = field(default_factory=list)  # in a transaction with no marker yet
    markers: dict[str, int] = field(default_factory=lambda: {"commit": 0, "abort": 0})


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _fetch_request(correlation: int, topic: str, partition: int, offset: int) -> bytes:
    header = struct.pack(">hhi", _FETCH, _FETCH_VERSION, correlation) + _string("committed-log-reader")
    body = struct.pack(">iiiib", -1, 500, 1, _MAX_BYTES, 0)  # replica, max wait, min bytes, max bytes, read_uncommitted
    body += (
        struct.pack(">i", 1)
        + _string(topic)
        + struct.pack(">i", 1)
        + struct.pack(">iqi", partition, offset, _MAX_BYTES)
    )
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def take(self, fmt: str) -> tuple[int, ...]:
        values = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.take(">h")
        text = self._data[self._pos : self._pos + length].decode()
        self._pos += length
        return text

    def bytes(self) -> bytes | None:
        (length,) = self.take(">i")
        if length < 0:
            return None
        data = self._data[self._pos : self._pos + length]
        self._pos += length
        return data


def _receive(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the broker closed the connection mid-response")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _fetch(sock: socket.socket, correlation: int, topic: str, partition: int, offset: int) -> bytes | None:
    """The raw record batches of ``topic/partition`` from ``offset`` (``None`` or empty at the end)."""
    sock.sendall(_fetch_request(correlation, topic, partition, offset))
    (size,) = struct.unpack(">i", _receive(sock, 4))
    reader = _Reader(_receive(sock, size))
    (answered,) = reader.take(">i")
    assert answered == correlation
    reader.take(">i")  # throttle time
    (topics,) = reader.take(">i")
    assert topics == 1
    reader.string()
    (partitions,) = reader.take(">i")
    assert partitions == 1
    _, error, _high, _stable = reader.take(">ihqq")
    assert error == 0, f"fetch of {topic}/{partition} at {offset} failed with Kafka error code {error}"
    (aborted,) = reader.take(">i")
    for _ in range(max(0, aborted)):
        reader.take(">qq")
    return reader.bytes()


def _output(topic: str, record: object) -> Output:
    headers = tuple((k, v) for k, v in (record.headers or ()))  # type: ignore[attr-defined]
    return Output(topic, record.key, record.value, dict(headers), headers, record.timestamp)  # type: ignore[attr-defined]


def read_partition(bootstrap: str, topic: str, partition: int) -> CommittedLog:
    """Every record of one partition from offset 0, resolved against its transaction markers."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    log = CommittedLog()
    open_by_producer: dict[int, list[Output]] = defaultdict(list)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        offset, correlation = 0, 0
        while True:
            correlation += 1
            data = _fetch(sock, correlation, topic, partition, offset)
            if not data:
                break
            records = MemoryRecords(data)
            progressed = False
            while (batch := records.next_batch()) is not None:
                if batch.next_offset <= offset:
                    continue  # a batch the fetch repeated from before the requested offset
                progressed = True
                offset = batch.next_offset
                for record in batch:
                    if batch.is_control_batch:
                        assert isinstance(record, ControlRecord)
                        pending = open_by_producer.pop(batch.producer_id, [])
                        (log.committed if record.commit else log.aborted).extend(pending)
                        log.markers["commit" if record.commit else "abort"] += 1
                    elif batch.is_transactional:
                        open_by_producer[batch.producer_id].append(_output(topic, record))
                    else:
                        log.committed.append(_output(topic, record))
            if not progressed:
                break
    log.open = [o for pending in open_by_producer.values() for o in pending]
    return log


def read_committed_outputs(settings: Settings) -> CommittedLog:
    """The four output topics (every partition) resolved as ``read_committed`` consumers see them."""
    return read_topics(settings.kafka.bootstrap_servers, settings.topics.outputs().values())


def read_topics(bootstrap: str, topics: Iterable[str]) -> CommittedLog:
    """Every partition of ``topics`` resolved as ``read_committed`` consumers see them."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": librdkafka_logger()})
    metadata = admin.list_topics(timeout=10).topics
    total = CommittedLog()
    for topic in topics:
        described = metadata.get(topic)
        if described is None:
            continue
        for partition in sorted(described.partitions):
            log = read_partition(bootstrap, topic, partition)
            total.committed += log.committed
            total.aborted += log.aborted
            total.open += log.open
            for kind, count in log.markers.items():
                total.markers[kind] += count
    return total
