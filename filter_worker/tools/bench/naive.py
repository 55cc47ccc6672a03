"""The loop a user writes first, measured on the same broker and texts: what batching and pipelining buy."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from filter_worker.kafka import clients
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.routing import Router
from filter_worker.tools.bench.harness import Broker, admin, embedded_consumer_properties, produce_texts


def naive(reference: Classifier, texts: Sequence[str], broker: Broker, router: Router) -> dict[str, Any]:
    """The loop a user writes first: poll one record, classify it alone, produce, wait for the ack, commit.

    The classification is eager PyTorch's float32 forward pass on a batch of one (the cost of a
    per-record ``pipeline(text)`` call without the pipeline's Python overhead), so the comparison
    measures batching and pipelining, not one library's call overhead.
    """
    prefix = f"naive-{uuid.uuid4().hex[:8]}"
    topic, out_topic = f"{prefix}.in", f"{prefix}.out"
    clients.create_topics(admin(broker), [topic, out_topic], 1)
    produce_texts(broker, topic, texts)
    reference.classify(["warm-up"])
    consumer = Consumer(
        {
            **broker.properties,
            "group.id": f"{prefix}-group",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **embedded_consumer_properties(broker),
        }
    )
    producer = Producer(broker.client({"enable.idempotence": True, "acks": "all"}))
    # Assigned rather than subscribed: the same loop without waiting for a group join (not timed anyway).
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    done = 0
    model_seconds = 0.0
    started: float | None = None
    deadline = time.monotonic() + 300 + 5 * len(texts)
    try:
        while done < len(texts) and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            started = started or time.perf_counter()
            text = orjson.loads(message.value() or b"{}")["text"]
            model_started = time.perf_counter()
            probs, _ = reference.classify([text])
            model_seconds += time.perf_counter() - model_started
            decision = router.decide(probs[0])
            producer.produce(out_topic, value=message.value(), headers=[("filter.action", decision.action.encode())])
            producer.flush(30)
            consumer.commit(message=message, asynchronous=False)
            done += 1
    finally:
        consumer.close()
    if started is None or done < len(texts):
        raise RuntimeError(f"the naive loop finished {done} of {len(texts)} records")
    seconds = time.perf_counter() - started
    return {
        "messages": done,
        "seconds": seconds,
        "messages_per_s": done / seconds,
        # The forward passes alone: the loop's speed on a broker with negligible round trips.
        "model_messages_per_s": done / model_seconds,
        "method": "one record at a time: tokenize, torch float32 forward pass of one row, produce, flush, commit",
    }
