"""``filter-worker produce``: sample traffic at a steady rate, for the compose stack and load tests."""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from typing import Any

import orjson
from confluent_kafka import KafkaError, Producer

from filter_worker.config import Settings
from filter_worker.model.samples import sample_messages

_REPORT_EVERY_S = 10.0


def produce_samples(settings: Settings, topic: str, rate: float, count: int) -> int:
    """Send ``count`` sample messages (0: until SIGTERM/SIGINT) at ``rate`` per second; returns an exit code."""
    if rate <= 0:
        print("filter-worker: --rate must be positive", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    failures: list[str] = []

    def report(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err.str())

    producer = Producer({**settings.kafka.client_properties(), "linger.ms": 20, "enable.idempotence": True})
    pool = sample_messages(5000)
    started = last_report = time.monotonic()
    sent = 0
    for i in itertools.count():
        if stop.is_set() or (count and sent >= count) or failures:
            break
        key = f"load-{i}"
        message = dict(pool[i % len(pool)], id=key, sent_at=time.time())
        producer.produce(topic, key=key.encode(), value=orjson.dumps(message), on_delivery=report)
        sent += 1
        producer.poll(0)
        # Pace against the start time, so the average rate holds even when one send is slow.
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        if time.monotonic() - last_report >= _REPORT_EVERY_S:
            last_report = time.monotonic()
            print(f"produced {sent} messages to {topic}", flush=True)
    remaining = producer.flush(30)
    print(f"produced {sent} messages to {topic}; {remaining} undelivered, {len(failures)} failed", flush=True)
    if failures:
        print(f"filter-worker: delivery failed: {failures[0]}", file=sys.stderr)
    return 1 if failures or remaining else 0
