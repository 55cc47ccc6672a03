"""The worker: wires the pipeline's steps and owns the Kafka loop and its threads.

    consume -> intake (decode, cache, tokenize) -> batch buffer -> inference thread -> decide
            -> dead-letter gate -> committer (publish, delivery reports, commit)

One thread owns the consumer, the producer's callbacks, the offset tracker, the batch buffer and the
gate, so none of them needs a lock; forward passes run on the inference thread. Every record carries
its source offset from consume to commit; each guarantee has one home: the committer decides what is
committed and when (``delivery/committer.py``), the gate holds dead letters of a run that may still
stop the worker (``delivery/gate.py``), the in-flight budget bounds everything between consume and
commit (``delivery/budget.py``), the publisher replaces what the broker refuses (``delivery/publisher.py``).
No loop here blocks without serving stop requests and liveness.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from filter_worker import kafka_io
from filter_worker.config import ConfigError, RoutingSettings, Settings
from filter_worker.delivery.at_least_once import AtLeastOnce
from filter_worker.delivery.budget import InFlightBudget
from filter_worker.delivery.committer import TP, Committer
from filter_worker.delivery.gate import DeadLetterGate
from filter_worker.delivery.publisher import Publisher
from filter_worker.delivery.transactional import CALL_TIMEOUT_S, Transactional
from filter_worker.exit_codes import ExitCode, FailureSlot, FatalError
from filter_worker.health import Health, HealthServer
from filter_worker.logs import get_logger, librdkafka_logger
from filter_worker.metrics import Metrics
from filter_worker.model import Classifier
from filter_worker.pipeline.batching import BatchBuffer
from filter_worker.pipeline.cache import DecisionCache
from filter_worker.pipeline.decide import Classified, Decider
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.inference import InferenceThread, Result
from filter_worker.pipeline.intake import Answered, Pending, take_in
from filter_worker.pipeline.observe import Observer
from filter_worker.pipeline.records import InputRecord, Outgoing
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
# A run of dead letters below the limit is let through once no record arrived for this long (the
# stream may simply have ended on a few bad records); under load a run is let through when it ends.
_QUIET_S = 2.0
# While waiting for Kafka at start-up: how long one metadata request may take, and how often to log.
_METADATA_TIMEOUT_S = 2.0
_WAITING_LOG_INTERVAL_S = 10.0
# Group joins: statistics (the group state) this often; the first "waiting to join" line after this long.
_STATS_INTERVAL_MS = 5000
_JOIN_LOG_AFTER_S = 5.0
# Batches' worth of records buffered ahead of the model before the loop stops reading: the bound on
# tokenized work waiting for the model (and so on what a revocation may have to finish), inside the budget.
_BUFFER_BATCHES = 32
# After a fatal error or once drained, how long closing may still wait for outstanding deliveries.
_CLOSE_FLUSH_S = 1.0
# Net container allocations between young garbage collections (Python's default is 700).
_GC_YOUNG_THRESHOLD = 10_000


@dataclass(slots=True)
class _Running:
    """What exists only while ``run`` runs: the clients and the stages built on them."""

    consumer: Consumer
    publisher: Publisher
    committer: Committer
    gate: DeadLetterGate
    inference: InferenceThread[Pending]


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
        self._topics = settings.topics.outputs()
        routing = settings.routing
        self._decider = Decider(Router(routing, classifier.labels), routing.shadow, self._topics, classifier.identity)
        self.metrics = Metrics()
        self._observer = Observer.from_settings(self.metrics, settings, classifier.labels, classifier.identity)
        self._reload_routing = reload_routing
        self._reload_requested = threading.Event()
        self._clock = clock
        self._stop = threading.Event()
        batch = settings.batch
        self._buffer: BatchBuffer[Pending] = BatchBuffer(
            batch.max_size, batch.max_tokens, batch.max_wait_ms / 1000, clock
        )
        self._max_buffered = batch.max_size * _BUFFER_BATCHES
        self._budget = InFlightBudget(settings.budget.max_records, settings.budget.max_bytes)
        self._cache = DecisionCache(settings.cache.size) if settings.cache.size else None
        self._failures = FailureSlot()
        self.health = Health(settings.health.liveness_window_s, clock)
        self.metrics.initialise(self._topics, settings.topics.input, settings.cache.size > 0)
        self.metrics.track_readiness(self.health.ready)
        self._running: _Running | None = None
        self._http: HealthServer | None = None
        self._paused = False
        self._closing = False
        # Finished passes taken from the model and not yet routed (see _route_collected).
        self._collected: deque[Result[Pending]] = deque()
        self._last_consumed = self._last_lag = self._last_probe = clock()
        # Joining the group: librdkafka's group state (from its statistics), and since when nothing is assigned.
        self._group_state: dict[str, Any] = {}
        self._unassigned_since: float | None = None
        self._last_join_log = 0.0

    @property
    def http_port(self) -> int | None:
        """Port of the metrics and health endpoint once ``run`` started it (useful with port 0)."""
        return self._http.port if self._http is not None else None

    @property
    def _r(self) -> _Running:
        assert self._running is not None, "only while run() runs"
        return self._running

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask the loop to reload the routing settings (SIGHUP); safe from signal handlers."""
        self._reload_requested.set()

    # -- run --------------------------------------------------------------------------------------

    def run(self) -> int:
        settings = self._settings
        log.info(
            "worker starting",
            model=self._classifier.identity,
            device=self._classifier.device,
            input=settings.topics.input,
            group=settings.kafka.group_id,
            exactly_once=settings.kafka.exactly_once,
            shadow=self._decider.shadow,
            kafka=settings.kafka.redacted_properties(),
        )
        if settings.metrics.enabled:
            try:
                self._http = HealthServer(settings.metrics.port, self.health, self.metrics.registry).start()
            except OSError as exc:
                raise ConfigError(f"FILTER_METRICS__PORT={settings.metrics.port}: {exc.strerror}") from None
        self._warm_up()
        # Everything alive now (torch, transformers, the model) lives as long as the process: moved out
        # of the collector's generations, a full collection no longer walks millions of objects each
        # time the loop's short-lived records trigger one. The record path makes no reference cycles
        # (its objects die by reference count), so young collections only walk records still in
        # flight: at the default threshold one ran every few dozen records (about 1.2 us per record).
        # Both settings are process-wide.
        gc.freeze()
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        code = ExitCode.OK
        try:
            self._running = self._build()
            if not self._start_up():
                return code
            while not self._stop.is_set():
                self._step()
            log.info("stopping: finishing in-flight work", in_flight=self._r.committer.tracker.in_flight())
            if not self._drain():
                code = ExitCode.SHUTDOWN_DEADLINE
        except FatalError as exc:
            log.error("worker failed; offsets stay at the last acknowledged record", error=str(exc), exit_code=exc.code)
            code = exc.code
        finally:
            try:
                self._observer.flush()  # what was decided is in the histograms of the last scrape
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

    def _build(self) -> _Running:
        """The clients and the stages on them; the commit mode is chosen here, once."""
        settings = self._settings
        callbacks = {"error_cb": self._client_error, "logger": librdkafka_logger()}
        producer = Producer({**kafka_io.producer_config(settings.kafka), **callbacks})
        consumer = Consumer(
            {
                **kafka_io.consumer_config(settings.kafka),
                **callbacks,
                "on_commit": self._on_commit,
                "statistics.interval.ms": _STATS_INTERVAL_MS,
                "stats_cb": self._on_stats,
            }
        )
        publisher = Publisher(
            producer,
            self._topics["dead_letter"],
            kafka_io.producer_max_bytes(settings.kafka),
            settings.dead_letter.oversized == "cut",
            self.metrics,
            self._failures,
            self._clock,
        )
        mode = Transactional if settings.kafka.exactly_once else AtLeastOnce
        committer = mode(settings.kafka, consumer, publisher, self.metrics, self.health, self._failures, self._clock)
        inference: InferenceThread[Pending] = InferenceThread(
            self._classifier.predict,
            lambda p: p.ids,
            settings.batch.max_size,
            settings.batch.max_tokens,
            observe=self._observe_forward,
        )
        return _Running(
            consumer, publisher, committer, DeadLetterGate(settings.dead_letter, committer.publish), inference
        )

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
        existing = self._await_kafka()
        if existing is None:
            return False
        self._check_topics(existing)
        if self._settings.kafka.exactly_once:
            self._init_transactions()
        self._r.consumer.subscribe(
            self._settings.topics.input, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._unassigned_since = self._clock()
        return True

    def _await_kafka(self) -> dict[str, int] | None:
        """Topic -> partition count once the cluster answers; retried for as long as it takes.

        A worker started before its broker (compose, a cluster being restored) must not crash-loop:
        it waits, says so in the log, and stays live but not ready.
        """
        started = self._clock()
        last_log = -_WAITING_LOG_INTERVAL_S
        while not self._stop.is_set():
            self._failures.raise_if_set()
            self.health.progress()
            try:
                metadata = self._r.consumer.list_topics(timeout=_METADATA_TIMEOUT_S)
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
        """Inputs must exist; outputs must exist or be created; warn when an output takes smaller records."""
        topics = self._settings.topics
        inputs = [t for t in topics.input if not t.startswith("^")]  # a regex subscription may match later
        missing_inputs = [t for t in inputs if t not in existing]
        if missing_inputs:
            raise FatalError(
                f"input topic(s) {missing_inputs} do not exist on {self._settings.kafka.bootstrap_servers} "
                "(check FILTER_TOPICS__INPUT and FILTER_KAFKA__BOOTSTRAP_SERVERS)",
                ExitCode.TOPICS,
            )
        admin_config: dict[str, Any] = {**kafka_io.admin_config(self._settings.kafka), "logger": librdkafka_logger()}
        admin = AdminClient(admin_config)
        missing = sorted(set(self._topics.values()) - set(existing))
        if missing and not topics.create:
            raise FatalError(
                f"output topic(s) {missing} do not exist; create them or set FILTER_TOPICS__CREATE=true",
                ExitCode.TOPICS,
            )
        if missing:
            partitions = max((existing[t] for t in inputs), default=1)
            try:
                kafka_io.create_topics(admin, missing, partitions)
            except RuntimeError as exc:
                raise FatalError(str(exc), ExitCode.TOPICS) from None
            log.info("created output topics", topics=missing, partitions=partitions)
        limits = kafka_io.size_limits(
            admin, [*inputs, *self._topics.values()], kafka_io.producer_max_bytes(self._settings.kafka)
        )
        for mismatch in limits.mismatches(topics):
            log.warning("record size limits differ", detail=mismatch)
        self._r.publisher.dead_letter_max_bytes = limits.accepted_by(self._topics["dead_letter"])

    def _init_transactions(self) -> None:
        """Register the transactional id: fences a previous incarnation and aborts its open transaction."""
        producer = self._r.publisher.producer
        while not self._stop.is_set():
            self.health.progress()
            try:
                producer.init_transactions(CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable():
                    raise FatalError(f"could not initialise transactions: {err.str()}") from None
                log.warning("retrying transaction initialisation", error=err.str())

    # -- the loop ---------------------------------------------------------------------------------

    def _step(self) -> None:
        r = self._r
        self._failures.raise_if_set()
        self._maybe_reload()
        self._apply_fetch_gate()
        messages = self._wait()
        self._ingest(messages)
        self._collected += r.inference.completed()
        self._dispatch()  # the model starts its next batch before this turn publishes the last one
        self._route_collected()
        self._observer.flush_if_due(caught_up=self._caught_up())
        now = self._clock()
        if messages:
            self._last_consumed = now
        elif len(r.gate) and self._pipeline_empty() and now - self._last_consumed >= _QUIET_S:
            r.gate.open()  # a run of dead letters stalled below the limit: the stream went quiet
        if r.committer.poll(caught_up=self._caught_up()):
            self._discard_stale()
        self._failures.raise_if_set()
        if now - self._last_lag >= self._settings.kafka.commit_interval_ms / 1000:
            self._last_lag = now
            self._update_lag()
        self._probe_broker()
        self._log_join_wait()
        self.metrics.in_flight.set(r.committer.tracker.in_flight())
        self.metrics.in_flight_bytes.set(r.committer.tracker.in_flight_bytes())
        self.health.progress()

    def _pipeline_empty(self) -> bool:
        return not len(self._buffer) and not self._r.inference.in_flight

    def _caught_up(self) -> bool:
        """Nothing buffered, nothing in the model, no dead letters held: everything consumed is decided."""
        return self._pipeline_empty() and not len(self._r.gate)

    def _wait(self) -> list[Message]:
        """Block until there is something to do; returns new records, finished passes go to ``_collected``.

        What the loop waits on depends on what can happen next. While the model runs and nothing can
        be dispatched, only the pass's end matters: the loop sleeps on the result queue, so it wakes
        the moment the pass ends (records arriving meanwhile wait in librdkafka's queue, and are read
        just before the next batch is formed). Otherwise it waits for records, returning on the first
        one. Each wake-up takes the GIL from the forward pass's Python, so the loop never spins; it
        polls every few ms only while delivery reports are outstanding, up to a second after the last
        produce.
        """
        r = self._r
        publisher = r.publisher
        awaiting_reports = publisher.outstanding and self._clock() - publisher.last_produce < _DELIVERY_WINDOW_S
        cap = _DELIVERY_POLL_S if awaiting_reports else _IDLE_POLL_S
        if r.inference.in_flight and not self._can_dispatch():
            if not self._buffer.full():  # read what is there, so the next batch is ready when the pass ends
                messages = self._read()
                if messages:
                    return messages
                cap = min(cap, _DELIVERY_POLL_S)
            self._collected += r.inference.completed(cap)
            return self._read()
        messages = self._read()
        if messages or self._can_dispatch():
            return messages
        room = self._room()  # a whole batch: a buffer holding one would be dispatchable here
        due = self._buffer.time_to_due()
        first = r.consumer.poll(cap if due is None else min(due, cap))
        if first is None:
            return []
        return [first, *r.consumer.consume(num_messages=room - 1, timeout=0)] if room > 1 else [first]

    def _room(self) -> int:
        """How many records one read may take: a batch, or less where the buffer is nearly full."""
        return min(self._settings.batch.max_size, self._max_buffered - len(self._buffer))

    def _read(self) -> list[Message]:
        """The records librdkafka has ready, as many as ``_room`` allows; none while the buffer is full.

        A full buffer stops the reading, not the fetching: pausing the partitions would throw away
        what librdkafka has prefetched, and on the embedded broker the first record after a resume
        came 0.5 to 0.95 s later, so a worker whose buffer filled behind a fast model sat idle once
        per fill. Pauses are for the in-flight budget (``_apply_fetch_gate``). The loop still calls
        the consumer at least once per forward pass, as each pass makes room.
        """
        room = self._room()
        return self._r.consumer.consume(num_messages=room, timeout=0) if room > 0 else []

    def _can_dispatch(self) -> bool:
        inference = self._r.inference
        return inference.has_capacity() and self._buffer.ready(model_busy=inference.in_flight > 0)

    def _ingest(self, messages: list[Message]) -> None:
        """Consumed records into the tracker, then intake: dead letters and cache answers out, the rest buffered."""
        r = self._r
        records: list[tuple[InputRecord, int]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._consumer_error(error)
                continue
            record = kafka_io.to_input_record(message)
            generation = r.committer.track(record)
            if generation is not None:
                records.append((record, generation))
        if not records:
            return
        self.health.broker_reachable = True
        for topic, count in Counter(record.topic for record, _ in records).items():
            self.metrics.consumed.labels(topic).inc(count)
        settings = self._settings
        intake = take_in(records, settings.message, settings.output.embed, self._classifier.tokenize, self._cache)
        for record, generation, failure in intake.failed:
            self._dead_letter(record, generation, failure)
        self._answer(intake.answered)
        for pending in intake.pending:
            self._buffer.add(pending, len(pending.ids))

    def _dispatch(self) -> None:
        while self._can_dispatch():
            self._r.inference.submit(self._buffer.take())

    def _route_collected(self) -> None:
        """Route the finished passes taken from the model, oldest first, decided together.

        They wait in ``_collected`` rather than in a local variable because a consumer call may run a
        revocation between taking them and routing them: ``_finish`` routes them too, so their records
        are published before the revocation commits (else the commit stops below them and the next
        owner repeats every published record above). Passes collected in one turn are decided in one
        call (at small batch sizes the per-call costs, numpy routing and metrics, are shared by more
        records), and reach the gate pass by pass, each pass's dead letters before its outputs: a run
        of dead letters is counted as the records came out of the model, not joined across passes.
        """
        if not self._collected:
            return
        committer = self._r.committer
        decided: list[Pending] = []
        rows: list[np.ndarray] = []
        # Per pass: the records the model failed on (with the error), and how many were decided.
        passes: list[tuple[list[tuple[Pending, str | None]], int]] = []
        while self._collected:
            result = self._collected.popleft()
            failed: list[tuple[Pending, str | None]] = []
            picked: list[int] = []
            for i, pending in enumerate(result.items):
                record = pending.record
                if not committer.is_current((record.topic, record.partition), pending.generation):
                    continue  # revoked or rewound since; read again
                if result.errors[i] is not None or result.probs is None:
                    failed.append((pending, result.errors[i]))
                    continue
                decided.append(pending)
                picked.append(i)
            if picked:
                assert result.probs is not None
                rows.append(result.probs if len(picked) == len(result.items) else result.probs[picked])
            passes.append((failed, len(picked)))
        outputs: list[Outgoing] = []
        if decided:
            probs = rows[0] if len(rows) == 1 else np.concatenate(rows)
            if self._cache is not None:
                for pending, row in zip(decided, probs, strict=True):
                    if pending.cache_key is not None:
                        self._cache.put(pending.cache_key, row, pending.truncated)
                self.metrics.cache_records.labels("miss").inc(len(decided))
            outputs = self._decide(decided, probs)
        start = 0
        for failed, count in passes:
            for pending, error in failed:
                failure = DecodeFailure("model_error", f"the model failed on this record: {error}")
                self._dead_letter(pending.record, pending.generation, failure)
            if count:
                self._r.gate.submit_many(outputs[start : start + count])
                start += count
        self._answer_buffered_repeats()

    def _answer(self, answered: list[Answered]) -> None:
        if answered:
            self.metrics.cache_records.labels("hit").inc(len(answered))
            self._r.gate.submit_many(self._decide(answered, np.stack([item.probs for item in answered])))

    def _answer_buffered_repeats(self) -> None:
        """Decide buffered records whose text a finished batch just classified, instead of classifying it again.

        A campaign's copies arrive together, so many are already buffered when its first copy returns.
        """
        cache = self._cache
        if cache is None or not len(self._buffer):
            return
        answered = []
        for pending in self._buffer.extract(lambda p: p.cache_key is not None and p.cache_key in cache):
            hit = cache.get(pending.cache_key)  # type: ignore[arg-type]  # not None: extracted for it
            assert hit is not None
            answered.append(
                Answered(
                    pending.record, pending.generation, hit.probs, hit.truncated, pending.document, pending.embed_into
                )
            )
        self._answer(answered)

    def _decide(self, items: Sequence[Classified], probs: np.ndarray) -> list[Outgoing]:
        """Decide a batch under the current rules and count it; the outputs are for the gate."""
        outputs, decisions = self._decider.classified(items, probs)
        self._observer.observe(probs, decisions, self._decider.router)
        if self._decider.shadow:
            for action, count in Counter(d.action for d in decisions).items():
                self.metrics.shadow_decisions.labels(action).inc(count)
        return outputs

    def _dead_letter(self, record: InputRecord, generation: int, failure: DecodeFailure) -> None:
        fields: dict[str, Any] = {"error": failure.error, "reason": failure.reason}
        if self._settings.log.include_text:  # message content is private unless the operator opts in
            fields["value"] = (record.value or b"")[:200].decode("utf-8", "replace")
        log.warning(
            "dead-lettering record", topic=record.topic, partition=record.partition, offset=record.offset, **fields
        )
        self._r.gate.submit(self._decider.failed(record, generation, failure))

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
            router = Router(routing, self._classifier.labels)
        except ConfigError as exc:
            self.metrics.rule_reloads.labels("refused").inc()
            log.error("routing reload refused; the previous rules stay in force", error=str(exc))
            return
        self._decider = Decider(router, routing.shadow, self._topics, self._classifier.identity)
        self.metrics.rule_reloads.labels("applied").inc()
        log.info(
            "routing reloaded",
            rules=[r.model_dump() for r in routing.rules],
            scopes=[scope.name for scope in routing.scopes],
            shadow=routing.shadow,
        )

    # -- backpressure -----------------------------------------------------------------------------

    def _apply_fetch_gate(self) -> None:
        """Pause fetching while the budget is spent or the committer backs off.

        The budget counts every record between consume and acknowledgement, so memory stays bounded whichever
        stage is slow: the model, the broker's acknowledgements, a transaction. A full batch buffer does not
        pause: the loop stops reading instead (``_read``).
        """
        r = self._r
        tracker = r.committer.tracker
        records, size = tracker.in_flight(), tracker.in_flight_bytes()
        budget = not self._budget.refilled(records, size) if self._paused else self._budget.spent(records, size)
        hold = budget or r.committer.fetch_paused()
        if hold == self._paused:
            return
        assignment = self._assignment()
        if hold:
            r.consumer.pause(assignment)
        else:
            r.consumer.resume(assignment)
        self._paused = hold
        self.metrics.fetch_paused.set(int(hold))
        log.debug("fetching paused" if hold else "fetching resumed", in_flight=records, in_flight_bytes=size)

    def _assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self._r.committer.tracker.assigned()]

    # -- lag and broker probes --------------------------------------------------------------------

    def _update_lag(self) -> None:
        """Lag per owned partition from cached watermarks (no broker round trip)."""
        consumer = self._r.consumer
        for tp in consumer.position(self._assignment()):
            if tp.offset < 0:
                continue
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def _probe_broker(self) -> None:
        """While the broker looks unreachable, ask it for metadata now and then to notice its return."""
        if self.health.broker_reachable or self._clock() - self._last_probe < _PROBE_INTERVAL_S:
            return
        self._last_probe = self._clock()
        try:
            self._r.consumer.list_topics(timeout=1.0)
        except KafkaException:
            return
        self.health.broker_reachable = True

    # -- rebalances -------------------------------------------------------------------------------

    def _on_stats(self, stats: str) -> None:
        """librdkafka's statistics (every few seconds): only the consumer-group part is kept, for the join log."""
        self._group_state = orjson.loads(stats).get("cgrp") or {}

    def _log_join_wait(self) -> None:
        """While no partition is assigned for a while, say every 10 s where the group join stands.

        A join can take long for reasons the worker cannot see otherwise: the coordinator waits for a
        member that died to time out (``join_state`` going ``wait-join`` -> ``wait-sync`` ->
        ``wait-join``), or the coordinator is not found (``state`` other than ``up``). The embedded
        broker also holds every join answer for half the session timeout.
        """
        since = self._unassigned_since
        now = self._clock()
        if since is None or now - since < _JOIN_LOG_AFTER_S or now - self._last_join_log < _WAITING_LOG_INTERVAL_S:
            return
        self._last_join_log = now
        group = self._group_state
        log.info(
            "waiting to join the consumer group",
            group=self._settings.kafka.group_id,
            waited_s=round(now - since, 1),
            state=group.get("state"),
            join_state=group.get("join_state"),
            state_age_ms=group.get("stateage"),
            rebalance_reason=group.get("rebalance_reason") or None,
            rebalances=group.get("rebalance_cnt"),
            member_id=self._r.consumer.memberid() or None,
            session_timeout_ms=self._settings.kafka.session_timeout_ms,
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Assigned here, not by confluent-kafka after this returns: that later assign would undo the
        # pause below, and a worker over its budget would fetch from its new partitions anyway.
        if self._settings.kafka.assignment_strategy == "cooperative-sticky":
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        self._r.committer.assign([(p.topic, p.partition) for p in partitions])
        # Set either way: librdkafka keeps a partition's pause across its revocation, so one paused
        # when it was revoked came back paused, and with fetching resumed meanwhile for the others
        # it was never read again (test_new_partitions_stay_paused_while_the_budget_is_spent, 7 runs in 9).
        if partitions:
            (consumer.pause if self._paused else consumer.resume)(partitions)
        self.metrics.rebalances.labels("assign").inc()
        self.health.joined = self.health.broker_reachable = True
        self._unassigned_since = None
        log.info("partitions assigned", partitions=[f"{p.topic}/{p.partition}" for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish the records below published ones, commit what is done, forget the rest (the next owner reads it).

        Batches cut by length publish a partition's records out of offset order, so a buffered record
        may sit below published ones; without finishing it, the commit would stop below them and the
        next owner would publish them again.
        """
        tps = [(p.topic, p.partition) for p in partitions]
        deadline = self._clock() + (_CLOSE_FLUSH_S if self._closing else self._revoke_timeout_s())
        try:
            finished = True
            if not self._closing and self._failures.failure is None:
                finished = self._finish(set(tps), deadline)
                self._r.gate.open()
            self._r.committer.revoke(tps, deadline)
        except FatalError as exc:  # never raise through librdkafka: the loop raises it
            self._failures.set(exc)
            finished = False
        dropped = self._forget(tps)
        if not self._r.committer.tracker.assigned():
            self._unassigned_since = self._clock()
        self.metrics.rebalances.labels("revoke").inc()
        log.info(
            "partitions revoked",
            partitions=[f"{t}/{p}" for t, p in tps],
            dropped_unfinished=dropped,
            finished_in_time=finished,
        )

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost (session expired): another member may own them already, so nothing is committed."""
        tps = sorted({(p.topic, p.partition) for p in partitions})
        if self._r.committer.lost(tps):
            self._discard_stale()
        self._forget(tps)
        self._unassigned_since = self._clock()
        self.metrics.rebalances.labels("lost").inc()
        self.health.joined = False
        log.warning("partitions lost", partitions=[f"{t}/{p}" for t, p in tps])

    def _revoke_timeout_s(self) -> float:
        """Within the rebalance's own timeout (max.poll.interval.ms), and at most the shutdown deadline."""
        return min(self._settings.shutdown_timeout_s, self._settings.kafka.max_poll_interval_ms / 2000)

    def _forget(self, tps: list[TP]) -> int:
        """Drop buffered work, held dead letters and lag gauges of partitions no longer owned."""
        gone = set(tps)
        dropped = self._buffer.discard(lambda p: (p.record.topic, p.record.partition) not in gone)
        self._r.gate.discard(lambda item: (item.source.topic, item.source.partition) not in gone)
        for topic, partition in tps:
            with contextlib.suppress(KeyError):  # never set: nothing consumed from it
                self.metrics.lag.remove(topic, str(partition))
        return dropped

    def _discard_stale(self) -> None:
        """After a rewind: drop buffered work and held dead letters of the generations before it."""
        committer = self._r.committer

        def current(record: InputRecord, generation: int) -> bool:
            return committer.is_current((record.topic, record.partition), generation)

        self._buffer.discard(lambda p: current(p.record, p.generation))
        self._r.gate.discard(lambda item: current(item.source, item.generation))

    # -- finishing: graceful stop and revocation --------------------------------------------------

    def _finish(self, tps: set[TP] | None, deadline: float) -> bool:
        """Classify and decide the buffered records of ``tps`` (all if ``None``) that sit below a decided one.

        Also waits for the passes in the model. ``False`` when ``deadline`` cut this short. Records
        above every decided one stay buffered: dropping them repeats nothing.
        """
        r = self._r
        self._route_collected()  # taken from the model before this revocation or stop: decided first
        holes = self._take_holes(tps)
        max_size = self._settings.batch.max_size
        while (holes or r.inference.in_flight) and self._clock() < deadline:
            while holes and r.inference.has_capacity():
                r.inference.submit(holes[:max_size])
                del holes[:max_size]
            self._collected += r.inference.completed(timeout_s=min(0.1, max(0.001, deadline - self._clock())))
            self._route_collected()
            r.publisher.poll(0)
            self.health.progress()
        return not holes and not r.inference.in_flight

    def _take_holes(self, tps: set[TP] | None) -> list[Pending]:
        """Buffered records of ``tps`` below a published (or in-model) record of their partition, shortest first."""

        def chosen(pending: Pending) -> bool:
            return tps is None or (pending.record.topic, pending.record.partition) in tps

        items = self._buffer.extract(chosen)
        buffered: dict[TP, set[int]] = {}
        for pending in items:
            buffered.setdefault((pending.record.topic, pending.record.partition), set()).add(pending.record.offset)
        holes: list[Pending] = []
        rest: list[Pending] = []
        tracker = self._r.committer.tracker
        for pending in items:
            tp = (pending.record.topic, pending.record.partition)
            decided = tracker.highest_decided(tp, buffered[tp])
            (holes if decided is not None and pending.record.offset < decided else rest).append(pending)
        for pending in rest:
            self._buffer.add(pending, len(pending.ids))
        return sorted(holes, key=lambda p: len(p.ids))

    def _drain(self) -> bool:
        """Graceful stop: finish the holes and the passes in the model, publish, let held dead letters
        through, wait for acknowledgements, commit. ``False`` when the shutdown deadline cut it short;
        the rest of the buffer is abandoned uncommitted and read again by the next owner.
        """
        deadline = self._clock() + self._settings.shutdown_timeout_s
        finished = self._finish(None, deadline)
        self._r.gate.open()
        committed = self._r.committer.finish(deadline)
        self._failures.raise_if_set()
        if not (finished and committed):
            log.warning(
                "shutdown deadline passed with work unfinished; it is read again by the next owner",
                timeout_s=self._settings.shutdown_timeout_s,
            )
        return finished and committed

    # -- errors and shutdown ----------------------------------------------------------------------

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._failures.set(FatalError(f"fatal Kafka client error: {err.str()}"))
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

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if self._running is not None:
            self._running.committer.committed(err, partitions)

    def _close(self) -> None:
        """Stop the inference thread, close the clients (leaving the group now), stop the HTTP server.

        Never raises: a failure is already on its way out of ``run`` as an exit code.
        """
        self._closing = True
        running = self._running
        if running is not None:
            running.inference.close()
            try:
                running.committer.close()
                running.publisher.flush(_CLOSE_FLUSH_S)
                running.consumer.close()  # revokes (committing what is acknowledged), leaves the group now
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the Kafka clients failed", error=str(exc))
            finally:
                self._running = None  # drop the clients so their connections close here, not at GC
        if self._http is not None:
            self._http.stop()
        log.info("worker stopped")
