"""What every measurement stands on: the broker, workers on their own topics, records, CPU clocks, the machine."""

from __future__ import annotations

import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from filter_worker.config import Settings
from filter_worker.exit_codes import ExitCode
from filter_worker.kafka import clients
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.inference import INFERENCE_THREAD
from filter_worker.service.worker import Worker
from filter_worker.tools.bench.options import BenchOptions
from filter_worker.tools.broker import EmbeddedBroker

POLL_S = 0.005


# The embedded broker answers a fetch only when its wait expires, not when data arrives (Kafka wakes
# the waiting fetch), so with librdkafka's default 500 ms every record would wait ~250 ms for it.
EMBEDDED_FETCH_WAIT_MS = "10"


T = TypeVar("T")


# Model-only passes run on a thread of their own, as the worker runs them (its inference thread), not
# on the main thread: under CPU contention from other processes, eager PyTorch's passes on the main
# thread ran far slower than the same passes on another thread at the same moment, which put ceilings
# below the worker's own throughput in the same run.
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model")


@dataclass(frozen=True)
class Broker:
    """The broker every phase uses, and what every client of the bench needs to reach it.

    ``properties`` are the FILTER_KAFKA__* connection settings (TLS, SASL) with this broker's address:
    the bench's own producers, consumers and admin clients reach a secured cluster as the worker does.
    """

    bootstrap_servers: str
    embedded: bool
    properties: dict[str, str]

    def client(self, extra: dict[str, object]) -> dict[str, Any]:
        """A client configuration: the connection settings and ``extra``."""
        return {**self.properties, **extra}


@contextmanager
def broker_for(options: BenchOptions, settings: Settings) -> Iterator[Broker]:
    """``--bootstrap-servers`` with the connection settings, or an embedded (plaintext) broker for the run."""
    if options.bootstrap_servers:
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": options.bootstrap_servers})
        yield Broker(options.bootstrap_servers, embedded=False, properties=kafka.client_properties())
        return
    with EmbeddedBroker() as embedded:
        yield Broker(
            embedded.bootstrap_servers, embedded=True, properties={"bootstrap.servers": embedded.bootstrap_servers}
        )


def admin(broker: Broker) -> AdminClient:
    # librdkafka logs "Purging unserved events" (level 6) when a short-lived admin client is collected.
    return AdminClient(broker.client({"log_level": 4}))


def embedded_consumer_properties(broker: Broker) -> dict[str, str]:
    return {"fetch.wait.max.ms": EMBEDDED_FETCH_WAIT_MS} if broker.embedded else {}


class AckRecorder:
    """Listens to the worker's latencies (``Metrics.latency_listeners``), which cover every acknowledged record.

    Keeps each sample (for percentiles) and the time of the last one, so the bench learns the count
    and the finishing moment without reading the metrics registry: a registry read costs ~0.35 ms
    of GIL per sample, and polling it every few ms stalled the forward pass's Python by ~10 %.
    """

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.last_at = 0.0

    def __call__(self, seconds: Sequence[float]) -> None:
        if seconds:
            self.samples.extend(seconds)
            self.last_at = time.perf_counter()


class Run:
    """A worker on its own topics and group, on a thread; the bench watches it through its metrics."""

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        broker: Broker,
        partitions: int,
        cache_size: int,
        trickle: bool = False,
        topic: str | None = None,
    ) -> None:
        """A worker on fresh topics, or on ``topic`` (already filled) with fresh outputs and group."""
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.settings = settings.model_copy(deep=True)
        s = self.settings
        s.kafka.bootstrap_servers = broker.bootstrap_servers
        # Only a run fed at a rate (``trickle``) needs the short fetch wait: with every record already
        # in the topic fetches return at once anyway, and polling every 10 ms at the end of the topic
        # costs the embedded broker and librdkafka CPU that a 2-core machine takes from the model.
        for key, value in (embedded_consumer_properties(broker) if trickle else {}).items():
            s.kafka.consumer_properties.setdefault(key, SecretStr(value))
        if broker.embedded:
            s.kafka.session_timeout_ms = min(s.kafka.session_timeout_ms, 6000)  # its group joins wait for it
        s.kafka.group_id = f"{prefix}-group"
        s.topics.input = [topic or f"{prefix}.in"]
        s.topics.allow, s.topics.quarantine = f"{prefix}.allow", f"{prefix}.quarantine"
        s.topics.drop, s.topics.dead_letter = f"{prefix}.drop", f"{prefix}.dlq"
        s.metrics.enabled = False
        s.cache.size = cache_size
        admin = AdminClient(dict(s.kafka.client_properties()))
        clients.create_topics(admin, s.topics.input, partitions)
        clients.create_topics(admin, s.topics.outputs().values(), 1)
        self.topic = s.topics.input[0]
        self.worker = Worker(s, classifier)
        self.acks = AckRecorder()
        self.worker.metrics.latency_listeners.append(self.acks)
        self._codes: list[int] = []
        self._thread = threading.Thread(target=lambda: self._codes.append(self.worker.run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def threads(self) -> dict[str, int | None]:
        """The worker's Kafka loop thread and its model's thread (the newest named ``inference``), by ident."""
        inference = [t.ident for t in threading.enumerate() if t.name == INFERENCE_THREAD]
        return {"loop_thread": self._thread.ident, "inference_thread": inference[-1] if inference else None}

    def metric(self, name: str, **labels: str) -> float:
        value = self.worker.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0

    def published(self) -> float:
        return sum(
            self.metric("filter_records_published_total", action=a, topic=self.topic)
            for a in ("allow", "quarantine", "drop", "dead_letter")
        )

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = POLL_S) -> float:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if not self._thread.is_alive() and self._thread.ident is not None:
                raise RuntimeError(f"the worker stopped while the bench waited for {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench gave up waiting for {what} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return time.perf_counter()

    def committed(self, ends: dict[int, int]) -> Callable[[], bool]:
        """A check that the group's committed offsets reached ``ends``, asking the broker at every call.

        The bench asks only once every record is acknowledged, so the asking does not compete with the
        model, and at its polling interval (``POLL_S``): the time from the commit to the answer that
        sees it counts as the worker's, so a coarser interval (it was 50 ms) would add to its time.
        """
        reader = Consumer(
            {**self.settings.kafka.client_properties(), "group.id": self.settings.kafka.group_id}
        )  # never subscribes, so it does not join the group

        def done() -> bool:
            tps = [TopicPartition(self.topic, p) for p in ends]
            got = {tp.partition: tp.offset for tp in reader.committed(tps, timeout=10)}
            finished = all(got[p] >= end for p, end in ends.items())
            if finished:
                reader.close()
            return finished

        return done

    def stop(self) -> None:
        self.worker.stop()
        self._thread.join(timeout=self.settings.shutdown_timeout_s + 10)
        if self._codes != [ExitCode.OK]:
            raise RuntimeError(f"the bench's worker exited with {self._codes or 'no code'}")


def produce_texts(broker: Broker, topic: str, texts: Sequence[str]) -> dict[int, int]:
    """Produce every text as a JSON record; returns one past the last offset per partition."""
    producer = Producer(broker.client({"linger.ms": 20, "enable.idempotence": True}))
    ends: dict[int, int] = {}

    def report(err: KafkaError | None, msg: Any) -> None:
        if err is None:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for i, text in enumerate(texts):
        send(producer, topic, i, text, report)
    if producer.flush(60) or sum(ends.values()) != len(texts):
        raise RuntimeError("the bench could not produce its records")
    return ends


def send(producer: Producer, topic: str, i: int, text: str, report: Callable[..., None]) -> None:
    value = orjson.dumps({"id": i, "text": text})
    while True:
        try:
            producer.produce(topic, key=str(i).encode(), value=value, on_delivery=report)
            return
        except BufferError:
            producer.poll(0.05)


def filled_topic(broker: Broker, texts: Sequence[str], partitions: int) -> tuple[str, dict[int, int]]:
    topic = f"plumbing-{uuid.uuid4().hex[:8]}.in"
    clients.create_topics(admin(broker), [topic], partitions)
    return topic, produce_texts(broker, topic, texts)


def worker_rate(run: dict[str, Any]) -> float:
    """Records per second to the last acknowledgement: the final commit waits for the commit interval,
    a fixed delay rather than a per-record cost, so it is left out (the periodic commits are in)."""
    return float(run["messages"] / run["seconds_to_last_ack"])


def cpu_seconds(threads: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds used so far by this process and by each thread in ``threads`` (name -> ident).

    Read from another thread through the thread's CPU clock, so the worker is not touched. What the
    process used beyond the named threads is librdkafka's threads, the tokenizer's and the model's
    intra-op threads (and the bench's own waiting, a few polls a second).
    """
    used = {"process": time.process_time()}
    for name, ident in threads.items():
        if ident is not None:
            used[name] = time.clock_gettime(time.pthread_getcpuclockid(ident))
    return used


def cpu_per_record(before: dict[str, float], after: dict[str, float], records: int) -> dict[str, float]:
    """Microseconds of CPU per record, per clock of ``cpu_seconds``, plus ``other_threads``."""
    used = {name: (after[name] - before[name]) * 1e6 / records for name in before}
    used["other_threads"] = used["process"] - sum(v for k, v in used.items() if k != "process")
    return used


def on_model_thread(work: Callable[[], T]) -> T:
    return MODEL_THREAD.submit(work).result()


def environment(classifier: Classifier) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "device": classifier.device,
        "backend": classifier.backend,
        "dtype": classifier.dtype,
        "streams": classifier.streams,
        "model": classifier.identity,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if classifier.backend == "onnx":
        from filter_worker.model import onnx_engine

        env["onnxruntime"] = onnx_engine.runtime().__version__
        env["onnxruntime_threads"] = onnx_engine.threads()
    if classifier.device.startswith("cuda") and classifier.backend == "torch":
        env["gpu"] = torch.cuda.get_device_name(torch.device(classifier.device))
    return env


def _cpu_flags() -> list[str]:
    """The vector extensions that decide float32, bfloat16 and int8 speed (AVX2, AVX-512, VNNI, BF16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                return [flag for flag in line.split(":", 1)[1].split() if flag in wanted]
    except OSError:
        pass
    return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
