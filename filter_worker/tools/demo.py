"""``filter-worker demo``: the whole pipeline on one machine, with nothing to install or configure.

Starts the embedded broker, creates the topics, produces sample traffic (including malformed
records), runs a real worker on it, reads the four output topics back and prints what happened.
Everything it starts, it stops.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from filter_worker.config import Settings
from filter_worker.kafka import clients
from filter_worker.logs import configure
from filter_worker.model.classifier import Classifier
from filter_worker.model.onnx_export import ensure_graph
from filter_worker.model.samples import sample_messages
from filter_worker.service.worker import Worker
from filter_worker.tools.broker import EmbeddedBroker

INPUT_PARTITIONS = 3

# One of each kind of bad input the worker must dead-letter instead of crashing on.
MALFORMED: tuple[bytes | None, ...] = (
    b"not json at all",
    b'{"text": "truncated',
    b'["a", "list"]',
    b'{"user": "u1"}',
    b'{"text": null}',
    b'{"text": 42}',
    b'{"text": "   "}',
    b"\xff\xfe invalid utf-8",
    None,
)


@dataclass
class _Output:
    action: str
    text: str
    detail: str


def run_demo(settings: Settings, count: int) -> int:
    settings.log.level = "WARNING" if settings.log.level == "INFO" else settings.log.level
    settings.log.format = "console"
    configure(settings.log)
    print(f"loading model {settings.model.name} ...", flush=True)
    ensure_graph(settings.model)
    classifier = Classifier.load(settings.model)
    print(f"model ready on {classifier.device}: labels {classifier.labels}", flush=True)

    with EmbeddedBroker() as broker:
        print(f"embedded broker listening on {broker.bootstrap_servers}", flush=True)
        settings.kafka.bootstrap_servers = broker.bootstrap_servers
        settings.kafka.group_id = f"filter-worker-demo-{uuid.uuid4().hex[:8]}"
        settings.kafka.session_timeout_ms = 6000
        settings.metrics.port = 0  # any free port: the demo must not collide with a real worker's 8470
        kafka = settings.kafka.client_properties()
        admin = AdminClient(dict(kafka))
        clients.create_topics(admin, settings.topics.input, INPUT_PARTITIONS)
        clients.create_topics(admin, settings.topics.outputs().values(), 1)
        del admin

        produced = _produce(kafka, settings.topics.input[0], count)
        print(f"produced {produced} records ({len(MALFORMED)} malformed) to '{settings.topics.input[0]}'", flush=True)

        worker = Worker(settings, classifier)
        started = time.monotonic()
        thread = threading.Thread(target=worker.run, name="worker", daemon=True)
        thread.start()
        while settings.metrics.enabled and worker.http_port is None and thread.is_alive():
            time.sleep(0.01)
        if worker.http_port is not None:
            print(f"worker running; metrics at http://127.0.0.1:{worker.http_port}/metrics", flush=True)
        try:
            outputs, last_output = _read_outputs(kafka, settings, produced, timeout_s=120 + produced * 0.5)
        finally:
            worker.stop()
            thread.join(timeout=settings.shutdown_timeout_s + 10)
        elapsed = last_output - started
    _print_summary(outputs, produced, elapsed)
    return 0 if len(outputs) == produced else 1


def _produce(kafka: dict[str, str], topic: str, count: int) -> int:
    producer = Producer({**kafka, "enable.idempotence": True, "linger.ms": 20})
    messages = sample_messages(count)
    for i, message in enumerate(messages):
        producer.produce(topic, key=message["id"].encode(), value=orjson.dumps(message))
        if i % 50 == 25 and i // 50 < len(MALFORMED):
            producer.produce(topic, key=f"bad{i}".encode(), value=MALFORMED[i // 50])
    extra = min(len(MALFORMED), (count + 24) // 50)
    for value in MALFORMED[extra:]:
        producer.produce(topic, key=b"bad", value=value)
    if producer.flush(30):
        raise RuntimeError("the demo could not produce its sample records")
    return count + len(MALFORMED)


def _read_outputs(
    kafka: dict[str, str], settings: Settings, expected: int, timeout_s: float
) -> tuple[list[_Output], float]:
    reader = Consumer({**kafka, "group.id": f"demo-reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    topics = settings.topics.outputs()
    action_of = {topic: action for action, topic in topics.items()}
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING) for topic in topics.values()])
    outputs: list[_Output] = []
    last = time.monotonic()
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < expected and time.monotonic() < deadline:
            for message in reader.consume(100, 0.5):
                if message.error():
                    continue
                headers = dict(clients.headers_of(message))
                facts = {k: (v or b"").decode("utf-8", "replace") for k, v in headers.items()}
                action = action_of[str(message.topic())]
                value = message.value() or b""
                if action == "dead_letter":
                    detail = f"{facts.get('filter.error')}: {facts.get('filter.reason')}"
                    text = repr(value[:40]) if value else "(no value)"
                else:
                    detail = f"{facts.get('filter.label')} score={float(facts.get('filter.score', 0)):.2f}"
                    text = orjson.loads(value).get("text", "")
                outputs.append(_Output(action, text, detail))
                last = time.monotonic()
    finally:
        reader.close()
    return outputs, last


def _print_summary(outputs: list[_Output], produced: int, elapsed: float) -> None:
    counts = Counter(o.action for o in outputs)
    examples: dict[str, list[_Output]] = defaultdict(list)
    for output in outputs:
        if len(examples[output.action]) < 3 and all(e.text != output.text for e in examples[output.action]):
            examples[output.action].append(output)
    print()
    print(
        f"routed {len(outputs)} of {produced} records in {elapsed:.1f}s "
        f"({len(outputs) / max(elapsed, 1e-9):.0f} records/s, including the consumer group join)"
    )
    for action in ("allow", "quarantine", "drop", "dead_letter"):
        print(f"  {action:<12} {counts.get(action, 0):>6}")
        for example in examples.get(action, []):
            text = example.text if len(example.text) <= 70 else example.text[:67] + "..."
            print(f"      {text!s:<72} {example.detail}")
    if len(outputs) != produced:
        print(f"MISSING: {produced - len(outputs)} records did not reach an output topic")
