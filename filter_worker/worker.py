"""The Kafka loop: consume -> decode -> tokenize -> batch -> infer -> route -> publish -> commit.

One thread owns the consumer, the producer's callbacks, the offset tracker and the batch buffer, so
none of them needs a lock; forward passes run on the inference thread. A record's offset is committed
only after the broker acknowledged its output (delivery report without error), and only when every
earlier record of its partition was acknowledged too. Rebalances commit what is done for revoked
partitions and drop their unfinished work: the new owner reads it again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from filter_worker import kafka_io
from filter_worker.config import ConfigError, RoutingSettings, Settings
from filter_worker.delivery.dead_letter_limit import DeadLetterLimit
from filter_worker.delivery.offsets import OffsetTracker
from filter_worker.exit_codes import ExitCode
from filter_worker.health import Health, HealthServer
from filter_worker.logs import get_logger, librdkafka_logger
from filter_worker.metrics import Metrics
from filter_worker.model import Classifier
from filter_worker.pipeline.batching import BatchBuffer
from filter_worker.pipeline.cache import DecisionCache, cache_key
from filter_worker.pipeline.decode import DecodeFailure, decode
from filter_worker.pipeline.inference import InferenceThread, Result
from filter_worker.pipeline.records import InputRecord, OutputRecord, dead_letter, routed
from filter_worker.pipeline.routing import Router

log = get_logger("filter_worker.worker")

# The longest the loop blocks in one wait: commits, lag, probes and reloads run at least this often.
_IDLE_POLL_S = 0.1
# While delivery reports are outstanding (a few ms after each batch is published) the loop wakes this
# often to serve them: acknowledgements, latency and commits should not wait for the next forward pass.
# Only for this long after the last produce: reports that take longer (a broker outage) are served at
# the normal pace rather than by waking 200 times a second for the whole outage.
_DELIVERY_POLL_S = 0.005
_DELIVERY_WINDOW_S = 1.0
# While the broker is unreachable, how often to probe it (a metadata request) for readiness.
_PROBE_INTERVAL_S = 2.0
_UNREACHABLE = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT}
# Produce errors that are about this one record, not the pipeline: the record goes to the dead-letter
# topic (with the reason) instead of stopping the worker. Anything else stops it, uncommitted.
_RECORD_REJECTED = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG_SIZE}
# A run of dead letters below the limit is committed once no record arrived for this long (the stream
# may simply have ended on a few bad records); under load a run is only committed when it ends.
_QUIET_S = 2.0
# While waiting for Kafka at start-up: how long one metadata request may take, and how often to log.
_METADATA_TIMEOUT_S = 2.0
_WAITING_LOG_INTERVAL_S = 10.0
# Batches' worth of records buffered ahead of the model before partitions are paused. Pausing makes
# librdkafka drop its prefetched records and fetch them again on resume, so it should be rare: it is
# the bound on memory when the model is slower than the input, not a pacing mechanism.
_BUFFER_BATCHES = 32


class FatalError(Exception):
    """Something the worker must not continue past; ``code`` is the process exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Held:
    """An output waiting for its turn in a transaction (exactly-once mode)."""

    out: OutputRecord
    source: InputRecord
    generation: int
    action: str
    error: str | None


@dataclass(slots=True)
class _Pending:
    record: InputRecord
    ids: list[int]
    truncated: bool
    generation: int
    embed_into: dict[str, Any] | None
    cache_key: bytes | None = None  # set when the decision cache is on


class Worker:
    """One consumer-group member. ``run`` blocks until ``stop`` or a fatal error; returns an exit code."""

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        clock: Callable[[], float] = time.monotonic,
        reload_routing: Callable[[], RoutingSettings] | None = None,
    ) -> None:
        self._settings = settings
        self._classifier = classifier
        self._router = Router(settings.routing.rules, classifier.labels)
        self._shadow = settings.routing.shadow
        self._reload_routing = reload_routing
        self._reload_requested = threading.Event()
        self._clock = clock
        self._stop = threading.Event()
        self._tracker = OffsetTracker()
        batch = settings.batch
        self._buffer: BatchBuffer[_Pending] = BatchBuffer(
            batch.max_size, batch.max_tokens, batch.max_wait_ms / 1000, clock
        )
        self._max_buffered = batch.max_size * _BUFFER_BATCHES
        self._cache = DecisionCache(settings.cache.size) if settings.cache.size else None
        self._paused = False
        self._failure: FatalError | None = None
        self._last_commit = clock()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._inference: InferenceThread[_Pending] | None = None
        self._topics = settings.topics.outputs()
        self._limit = DeadLetterLimit(settings.dead_letter)
        # Dead letters of a run that may still cross the limit: acknowledged only when the run ends.
        self._deferred_acks: list[tuple[tuple[str, int], int, int]] = []
        self._last_produce = clock()
        self._transactional = settings.kafka.exactly_once
        self._held: dict[tuple[str, int], dict[int, _Held]] = {}
        self._in_transaction = False
        # Nothing consumed for _QUIET_S, nothing buffered or in the model: a run of dead letters is not growing.
        self._idle = False
        self._last_consumed = clock()
        self.metrics = Metrics()
        self.health = Health(settings.health.liveness_window_s, clock)
        self._last_probe = clock()
        self._http: HealthServer | None = None

    @property
    def http_port(self) -> int | None:
        """Port of the metrics and health endpoint once ``run`` started it (useful with port 0)."""
        return self._http.port if self._http is not None else None

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask the loop to reload the routing settings (SIGHUP); safe from signal handlers."""
        self._reload_requested.set()

    def _maybe_reload(self) -> None:
        """Swap in new routing settings between records, or keep the old ones if the new are invalid.

        Records decided before the swap keep their decision (it is in their headers); a rule change
        never re-routes what was already published.
        """
        if not self._reload_requested.is_set() or self._reload_routing is None:
            return
        self._reload_requested.clear()
        try:
            routing = self._reload_routing()
            router = Router(routing.rules, self._classifier.labels)
        except ConfigError as exc:
            self.metrics.rule_reloads.labels("refused").inc()
            log.error("routing reload refused; the previous rules stay in force", error=str(exc))
            return
        self._router, self._shadow = router, routing.shadow
        self.metrics.rule_reloads.labels("applied").inc()
        log.info(
            "routing reloaded",
            rules=[r.model_dump() for r in routing.rules],
            shadow=routing.shadow,
        )

    def run(self) -> int:
        settings = self._settings
        log.info(
            "worker starting",
            model=self._classifier.identity,
            device=self._classifier.device,
            input=settings.topics.input,
            group=settings.kafka.group_id,
            exactly_once=self._transactional,
            shadow=self._shadow,
            kafka=settings.kafka.redacted_properties(),
        )
        if settings.metrics.enabled:
            try:
                self._http = HealthServer(settings.metrics.port, self.health, self.metrics.registry).start()
            except OSError as exc:
                raise ConfigError(f"FILTER_METRICS__PORT={settings.metrics.port}: {exc.strerror}") from None
        self._warm_up()
        callbacks = {"error_cb": self._client_error, "logger": librdkafka_logger()}
        self._producer = Producer({**kafka_io.producer_config(settings.kafka), **callbacks})
        self._consumer = Consumer({**kafka_io.consumer_config(settings.kafka), **callbacks})
        self._inference = InferenceThread(
            self._classifier.predict,
            lambda p: p.ids,
            settings.batch.max_size,
            settings.batch.max_tokens,
            observe=self._observe_forward,
        )
        code = ExitCode.OK
        try:
            if not self._start_up():
                return code
            while not self._stop.is_set():
                self._step()
            log.info("stopping: finishing in-flight work", in_flight=self._tracker.in_flight())
            if not self._drain():
                code = ExitCode.SHUTDOWN_DEADLINE
        except FatalError as exc:
            log.error("worker failed; offsets stay at the last acknowledged record", error=str(exc), exit_code=exc.code)
            code = exc.code
        finally:
            self._close()
        return int(code)

    def _warm_up(self) -> None:
        """One forward pass before joining the group: CUDA kernels and allocator are ready on record one."""
        classifier = self._classifier
        classifier.classify(["warm-up"])
        self.metrics.model.info(
            {
                "name": classifier.name,
                "revision": classifier.revision,
                "weights_sha256": classifier.weights_sha256,
                "device": classifier.device,
                "dtype": classifier.dtype,
            }
        )
        self.health.model_ready = True

    def _observe_forward(self, rows: int, padded: int, real: int, seconds: float) -> None:
        self.metrics.batch_size.observe(rows)
        self.metrics.padded_tokens.observe(padded)
        self.metrics.fill_ratio.observe(real / padded if padded else 1.0)
        self.metrics.forward_tokens.labels("real").inc(real)
        self.metrics.forward_tokens.labels("padded").inc(padded)
        self.metrics.forward_seconds.observe(seconds)

    # -- start-up ---------------------------------------------------------------------------------

    def _start_up(self) -> bool:
        """Wait for Kafka, check (or create) topics, then join the group; ``False`` if stopped meanwhile."""
        assert self._consumer is not None and self._producer is not None
        existing = self._await_kafka()
        if existing is None:
            return False
        self._check_topics(existing)
        if self._transactional:
            self._init_transactions()
        self._consumer.subscribe(
            self._settings.topics.input, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        return True

    def _await_kafka(self) -> dict[str, int] | None:
        """Topic -> partition count once the cluster answers; retried for as long as it takes.

        A worker started before its broker (compose, a cluster being restored) must not crash-loop:
        it waits, says so in the log, and stays live but not ready.
        """
        assert self._consumer is not None
        started = self._clock()
        last_log = -_WAITING_LOG_INTERVAL_S
        while not self._stop.is_set():
            self._raise_failure()
            self.health.progress()
            try:
                metadata = self._consumer.list_topics(timeout=_METADATA_TIMEOUT_S)
            except KafkaException as exc:
                if self._clock() - last_log >= _WAITING_LOG_INTERVAL_S:
                    last_log = self._clock()
                    log.warning(
                        "waiting for Kafka",
                        bootstrap_servers=self._settings.kafka.bootstrap_servers,
                        waited_s=round(self._clock() - started, 1),
                        error=str(exc.args[0].str() if exc.args else exc),
                    )
                continue
            if metadata.brokers:
                self.health.broker_reachable = True
                return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}
        return None

    def _check_topics(self, existing: dict[str, int]) -> None:
        topics = self._settings.topics
        inputs = [t for t in topics.input if not t.startswith("^")]  # a regex subscription may match later
        missing_inputs = [t for t in inputs if t not in existing]
        if missing_inputs:
            raise FatalError(
                f"input topic(s) {missing_inputs} do not exist on {self._settings.kafka.bootstrap_servers} "
                "(check FILTER_TOPICS__INPUT and FILTER_KAFKA__BOOTSTRAP_SERVERS)",
                ExitCode.TOPICS,
            )
        missing = sorted(set(self._topics.values()) - set(existing))
        if not missing:
            return
        if not topics.create:
            raise FatalError(
                f"output topic(s) {missing} do not exist; create them or set FILTER_TOPICS__CREATE=true",
                ExitCode.TOPICS,
            )
        partitions = max((existing[t] for t in inputs), default=1)
        admin = AdminClient(kafka_io.admin_config(self._settings.kafka))
        try:
            kafka_io.create_topics(admin, missing, partitions)
        except RuntimeError as exc:
            raise FatalError(str(exc), ExitCode.TOPICS) from None
        log.info("created output topics", topics=missing, partitions=partitions)

    # -- the loop ---------------------------------------------------------------------------------

    def _step(self) -> None:
        assert self._consumer is not None and self._producer is not None
        self._raise_failure()
        self._maybe_reload()
        self._apply_backpressure()
        finished, messages = self._wait()
        self._ingest(messages)
        finished += self._inference.completed()  # type: ignore[union-attr]
        self._dispatch()  # the model starts its next batch before this turn publishes the last one
        self._route_all(finished)
        if messages:
            self._last_consumed = self._clock()
        self._idle = (
            self._clock() - self._last_consumed >= _QUIET_S and not len(self._buffer) and not self._inference.in_flight  # type: ignore[union-attr]
        )
        if self._idle:
            self._release_deferred_acks()
        self._producer.poll(0)
        self._raise_failure()
        if self._transactional:
            self._commit_transaction()
        else:
            self._maybe_commit()
        self._probe_broker()
        self.metrics.in_flight.set(self._tracker.in_flight())
        self.health.progress()

    def _wait(self) -> tuple[list[Result[_Pending]], list[Any]]:
        """Block until there is something to do; returns finished forward passes and new records.

        What the loop waits on depends on what can happen next. While the model runs and nothing can
        be dispatched, only the pass's end matters: the loop sleeps on the result queue, so it wakes
        the moment the pass ends (records arriving meanwhile wait in librdkafka's queue, and are read
        just before the next batch is formed). Otherwise it waits for records, returning on the first
        one. Each wake-up takes the GIL from the forward pass's Python, so the loop never spins; it
        polls every few ms only while delivery reports are outstanding, up to a second after the last
        produce.
        """
        assert self._consumer is not None and self._producer is not None and self._inference is not None
        awaiting_reports = len(self._producer) and self._clock() - self._last_produce < _DELIVERY_WINDOW_S
        cap = _DELIVERY_POLL_S if awaiting_reports else _IDLE_POLL_S
        max_size = self._settings.batch.max_size
        if self._inference.in_flight and not self._can_dispatch():
            finished = self._inference.completed(cap)
            return finished, self._consumer.consume(num_messages=max_size, timeout=0)
        messages = self._consumer.consume(num_messages=max_size, timeout=0)
        if messages or self._can_dispatch():
            return [], messages
        due = self._buffer.time_to_due()
        first = self._consumer.poll(cap if due is None else min(due, cap))
        if first is None:
            return [], []
        return [], [first, *self._consumer.consume(num_messages=max_size - 1, timeout=0)]

    def _can_dispatch(self) -> bool:
        assert self._inference is not None
        return self._inference.has_capacity() and self._buffer.ready(model_busy=self._inference.in_flight > 0)

    def _ingest(self, messages: list[Any]) -> None:
        texts: list[str] = []
        accepted: list[tuple[InputRecord, int, dict[str, Any] | None]] = []
        msg_settings = self._settings.message
        for message in messages:
            if message.error():
                self._consumer_error(message.error())
                continue
            record = kafka_io.to_input_record(message)
            self.metrics.consumed.labels(record.topic).inc()
            self.health.broker_reachable = True
            tp = (record.topic, record.partition)
            generation = self._tracker.generation(tp)
            if generation is None:  # revoked while this message was in the fetch queue
                continue
            self._tracker.track(tp, record.offset)
            decoded = decode(record.value, msg_settings.format, msg_settings.text_field)
            if isinstance(decoded, DecodeFailure):
                self._dead_letter(record, decoded, generation)
                continue
            embed = None
            if self._settings.output.embed:
                embed = decoded.document if decoded.document is not None else {"text": decoded.text}
            key = cache_key(decoded.text) if self._cache is not None else None
            if key is not None and self._route_repeat(record, generation, embed, key):
                continue
            texts.append(decoded.text)
            accepted.append((record, generation, embed, key))
        if not texts:
            return
        for (record, generation, embed, key), tokens in zip(accepted, self._classifier.tokenize(texts), strict=True):
            pending = _Pending(record, tokens.ids, tokens.truncated, generation, embed, key)
            self._buffer.add(pending, len(tokens.ids))

    def _route_repeat(self, record: InputRecord, generation: int, embed: dict[str, Any] | None, key: bytes) -> bool:
        """Publish a text the cache already knows, skipping the model; ``False`` when it is new."""
        assert self._cache is not None
        hit = self._cache.get(key)
        if hit is None:
            return False
        self.metrics.cache_records.labels("hit").inc()
        self._publish_decision(record, generation, hit.probs, hit.truncated, embed)
        return True

    def _dispatch(self) -> None:
        assert self._inference is not None
        while self._can_dispatch():
            self._inference.submit(self._buffer.take())

    def _collect(self, timeout_s: float) -> None:
        assert self._inference is not None
        self._route_all(self._inference.completed(timeout_s))

    def _route_all(self, finished: list[Result[_Pending]]) -> None:
        for result in finished:
            self._route(result)
            self._resolve_buffered_repeats()

    def _route(self, result: Result[_Pending]) -> None:
        for i, pending in enumerate(result.items):
            record = pending.record
            if not self._tracker.is_current((record.topic, record.partition), pending.generation):
                continue  # partition revoked since; its new owner classifies this record again
            error = result.errors[i]
            if error is not None or result.probs is None:
                failure = DecodeFailure("model_error", f"the model failed on this record: {error}")
                self._dead_letter(record, failure, pending.generation)
                continue
            if self._cache is not None and pending.cache_key is not None:
                self._cache.put(pending.cache_key, result.probs[i], pending.truncated)
                self.metrics.cache_records.labels("miss").inc()
            self._publish_decision(record, pending.generation, result.probs[i], pending.truncated, pending.embed_into)

    def _resolve_buffered_repeats(self) -> None:
        """Route buffered records whose text a finished batch just classified, instead of classifying it again.

        A campaign's copies arrive together, so many are already buffered when its first copy returns.
        They leave the buffer here and are published like any other result: offsets are tracked alike.
        """
        cache = self._cache
        if cache is None or not len(self._buffer):
            return
        for pending in self._buffer.extract(lambda p: p.cache_key in cache):
            hit = cache.get(pending.cache_key)  # type: ignore[arg-type]
            assert hit is not None
            self.metrics.cache_records.labels("hit").inc()
            self._publish_decision(pending.record, pending.generation, hit.probs, hit.truncated, pending.embed_into)

    def _publish_decision(
        self,
        record: InputRecord,
        generation: int,
        probs: np.ndarray,
        truncated: bool,
        embed_into: dict[str, Any] | None,
    ) -> None:
        self._count_outcome(dead=False)
        decision = self._router.decide(probs)
        action = "allow" if self._shadow else decision.action
        if self._shadow:
            self.metrics.shadow_decisions.labels(decision.action).inc()
        out = routed(
            record, decision, self._topics[action], self._classifier.identity, truncated, embed_into, self._shadow
        )
        self._publish(out, record, generation, action)

    def _dead_letter(self, record: InputRecord, failure: DecodeFailure, generation: int) -> None:
        fields: dict[str, Any] = {"error": failure.error, "reason": failure.reason}
        if self._settings.log.include_text:  # message content is private unless the operator opts in
            fields["value"] = (record.value or b"")[:200].decode("utf-8", "replace")
        self._count_outcome(dead=True)
        log.warning(
            "dead-lettering record", topic=record.topic, partition=record.partition, offset=record.offset, **fields
        )
        self._publish(
            dead_letter(record, failure, self._topics["dead_letter"]), record, generation, "dead_letter", failure.error
        )

    def _count_outcome(self, dead: bool) -> None:
        """Feed the dead-letter limit; a run that ends releases the acknowledgements it held back."""
        exceeded = self._limit.exceeded_by(dead)
        if exceeded is not None:
            raise FatalError(
                f"dead-letter limit reached: {exceeded}; this looks like a bad deploy or configuration, "
                "not bad input. The failing records stay uncommitted and are read again on restart",
                ExitCode.DEAD_LETTER_LIMIT,
            )
        if self._limit.consecutive == 0:
            self._release_deferred_acks()

    def _release_deferred_acks(self) -> None:
        """The run of dead letters ended (or stalled below the limit): let their offsets be committed."""
        for tp, offset, generation in self._deferred_acks:
            self._tracker.ack(tp, offset, generation)
        self._deferred_acks.clear()

    # -- publishing -------------------------------------------------------------------------------

    def _publish(
        self, out: OutputRecord, source: InputRecord, generation: int, action: str, error: str | None = None
    ) -> None:
        """Produce ``out`` (or hold it for the next transaction); its acknowledgement covers ``source``."""
        if self._transactional:
            tp = (source.topic, source.partition)
            self._held.setdefault(tp, {})[source.offset] = _Held(out, source, generation, action, error)
            return
        self._produce(out, source, generation, action, error)

    def _produce(self, out: OutputRecord, source: InputRecord, generation: int, action: str, error: str | None) -> None:
        """Hand ``out`` to the producer; its delivery report acknowledges ``source``.

        ``error`` is a dead letter's class (for metrics, and the dead-letter limit's deferred acks).
        """
        assert self._producer is not None
        tp = (source.topic, source.partition)
        offset = source.offset
        run = self._limit.runs_ended  # a dead letter is counted before it is produced: this is its run
        self._last_produce = self._clock()

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._delivery_failed(err, out, source, generation)
                return
            # Held back only while its own run of dead letters goes on: a later run must not hold it.
            run_goes_on = self._limit.runs_ended == run
            if error is not None and run_goes_on and not self._idle and not self._transactional:
                self._deferred_acks.append((tp, offset, generation))
            else:
                self._tracker.ack(tp, offset, generation)
            self.health.broker_reachable = True
            self.metrics.published.labels(action, source.topic).inc()
            if error is not None:
                self.metrics.dead_letters.labels(error).inc()
            if source.timestamp_ms is not None:
                self.metrics.latency.observe(max(0.0, time.time() - source.timestamp_ms / 1000))

        while True:
            try:
                self._producer.produce(**kafka_io.produce_kwargs(out), on_delivery=delivered)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.05)
            except KafkaException as exc:  # refused before it was queued (e.g. over message.max.bytes)
                self._delivery_failed(exc.args[0], out, source, generation, queued=False)
                return

    def _delivery_failed(
        self, err: KafkaError, out: OutputRecord, source: InputRecord, generation: int, queued: bool = True
    ) -> None:
        """A record refused for what it is goes to the dead-letter topic; any other failure stops the worker.

        Stopping leaves the offset uncommitted, so the record is read again after a restart. In a
        transaction, a failure after queueing dooms the whole transaction, so only records refused
        before queueing can be dead-lettered there. Runs inside delivery callbacks, so failures are
        recorded for the loop to raise rather than raised through librdkafka.
        """
        rejected = err.code() in _RECORD_REJECTED and not (self._transactional and queued)
        if not rejected or out.topic == self._topics["dead_letter"]:
            self._failure = self._failure or FatalError(
                f"publishing {source.source} to {out.topic} failed: {err.str()}"
                + (" (the dead-letter topic refused it too)" if out.topic == self._topics["dead_letter"] else "")
            )
            return
        if not self._tracker.is_current((source.topic, source.partition), generation):
            return
        failure = DecodeFailure("publish_rejected", f"{out.topic} refused the routed record: {err.str()}")
        try:
            self._dead_letter(source, failure, generation)
        except FatalError as exc:
            self._failure = self._failure or exc

    def _apply_backpressure(self) -> None:
        """Pause fetching while the buffer is full, so memory stays bounded when the model is slower."""
        assert self._consumer is not None
        if not self._paused and len(self._buffer) >= self._max_buffered:
            self._consumer.pause(self._assignment())
            self._paused = True
        elif self._paused and len(self._buffer) < self._max_buffered // 2:
            self._consumer.resume(self._assignment())
            self._paused = False

    def _assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self._tracker.assigned()]

    # -- commits (at-least-once) ------------------------------------------------------------------

    def _maybe_commit(self) -> None:
        # Every interval under load; at once when everything consumed is acknowledged (caught up), so
        # a quiet partition's lag reads 0 without waiting for the interval.
        caught_up = self._tracker.in_flight() == 0 and bool(self._tracker.committable())
        if caught_up or self._clock() - self._last_commit >= self._settings.kafka.commit_interval_ms / 1000:
            self._commit()
            self._update_lag()

    def _commit(self, tps: list[tuple[str, int]] | None = None) -> None:
        assert self._consumer is not None
        self._last_commit = self._clock()
        if self._transactional:  # offsets travel inside transactions
            self._commit_transaction()
            return
        offsets = self._tracker.committable(tps)
        if not offsets:
            return
        try:
            results = self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            # Typically a rebalance in progress; the next commit (or the revoke handler) retries.
            self.metrics.commit_failures.inc()
            log.warning("commit failed; will retry", error=str(exc))
            return
        done = {(r.topic, r.partition): r.offset for r in results or [] if r.error is None}
        self._tracker.committed(done)
        self.metrics.commits.inc()
        log.debug("committed", offsets={f"{t}/{p}": o for (t, p), o in done.items()})

    def _update_lag(self) -> None:
        """Lag per owned partition from cached watermarks (no broker round trip)."""
        assert self._consumer is not None
        positions = self._consumer.position(self._assignment())
        for tp in positions:
            if tp.offset < 0:
                continue
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def _probe_broker(self) -> None:
        """While the broker looks unreachable, ask it for metadata now and then to notice its return."""
        assert self._consumer is not None
        if self.health.broker_reachable or self._clock() - self._last_probe < _PROBE_INTERVAL_S:
            return
        self._last_probe = self._clock()
        try:
            self._consumer.list_topics(timeout=1.0)
        except KafkaException:
            return
        self.health.broker_reachable = True

    # -- transactions (exactly-once) --------------------------------------------------------------

    def _init_transactions(self) -> None:
        """Register the transactional id: fences a previous incarnation and aborts its open transaction."""
        assert self._producer is not None
        while not self._stop.is_set():
            try:
                self._producer.init_transactions(self._settings.shutdown_timeout_s)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable():
                    raise FatalError(f"could not initialise transactions: {err.str()}") from None
                log.warning("retrying transaction initialisation", error=err.str())

    def _release(self) -> dict[tuple[str, int], int]:
        """Produce held outputs that are next in their partition's offset order; returns offsets to commit.

        Releasing in order makes the transaction's offsets an exact cut: every record below them has
        its output in this or an earlier transaction, none above. A dead letter of a run that may
        still cross the dead-letter limit waits, so a tripped limit leaves the run uncommitted.
        """
        offsets: dict[tuple[str, int], int] = {}
        for tp, held in self._held.items():
            if not held:  # runs every loop turn: skip partitions with nothing waiting
                continue
            generation = self._tracker.generation(tp)
            for offset in self._tracker.unacknowledged(tp):
                item = held.get(offset)
                if item is None or item.generation != generation:
                    break
                if item.error is not None and self._limit.consecutive > 0 and not self._idle:
                    break
                if not self._in_transaction:
                    assert self._producer is not None
                    self._producer.begin_transaction()
                    self._in_transaction = True
                while offset in held:  # a record refused before queueing comes back as its dead letter
                    item = held.pop(offset)
                    self._produce(item.out, item.source, item.generation, item.action, item.error)
                offsets[tp] = offset + 1
        return offsets

    def _commit_transaction(self) -> None:
        """Release what is in order, and commit it together with the consumed offsets."""
        assert self._producer is not None and self._consumer is not None
        offsets = self._release()
        if not self._in_transaction:
            return
        self._raise_failure()
        try:
            if offsets:
                self._producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    self._consumer.consumer_group_metadata(),
                    self._settings.shutdown_timeout_s,
                )
            self._producer.commit_transaction(self._settings.shutdown_timeout_s)
        except KafkaException as exc:
            self._in_transaction = False
            self._transaction_failed(exc.args[0])
            return
        self._in_transaction = False
        self._tracker.committed(offsets)
        self.metrics.commits.inc()

    def _transaction_failed(self, err: KafkaError) -> None:
        """Abortable: abort and re-read from the committed offsets. Fenced or fatal: stop."""
        assert self._producer is not None
        self.metrics.commit_failures.inc()
        if err.fatal() or not err.txn_requires_abort():
            raise FatalError(f"transaction failed and cannot be retried: {err.str()}")
        log.warning("aborting transaction; re-reading from the committed offsets", error=err.str())
        self._producer.abort_transaction(self._settings.shutdown_timeout_s)
        self._failure = None  # the failed deliveries were part of what is aborted and re-read
        self._rewind()

    def _rewind(self) -> None:
        """Drop all unfinished work and seek every owned partition back to its committed offset."""
        assert self._consumer is not None
        owned = self._tracker.assigned()
        self._forget(owned)
        for tp in owned:
            self._tracker.assign(tp)
        reset = OFFSET_BEGINNING if self._settings.kafka.auto_offset_reset == "earliest" else OFFSET_END
        for tp in self._consumer.committed(self._assignment(), timeout=self._settings.shutdown_timeout_s):
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else reset))

    # -- rebalances -------------------------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self._tracker.assign((p.topic, p.partition))
        self.metrics.rebalances.labels("assign").inc()
        self.health.joined = self.health.broker_reachable = True
        if self._paused:  # new partitions start unpaused; keep the whole assignment consistent
            self._consumer.pause(partitions)  # type: ignore[union-attr]
        log.info("partitions assigned", partitions=[f"{p.topic}/{p.partition}" for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what was published for the revoked partitions, then forget their unfinished work."""
        assert self._producer is not None
        tps = [(p.topic, p.partition) for p in partitions]
        remaining = 0 if self._transactional else self._producer.flush(self._settings.shutdown_timeout_s)
        self._commit(tps)
        dropped = self._forget(tps)
        self.metrics.rebalances.labels("revoke").inc()
        log.info(
            "partitions revoked",
            partitions=[f"{t}/{p}" for t, p in tps],
            dropped_unfinished=dropped,
            undelivered=remaining,
        )

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost (session expired): another member may own them already, so nothing is committed."""
        tps = sorted({(p.topic, p.partition) for p in partitions})
        self._forget(tps)
        self.metrics.rebalances.labels("lost").inc()
        self.health.joined = False
        log.warning("partitions lost", partitions=[f"{t}/{p}" for t, p in tps])

    def _forget(self, tps: list[tuple[str, int]]) -> int:
        """Drop buffered and held records, offset state and lag gauges of partitions no longer owned."""
        gone = set(tps)
        dropped = self._buffer.discard(lambda p: (p.record.topic, p.record.partition) not in gone)
        for tp in tps:
            dropped += len(self._held.pop(tp, {}))
            self._tracker.revoke(tp)
            self._forget_lag(tp)
        return dropped

    def _forget_lag(self, tp: tuple[str, int]) -> None:
        with contextlib.suppress(KeyError):  # never set: nothing consumed from it
            self.metrics.lag.remove(tp[0], str(tp[1]))

    # -- errors and shutdown ----------------------------------------------------------------------

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._failure = self._failure or FatalError(f"fatal Kafka client error: {err.str()}")
            return
        if err.code() in _UNREACHABLE:
            if self.health.broker_reachable:
                log.error("Kafka unreachable; retrying, nothing is committed meanwhile", error=err.str())
            self.health.broker_reachable = False
            return
        log.warning("kafka client error", code=err.name(), error=err.str())

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise FatalError(f"fatal consumer error: {err.str()}")
        log.warning("consumer error", code=err.name(), error=err.str())

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _drain(self) -> bool:
        """Finish the batches already in the model, publish them, wait for acknowledgements, commit.

        Length-bucketed batches publish a partition's records out of offset order, so a buffered
        record may sit below one already published; those "holes" are classified too, or the commit
        would stop below published records and the next owner would repeat them. The rest of the
        buffer is abandoned uncommitted: the next owner reads it. ``False`` when the shutdown
        deadline cut this short.
        """
        assert self._inference is not None and self._producer is not None
        deadline = self._clock() + self._settings.shutdown_timeout_s
        holes = self._take_holes()
        while (holes or self._inference.in_flight) and self._clock() < deadline:
            while holes and self._inference.has_capacity():
                self._inference.submit(holes[: self._settings.batch.max_size])
                del holes[: self._settings.batch.max_size]
            self._collect(timeout_s=min(0.1, max(0.0, deadline - self._clock())))
            self._producer.poll(0)
        finished = not holes and not self._inference.in_flight
        if self._producer.flush(max(0.0, deadline - self._clock())) > 0:
            finished = False
        self._raise_failure()
        self._commit()
        if not finished:
            log.warning(
                "shutdown deadline passed with work unfinished; it is read again by the next owner",
                timeout_s=self._settings.shutdown_timeout_s,
            )
        return finished

    def _take_holes(self) -> list[_Pending]:
        """Buffered records below a published (or in-model) record of their partition, shortest first."""
        items = self._buffer.extract(lambda _: True)
        buffered: dict[tuple[str, int], set[int]] = {}
        for pending in items:
            buffered.setdefault((pending.record.topic, pending.record.partition), set()).add(pending.record.offset)
        holes = []
        for pending in items:
            tp = (pending.record.topic, pending.record.partition)
            decided = self._tracker.highest_decided(tp, buffered[tp])
            if decided is not None and pending.record.offset < decided:
                holes.append(pending)
        return sorted(holes, key=lambda p: len(p.ids))

    def _close(self) -> None:
        if self._inference is not None:
            self._inference.close()
        if self._producer is not None:
            if self._in_transaction:  # a failure mid-transaction: its outputs must not become visible
                with contextlib.suppress(KafkaException):
                    self._producer.abort_transaction(1.0)
            self._producer.flush(1.0)
        if self._consumer is not None:
            try:
                if not self._transactional:  # safe even after a failure: only acknowledged work is covered
                    self._commit()
            finally:
                self._consumer.close()  # leaves the group now instead of after a session timeout
        # Drop the clients so their connections close here, not whenever they are garbage-collected.
        self._consumer = self._producer = None
        if self._http is not None:
            self._http.stop()
        log.info("worker stopped")
