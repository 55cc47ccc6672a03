"""The model alone (the ceiling), the worker through a filled topic (end to end), and latency at a steady rate."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from confluent_kafka import Producer

from filter_worker.config import Settings
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.batching import padded_tokens
from filter_worker.pipeline.inference import INFERENCE_THREAD
from filter_worker.tools.bench.harness import (
    Broker,
    Run,
    cpu_per_record,
    cpu_seconds,
    on_model_thread,
    produce_texts,
    send,
)


def timed_on_model_thread(classifier: Classifier, batches: Sequence[Sequence[Sequence[int]]]) -> float:
    """Seconds ``classifier`` takes over ``batches`` on the bench's model thread, as many at once as it runs."""

    def passes() -> float:
        started = time.perf_counter()
        classifier.predict_many(batches)
        return time.perf_counter() - started

    return on_model_thread(passes)


def model_only(classifier: Classifier, ids: Sequence[list[int]], order: list[int], size: int) -> dict[str, Any]:
    """Forward passes over ``order`` cut into consecutive batches of ``size``: nothing but the model."""
    lengths = [len(row) for row in ids]
    batches = [order[i : i + size] for i in range(0, len(order), size)]

    seconds = timed_on_model_thread(classifier, [[ids[i] for i in batch] for batch in batches])
    padded = padded_tokens(lengths, batches)
    return {
        "messages": len(order),
        "seconds": seconds,
        "messages_per_s": len(order) / seconds,
        "padding_efficiency": sum(lengths[i] for i in order) / padded,
        "batches": len(batches),
        "batch_seconds_mean": seconds / len(batches),
    }


class PassRecorder:
    """Holds a copy of a classifier for the worker that keeps every forward pass (its token rows and its time).

    What the worker ran can then be run again with nothing else going on (``replay``): the same
    batches, alone. That splits the end-to-end gap into what the batches cost against sorted ones and
    what running beside the worker's own work cost the same passes (``where_the_time_goes``). Only
    the passes of the worker's model thread are kept: its start-up warm-up pass runs on the loop's.
    """

    def __init__(self, classifier: Classifier) -> None:
        self._classifier = classifier
        self.passes: list[tuple[list[Sequence[int]], float]] = []
        self.worker_classifier = copy.copy(classifier)  # the same tokenizer, head and engine
        self.worker_classifier.predict = self._predict  # type: ignore[method-assign]

    def _predict(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        started = time.perf_counter()
        scores = self._classifier.predict(batch)
        if threading.current_thread().name == INFERENCE_THREAD:
            # The rows themselves, not copies: the worker never changes a record's token ids, and a
            # copy here would be time on the model thread outside the pass.
            self.passes.append((list(batch), time.perf_counter() - started))
        return scores

    def seconds_inside(self) -> float:
        """The passes' time inside the worker, per model thread (several run at once with streams): the
        sum over the threads, so with streams it reads as if every thread had a pass all the time."""
        return sum(seconds for _, seconds in self.passes) / self._classifier.streams

    def replay(self) -> float:
        """Seconds the recorded passes take alone, in the order the worker ran them, as many at once as it ran."""
        return timed_on_model_thread(self._classifier, [rows for rows, _ in list(self.passes)])


def where_the_time_goes(
    messages: int, seconds: float, ceiling: float, passes_inside_s: float, passes_alone_s: float
) -> dict[str, float]:
    """The round's keep-up (``messages / seconds`` against ``ceiling`` msg/s) as the product of three shares.

    ``messages`` is every record of the round, as in the keep-up itself: with the decision cache on,
    records answered without a pass would count in ``batches``, so the bench splits only runs without it.

    ``batches``: the worker's own batches run alone, against sorted batches (the ceiling): what
    forming batches from what has arrived costs against sorting every text first. ``passes``: the
    same passes alone against inside the worker: what sharing the machine with the Kafka loop,
    librdkafka and the broker costs the model. ``model_busy``: the share of the run the model was
    computing: start, hand-offs and the wait for the last commit. The three multiply to the keep-up.
    """
    shares = {
        "batches": messages / passes_alone_s / ceiling,
        "passes": passes_alone_s / passes_inside_s,
        "model_busy": passes_inside_s / seconds,
    }
    return shares | {"keep_up": shares["batches"] * shares["passes"] * shares["model_busy"]}


def end_to_end(
    settings: Settings,
    classifier: Classifier,
    texts: Sequence[str],
    broker: Broker,
    partitions: int,
    cache_size: int,
    filled: tuple[str, dict[int, int]] | None = None,
    replay: bool = False,
) -> dict[str, Any]:
    """The worker through every record of a fresh topic (or of ``filled``: a topic and its end offsets).

    With ``replay``, its forward passes are recorded and, after the run, timed again alone
    (``PassRecorder``): what ``where_the_time_goes`` needs.
    """
    recorder = PassRecorder(classifier) if replay else None
    worker_classifier = recorder.worker_classifier if recorder else classifier
    run = Run(settings, worker_classifier, broker, partitions, cache_size, topic=filled[0] if filled else None)
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
    result = {
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
    if recorder is not None:
        result |= {
            "recorded_passes": len(recorder.passes),
            "passes_inside_s": recorder.seconds_inside(),
            "passes_alone_s": recorder.replay(),
        }
    return result


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
