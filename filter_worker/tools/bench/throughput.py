"""The model alone (the ceiling), the worker through a filled topic (end to end), and latency at a steady rate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from confluent_kafka import Producer

from filter_worker.config import Settings
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.batching import padded_tokens
from filter_worker.tools.bench.harness import (
    Broker,
    Run,
    cpu_per_record,
    cpu_seconds,
    on_model_thread,
    produce_texts,
    send,
)


def model_only(classifier: Classifier, ids: Sequence[list[int]], order: list[int], size: int) -> dict[str, Any]:
    """Forward passes over ``order`` cut into consecutive batches of ``size``: nothing but the model."""
    lengths = [len(row) for row in ids]
    batches = [order[i : i + size] for i in range(0, len(order), size)]

    def passes() -> list[float]:
        times = []
        for batch in batches:
            started = time.perf_counter()
            classifier.predict([ids[i] for i in batch])
            times.append(time.perf_counter() - started)
        return times

    seconds = sum(on_model_thread(passes))
    padded = padded_tokens(lengths, batches)
    return {
        "messages": len(order),
        "seconds": seconds,
        "messages_per_s": len(order) / seconds,
        "padding_efficiency": sum(lengths[i] for i in order) / padded,
        "batches": len(batches),
        "batch_seconds_mean": seconds / len(batches),
    }


def end_to_end(
    settings: Settings,
    classifier: Classifier,
    texts: Sequence[str],
    broker: Broker,
    partitions: int,
    cache_size: int,
    filled: tuple[str, dict[int, int]] | None = None,
) -> dict[str, Any]:
    """The worker through every record of a fresh topic (or of ``filled``: a topic and its end offsets)."""
    run = Run(settings, classifier, broker, partitions, cache_size, topic=filled[0] if filled else None)
    ends = filled[1] if filled else produce_texts(broker, run.topic, texts)
    run.start()
    try:
        timeout = 300 + len(texts)
        started = run.wait(lambda: run.metric("filter_records_consumed_total", topic=run.topic) > 0, timeout, "records")
        threads = run.threads()
        cpu_before = cpu_seconds(threads)
        # Every wake-up takes the GIL from the forward pass, so the long wait polls slowly; the
        # recorder still knows the exact moment of the last acknowledgement.
        run.wait(lambda: len(run.acks.samples) >= len(texts), timeout, "acknowledgements", poll_s=0.1)
        acked = run.acks.last_at
        cpu = cpu_per_record(cpu_before, cpu_seconds(threads), len(texts))
        committed = run.wait(run.committed(ends), timeout, "commits")
    finally:
        run.stop()
    seconds = committed - started
    real = run.metric("filter_forward_tokens_total", kind="real")
    padded = run.metric("filter_forward_tokens_total", kind="padded")
    forward = run.metric("filter_forward_seconds_sum")
    hits = run.metric("filter_cache_records_total", result="hit")
    return {
        "messages": len(texts),
        "published": int(run.published()),
        "seconds": seconds,
        "seconds_to_last_ack": acked - started,
        "messages_per_s": len(texts) / seconds,
        "padding_efficiency": real / padded if padded else None,
        "forward_passes": int(run.metric("filter_batch_size_count")),
        "model_busy_share": forward / seconds,
        "cache_size": cache_size,
        "cache_hits": int(hits),
        "partitions": partitions,
        "commit_interval_ms": settings.kafka.commit_interval_ms,
        "cpu_us_per_record": cpu,
    }


def latency(
    settings: Settings,
    classifier: Classifier,
    texts: Sequence[str],
    broker: Broker,
    partitions: int,
    rate: float,
    seconds: float,
    ceiling: dict[str, Any],
    cache_size: int,
) -> dict[str, Any]:
    """A steady offered rate into a running, caught-up worker: record timestamp to acknowledgement."""
    run = Run(settings, classifier, broker, partitions, cache_size, trickle=True)
    count = max(1, int(rate * seconds))
    run.start()
    producer = Producer(broker.client({"linger.ms": 0, "enable.idempotence": True}))
    try:
        run.wait(lambda: run.worker.health.joined, 120, "the consumer group join")
        time.sleep(1.0)  # let the assignment settle (fetch sessions set up) before the clock matters
        started = time.monotonic()
        for i in range(count):
            send(producer, run.topic, i, texts[i % len(texts)], lambda *_: None)
            producer.poll(0)
            delay = started + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        producer.flush(30)
        run.wait(lambda: len(run.acks.samples) >= count, 300 + count, "acknowledgements", poll_s=0.1)
    finally:
        run.stop()
    samples = np.array(run.acks.samples[:count])
    bound = 4 * settings.batch.max_wait_ms / 1000 + ceiling["batch_seconds_mean"]
    p50, p95, p99 = (float(np.percentile(samples, q)) for q in (50, 95, 99))
    return {
        "offered_rate": rate,
        "seconds": seconds,
        "cache_size": cache_size,
        "messages": count,
        "p50_s": p50,
        "p95_s": p95,
        "p99_s": p99,
        "max_s": float(samples.max()),
        "p99_bound_s": bound,
        "p99_bound": "4 x FILTER_BATCH__MAX_WAIT_MS + the mean forward time of one model-only batch",
    }
