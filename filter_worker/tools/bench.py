"""``filter-worker bench``: how close the worker gets to the model's own speed, on one set of texts.

The forward pass is the ceiling; everything else (Kafka I/O, decoding, tokenization, routing,
publishing, commits) has to hide behind it. One run measures, on the same texts:

1. **model only** (the ceiling): pre-tokenized texts sorted by length, cut into batches of the
   configured size, straight through the forward pass at the configured precision. Also the same
   passes in arrival order on a subset, to show what batching without length awareness costs.
2. **end to end**: the real worker against a real broker (embedded Tansu, or ``--bootstrap-servers``)
   with every record already in the input topic; timed from the first record consumed to every
   output acknowledged and every offset committed (the consumer-group join is not counted). Run in
   ``--rounds`` rounds, each between two ceiling measurements, and the median round is reported:
   shared machines drift by tens of percent within minutes, and one burst should not decide it.
3. **latency**: a fresh worker fed at a steady ``--rate`` (default half the end-to-end throughput);
   record timestamp to publish acknowledgement, p50/p95/p99.
4. **naive baseline**: what a user's first loop does (consume one record, run a transformers
   ``pipeline`` on its text, produce, wait for the acknowledgement, commit), float32, on a subset.
5. **precision**: each lower precision against float32 on the same texts: how often the routed
   action (and the top label) changes, the largest probability difference, and model-only speed.

The texts are ``samples.message_mix`` (deterministic for ``--seed``) or one per line of ``--file``.
"""

from __future__ import annotations

import gc
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from filter_worker import kafka_io
from filter_worker.config import DEFAULT_SCOPE, ConfigError, Settings
from filter_worker.exit_codes import ExitCode
from filter_worker.model import Classifier, resolve_dtype
from filter_worker.pipeline.batching import padded_tokens
from filter_worker.pipeline.routing import Router
from filter_worker.tools.broker import EmbeddedBroker
from filter_worker.tools.samples import message_mix
from filter_worker.worker import Worker

# Cache size for the "with cache" run of --duplicate-ratio when FILTER_CACHE__SIZE is 0.
_BENCH_CACHE_SIZE = 10_000
_POLL_S = 0.005
# The embedded broker answers a fetch only when its wait expires, not when data arrives (Kafka wakes
# the waiting fetch), so with librdkafka's default 500 ms every record would wait ~250 ms for it.
_EMBEDDED_FETCH_WAIT_MS = "10"


@dataclass
class BenchOptions:
    """Command-line options of ``bench`` (the model, device, precision and batch come from settings)."""

    messages: int = 1000
    file: str | None = None
    seed: int = 7
    naive_count: int = 100
    arrival_count: int = 256
    compare_count: int = 300
    compare_dtypes: list[str] | None = None  # None: the lower precisions that suit the device
    rate: float | None = None  # None: half the measured end-to-end throughput
    latency_seconds: float = 20.0
    duplicate_ratio: float = 0.0
    rounds: int = 3
    partitions: int = 3
    bootstrap_servers: str | None = None
    json_path: str = "bench-results.json"
    progress: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


def load_texts(options: BenchOptions) -> list[str]:
    if options.file is None:
        return message_mix(options.messages, seed=options.seed, duplicate_ratio=options.duplicate_ratio)
    path = Path(options.file)
    if not path.is_file():
        raise ConfigError(f"--file {options.file}: no such file")
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"--file {options.file}: no non-empty lines")
    return texts


def run_bench(settings: Settings, options: BenchOptions) -> dict[str, Any]:
    """Run every phase, print a table, write the JSON report; returns the report."""
    began = time.monotonic()

    def say(line: str) -> None:
        options.progress(f"[{time.monotonic() - began:6.1f}s] {line}" if line.endswith("...") else line)

    texts = load_texts(options)
    if not 0.0 <= options.duplicate_ratio < 1.0:
        raise ConfigError("--duplicate-ratio must be at least 0 and below 1")
    if options.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    say(f"loading {settings.model.name} ({settings.model.dtype} on {settings.model.device}) ...")
    classifier = Classifier.load(settings.model)
    router = Router(settings.routing, classifier.labels)
    batch = settings.batch
    ids = [t.ids for t in classifier.tokenize(texts)]
    lengths = [len(row) for row in ids]
    report: dict[str, Any] = {
        "environment": _environment(classifier),
        "workload": {
            "messages": len(texts),
            "source": options.file or f"built-in mix, seed {options.seed}",
            "distinct_texts": len(set(texts)),
            "duplicate_ratio": options.duplicate_ratio,
            "tokens_p50": float(np.percentile(lengths, 50)),
            "tokens_p95": float(np.percentile(lengths, 95)),
            "tokens_max": max(lengths),
            "batch_max_size": batch.max_size,
            "batch_max_wait_ms": batch.max_wait_ms,
            "batch_max_tokens": batch.max_tokens,
        },
    }

    say(f"model only: {len(texts)} texts sorted by length, batches of {batch.max_size} ...")
    classifier.predict(ids[: batch.max_size])  # warm-up
    by_length = sorted(range(len(ids)), key=lambda i: lengths[i])
    ceilings = [_model_only(classifier, ids, by_length, batch.max_size)]
    subset = list(range(min(options.arrival_count, len(ids))))
    say(f"model only: {len(subset)} texts in arrival order ...")
    arrival = _model_only(classifier, ids, subset, batch.max_size)
    report["model_only"] = ceilings[0]
    report["model_only_arrival_order"] = arrival

    own_broker = None if options.bootstrap_servers else EmbeddedBroker().start()
    try:
        broker = _Broker(options.bootstrap_servers or own_broker.bootstrap_servers, own_broker is not None)  # type: ignore[union-attr]
        cache_size = 0 if options.duplicate_ratio > 0 else settings.cache.size
        rounds = []
        for n in range(1, options.rounds + 1):
            say(f"end to end, round {n} of {options.rounds}: {len(texts)} records (cache size {cache_size}) ...")
            run = _end_to_end(settings, classifier, texts, broker, options.partitions, cache_size)
            say("model only again (brackets the round against machine drift) ...")
            ceilings.append(_model_only(classifier, ids, by_length, batch.max_size))
            run["ceiling_messages_per_s"] = [c["messages_per_s"] for c in ceilings[-2:]]
            run["vs_model_only"] = run["messages_per_s"] / np.mean(run["ceiling_messages_per_s"])
            rounds.append(run)
        # The median round (the lower one of an even count): one drift burst does not decide the ratio.
        report["end_to_end"] = last = sorted(rounds, key=lambda r: r["vs_model_only"])[(len(rounds) - 1) // 2]
        report["end_to_end_rounds"] = rounds
        report["model_only_after"] = ceilings[-1]
        if options.duplicate_ratio > 0:
            cached = settings.cache.size or _BENCH_CACHE_SIZE
            say(f"end to end with the decision cache: {len(texts)} records (cache size {cached}) ...")
            report["end_to_end_cached"] = last = _end_to_end(
                settings, classifier, texts, broker, options.partitions, cached
            )
            report["cache_gain"] = last["messages_per_s"] / report["end_to_end"]["messages_per_s"]

        rate = options.rate or last["messages_per_s"] / 2
        say(f"latency: a steady {rate:.1f} msg/s for {options.latency_seconds:.0f}s ...")
        # The rate comes from the last run, so the latency run uses that run's cache size.
        report["latency"] = _latency(
            settings, classifier, texts, broker, options, rate, ceilings[0], last["cache_size"]
        )

        naive_texts = texts[: options.naive_count]
        say(f"naive loop: {len(naive_texts)} records, one at a time (float32) ...")
        report["naive"] = _naive(settings, classifier, naive_texts, broker, router)
    finally:
        if own_broker is not None:
            own_broker.stop()

    compare = texts[: options.compare_count]
    report["precision"] = _precisions(settings, classifier, router, compare, options.compare_dtypes, say)
    e2e = report["end_to_end"]["messages_per_s"]
    report["ratios"] = {
        # The median round, against the mean of the ceilings measured just before and after it.
        "end_to_end_vs_model_only": report["end_to_end"]["vs_model_only"],
        "model_only_after_vs_before": ceilings[-1]["messages_per_s"] / ceilings[0]["messages_per_s"],
        "end_to_end_vs_naive": e2e / report["naive"]["messages_per_s"],
        "end_to_end_vs_naive_model_calls": e2e / report["naive"]["model_messages_per_s"],
        "arrival_order_vs_model_only": arrival["messages_per_s"] / ceilings[0]["messages_per_s"],
    }
    report["targets"] = _targets(report, classifier)
    Path(options.json_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    say(format_table(report))
    say(f"wrote {options.json_path}")
    return report


# -- phases -----------------------------------------------------------------------------------------


def _model_only(classifier: Classifier, ids: Sequence[list[int]], order: list[int], size: int) -> dict[str, Any]:
    """Forward passes over ``order`` cut into consecutive batches of ``size``: nothing but the model."""
    lengths = [len(row) for row in ids]
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    times = []
    for batch in batches:
        started = time.perf_counter()
        classifier.predict([ids[i] for i in batch])
        times.append(time.perf_counter() - started)
    seconds = sum(times)
    padded = padded_tokens(lengths, batches)
    return {
        "messages": len(order),
        "seconds": seconds,
        "messages_per_s": len(order) / seconds,
        "padding_efficiency": sum(lengths[i] for i in order) / padded,
        "batches": len(batches),
        "batch_seconds_mean": seconds / len(batches),
    }


@dataclass(frozen=True)
class _Broker:
    bootstrap_servers: str
    embedded: bool


def _embedded_consumer_properties(broker: _Broker) -> dict[str, str]:
    return {"fetch.wait.max.ms": _EMBEDDED_FETCH_WAIT_MS} if broker.embedded else {}


class _AckRecorder:
    """Stands in for the worker's latency histogram, which sees every acknowledged record.

    Keeps each sample (for percentiles) and the time of the last one, so the bench learns the count
    and the finishing moment without reading the metrics registry: a registry read costs ~0.35 ms
    of GIL per sample, and polling it every few ms stalled the forward pass's Python by ~10 %.
    """

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self.samples: list[float] = []
        self.last_at = 0.0

    def observe(self, value: float) -> None:
        self.samples.append(value)
        self.last_at = time.perf_counter()
        self._histogram.observe(value)


class _Run:
    """A worker on its own topics and group, on a thread; the bench watches it through its metrics."""

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        broker: _Broker,
        partitions: int,
        cache_size: int,
        trickle: bool = False,
    ) -> None:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.settings = settings.model_copy(deep=True)
        s = self.settings
        s.kafka.bootstrap_servers = broker.bootstrap_servers
        # Only a run fed at a rate (``trickle``) needs the short fetch wait: with every record already
        # in the topic fetches return at once anyway, and polling every 10 ms at the end of the topic
        # costs the embedded broker and librdkafka CPU that a 2-core machine takes from the model.
        for key, value in (_embedded_consumer_properties(broker) if trickle else {}).items():
            s.kafka.consumer_properties.setdefault(key, SecretStr(value))
        if broker.embedded:
            s.kafka.session_timeout_ms = min(s.kafka.session_timeout_ms, 6000)  # its group joins wait for it
        s.kafka.group_id = f"{prefix}-group"
        s.topics.input = [f"{prefix}.in"]
        s.topics.allow, s.topics.quarantine = f"{prefix}.allow", f"{prefix}.quarantine"
        s.topics.drop, s.topics.dead_letter = f"{prefix}.drop", f"{prefix}.dlq"
        s.metrics.enabled = False
        s.cache.size = cache_size
        admin = AdminClient(dict(s.kafka.client_properties()))
        kafka_io.create_topics(admin, s.topics.input, partitions)
        kafka_io.create_topics(admin, s.topics.outputs().values(), 1)
        self.topic = s.topics.input[0]
        self.worker = Worker(s, classifier)
        self.acks = _AckRecorder(self.worker.metrics.latency)
        self.worker.metrics.latency = self.acks  # type: ignore[assignment]
        self._codes: list[int] = []
        self._thread = threading.Thread(target=lambda: self._codes.append(self.worker.run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def metric(self, name: str, **labels: str) -> float:
        value = self.worker.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0

    def published(self) -> float:
        return sum(
            self.metric("filter_records_published_total", action=a, topic=self.topic)
            for a in ("allow", "quarantine", "drop", "dead_letter")
        )

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = _POLL_S) -> float:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if not self._thread.is_alive() and self._thread.ident is not None:
                raise RuntimeError(f"the worker stopped while the bench waited for {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench gave up waiting for {what} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return time.perf_counter()

    def committed(self, ends: dict[int, int]) -> Callable[[], bool]:
        """A check that the group's committed offsets reached ``ends`` (asked at most every 50 ms)."""
        reader = Consumer(
            {**self.settings.kafka.client_properties(), "group.id": self.settings.kafka.group_id}
        )  # never subscribes, so it does not join the group
        last = [0.0]

        def done() -> bool:
            if time.monotonic() - last[0] < 0.05:
                return False
            last[0] = time.monotonic()
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


def _produce(bootstrap: str, topic: str, texts: Sequence[str]) -> dict[int, int]:
    """Produce every text as a JSON record; returns one past the last offset per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    ends: dict[int, int] = {}

    def report(err: KafkaError | None, msg: Any) -> None:
        if err is None:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for i, text in enumerate(texts):
        _send(producer, topic, i, text, report)
    if producer.flush(60) or sum(ends.values()) != len(texts):
        raise RuntimeError("the bench could not produce its records")
    return ends


def _send(producer: Producer, topic: str, i: int, text: str, report: Callable[..., None]) -> None:
    value = orjson.dumps({"id": i, "text": text})
    while True:
        try:
            producer.produce(topic, key=str(i).encode(), value=value, on_delivery=report)
            return
        except BufferError:
            producer.poll(0.05)


def _end_to_end(
    settings: Settings, classifier: Classifier, texts: Sequence[str], broker: _Broker, partitions: int, cache_size: int
) -> dict[str, Any]:
    run = _Run(settings, classifier, broker, partitions, cache_size)
    ends = _produce(broker.bootstrap_servers, run.topic, texts)
    run.start()
    try:
        timeout = 300 + len(texts)
        started = run.wait(lambda: run.metric("filter_records_consumed_total", topic=run.topic) > 0, timeout, "records")
        # Every wake-up takes the GIL from the forward pass, so the long wait polls slowly; the
        # recorder still knows the exact moment of the last acknowledgement.
        run.wait(lambda: len(run.acks.samples) >= len(texts), timeout, "acknowledgements", poll_s=0.1)
        acked = run.acks.last_at
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
    }


def _latency(
    settings: Settings,
    classifier: Classifier,
    texts: Sequence[str],
    broker: _Broker,
    options: BenchOptions,
    rate: float,
    ceiling: dict[str, Any],
    cache_size: int,
) -> dict[str, Any]:
    """A steady offered rate into a running, caught-up worker: record timestamp to acknowledgement."""
    run = _Run(settings, classifier, broker, options.partitions, cache_size, trickle=True)
    count = max(1, int(rate * options.latency_seconds))
    run.start()
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 0, "enable.idempotence": True})
    try:
        run.wait(lambda: run.worker.health.joined, 120, "the consumer group join")
        time.sleep(1.0)  # let the assignment settle (fetch sessions set up) before the clock matters
        started = time.monotonic()
        for i in range(count):
            _send(producer, run.topic, i, texts[i % len(texts)], lambda *_: None)
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
        "cache_size": cache_size,
        "messages": count,
        "p50_s": p50,
        "p95_s": p95,
        "p99_s": p99,
        "max_s": float(samples.max()),
        "p99_bound_s": bound,
        "p99_bound": "4 x FILTER_BATCH__MAX_WAIT_MS + the mean forward time of one model-only batch",
    }


def _naive(
    settings: Settings, classifier: Classifier, texts: Sequence[str], broker: _Broker, router: Router
) -> dict[str, Any]:
    """The loop a user writes first: poll one record, classify it alone, produce, wait for the ack, commit.

    The classification is the worker's own float32 forward pass on a batch of one (the cost of a
    per-record ``pipeline(text)`` call without the pipeline's Python overhead), so the comparison
    measures batching and pipelining, not one library's call overhead.
    """
    reference = classifier if classifier.dtype == "float32" else _load(settings, "float32")
    prefix = f"naive-{uuid.uuid4().hex[:8]}"
    topic, out_topic = f"{prefix}.in", f"{prefix}.out"
    bootstrap = broker.bootstrap_servers
    kafka_io.create_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic, out_topic], 1)
    _produce(bootstrap, topic, texts)
    reference.classify(["warm-up"])
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}-group",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **_embedded_consumer_properties(broker),
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    consumer.subscribe([topic])
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
        "method": "one record at a time: tokenize, float32 forward pass of one row, produce, flush, commit",
    }


def default_compare_dtypes(device: str) -> list[str]:
    """The lower precisions worth comparing on ``device``: the ones ``FILTER_MODEL__DTYPE`` accepts there."""
    return ["float16", "bfloat16"] if device.startswith("cuda") else ["bfloat16", "int8"]


def _precisions(
    settings: Settings,
    classifier: Classifier,
    router: Router,
    texts: Sequence[str],
    requested: list[str] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Each lower precision against float32 on ``texts``: changed actions and labels, speed."""
    device = classifier.device
    dtypes = requested if requested is not None else default_compare_dtypes(device)
    if not dtypes:
        return {}
    say(f"precision: {', '.join(dtypes)} against float32 on {len(texts)} texts ...")
    reference = classifier if classifier.dtype == "float32" else _load(settings, "float32")
    base_probs, base_actions, base_speed = _classify(reference, router, texts, settings)
    results: dict[str, Any] = {"float32": {"messages_per_s": base_speed}}
    for dtype in dtypes:
        try:
            resolve_dtype(dtype, device)
        except ConfigError as exc:
            results[dtype] = {"skipped": str(exc)}
            continue
        other = classifier if classifier.dtype == dtype else _load(settings, dtype)
        probs, actions, speed = _classify(other, router, texts, settings)
        results[dtype] = {
            "messages": len(texts),
            "messages_per_s": speed,
            "action_changed_share": float(np.mean([a != b for a, b in zip(actions, base_actions, strict=True)])),
            "top_label_changed_share": float(np.mean(probs.argmax(axis=1) != base_probs.argmax(axis=1))),
            "max_abs_probability_difference": float(np.abs(probs - base_probs).max()),
        }
        if other is not classifier:
            del other
            gc.collect()
    return results


def _load(settings: Settings, dtype: str) -> Classifier:
    model = settings.model.model_copy(update={"dtype": dtype})
    return Classifier.load(model)


def _classify(
    classifier: Classifier, router: Router, texts: Sequence[str], settings: Settings
) -> tuple[np.ndarray, list[str], float]:
    classifier.classify(texts[: settings.batch.max_size], settings.batch.max_size, settings.batch.max_tokens)
    started = time.perf_counter()
    probs, _ = classifier.classify(texts, settings.batch.max_size, settings.batch.max_tokens)
    speed = len(texts) / (time.perf_counter() - started)
    return probs, [d.action for d in router.decide_batch(probs, [DEFAULT_SCOPE] * len(probs))], speed


# -- report -----------------------------------------------------------------------------------------


def _environment(classifier: Classifier) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "device": classifier.device,
        "dtype": classifier.dtype,
        "model": classifier.identity,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if classifier.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(classifier.device))
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _targets(report: dict[str, Any], classifier: Classifier) -> dict[str, Any]:
    """The goals of issue #5, checked against this run (informational: machines differ)."""
    gpu = classifier.device.startswith("cuda")
    ratios = report["ratios"]
    latency = report["latency"]
    targets: dict[str, Any] = {
        "end_to_end_vs_model_only": {"goal": 0.8 if gpu else 0.9, "measured": ratios["end_to_end_vs_model_only"]},
        "p99_latency_s": {"goal": latency["p99_bound_s"], "measured": latency["p99_s"]},
    }
    if classifier.dtype == "int8":
        targets["end_to_end_vs_naive"] = {"goal": 4.0, "measured": ratios["end_to_end_vs_naive"]}
    for name, target in targets.items():
        lower_is_better = name.startswith("p99")
        met = target["measured"] <= target["goal"] if lower_is_better else target["measured"] >= target["goal"]
        target["met"] = bool(met)
    return targets


def format_table(report: dict[str, Any]) -> str:
    env, work = report["environment"], report["workload"]
    lines = [
        "",
        f"{env['model']} | {env['device']} {env['dtype']} | torch {env['torch']}, {env['torch_threads']} threads | "
        f"{env['cpu']}",
        f"{work['messages']} messages ({work['source']}), tokens p50 {work['tokens_p50']:.0f} / p95 "
        f"{work['tokens_p95']:.0f} / max {work['tokens_max']}, batch {work['batch_max_size']}",
        "",
        f"{'measurement':<44} {'msg/s':>9} {'padding eff.':>13}",
    ]

    def row(name: str, result: dict[str, Any] | None) -> None:
        if result is None:
            return
        eff = result.get("padding_efficiency")
        lines.append(f"{name:<44} {result['messages_per_s']:>9.1f} {'' if eff is None else f'{eff:.2f}':>13}")

    row("model only, sorted by length (ceiling)", report["model_only"])
    row(
        f"model only, arrival order ({report['model_only_arrival_order']['messages']} msgs)",
        report["model_only_arrival_order"],
    )
    row("model only, sorted, after the last round", report["model_only_after"])
    row("end to end (worker + broker), median round", report["end_to_end"])
    if "end_to_end_cached" in report:
        row(
            f"end to end, decision cache ({report['end_to_end_cached']['cache_hits']} hits)",
            report["end_to_end_cached"],
        )
    row(f"naive loop ({report['naive']['messages']} msgs, float32)", report["naive"])
    ratios = report["ratios"]
    lat = report["latency"]
    lines += [
        "",
        f"end to end / ceiling (median round, each against the ceilings just before and after it): "
        f"{ratios['end_to_end_vs_model_only']:.2f}",
        "  rounds: "
        + ", ".join(
            f"{r['vs_model_only']:.2f} ({r['messages_per_s']:.1f} msg/s, ceilings "
            + " / ".join(f"{c:.1f}" for c in r["ceiling_messages_per_s"])
            + ")"
            for r in report["end_to_end_rounds"]
        ),
        f"end to end / naive: {ratios['end_to_end_vs_naive']:.1f}x "
        f"({ratios['end_to_end_vs_naive_model_calls']:.1f}x its pipeline calls alone)   "
        f"model busy: {report['end_to_end']['model_busy_share']:.0%} of the end-to-end run",
        f"latency at {lat['offered_rate']:.1f} msg/s: p50 {lat['p50_s'] * 1000:.0f} ms, p95 {lat['p95_s'] * 1000:.0f} "
        f"ms, p99 {lat['p99_s'] * 1000:.0f} ms (bound {lat['p99_bound_s'] * 1000:.0f} ms)",
    ]
    for dtype, result in report["precision"].items():
        if dtype == "float32":
            continue
        if "skipped" in result:
            lines.append(f"{dtype}: skipped ({result['skipped']})")
            continue
        lines.append(
            f"{dtype} vs float32: {result['messages_per_s']:.1f} msg/s model only (float32 "
            f"{report['precision']['float32']['messages_per_s']:.1f}), actions changed "
            f"{result['action_changed_share']:.1%}, top label changed {result['top_label_changed_share']:.1%}, "
            f"max |dp| {result['max_abs_probability_difference']:.4f}"
        )
    return "\n".join(lines)
