"""The worker: the Kafka loop, and the wiring of the stages it turns.

    consume -> classify stage (intake, batch buffer, model thread, decide) -> dead-letter gate
            -> committer (publish, delivery reports, commit)          pausing stage: fetch or wait

A record walks down these floors once and never comes back here: the loop reads it, the classify
stage decides it (``classify.py``), the gate holds a dead letter while its run may still stop
the worker (``delivery/gate.py``), the committer publishes it and commits its offset
(``delivery/committer.py``). What happens to each stage on assign, revoke, lost, stop and close, and in
which order, is the lifecycle's (``delivery/lifecycle.py``); the HTTP endpoint, waiting for Kafka and
client errors are the service shell's (``shell.py``).

One thread owns the consumer, the producer's callbacks and every stage, so none of them needs a lock;
forward passes run on the model's thread. (Closing the consumer runs on a thread of its own, bounded,
after the loop is done: its callbacks only forget. librdkafka's transactional calls run on a helper
thread, one at a time, because librdkafka can block in them far past their timeout: the loop waits on
one at most 0.5 s a turn, ``delivery/calls.py``.) No loop here blocks without serving stop requests
and liveness for longer than that, beyond a revocation (at most its deadline).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from filter_worker.config import ConfigError, RoutingSettings, Settings
from filter_worker.delivery.at_least_once import AtLeastOnce
from filter_worker.delivery.budget import InFlightBudget
from filter_worker.delivery.committer import Committer
from filter_worker.delivery.gate import DeadLetterGate
from filter_worker.delivery.lifecycle import Lifecycle
from filter_worker.delivery.pausing import Pausing
from filter_worker.delivery.publisher import Publisher
from filter_worker.delivery.transactional import Transactional
from filter_worker.exit_codes import ExitCode, FatalError
from filter_worker.kafka import clients
from filter_worker.kafka.lag import LagMeter
from filter_worker.kafka.topics import prepare_topics
from filter_worker.logs import get_logger, librdkafka_logger
from filter_worker.model.classifier import Classifier
from filter_worker.model.precision import Precision
from filter_worker.moderation.observe import Observer
from filter_worker.monitoring.health import Health
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.batching import BatchBuffer, pass_overhead
from filter_worker.pipeline.cache import DecisionCache
from filter_worker.pipeline.candidate import PAIRS, Candidate
from filter_worker.pipeline.decide import Decider
from filter_worker.pipeline.inference import InferenceThread
from filter_worker.pipeline.intake import Pending
from filter_worker.pipeline.records import InputRecord
from filter_worker.pipeline.routing import Router
from filter_worker.pipeline.sampling import ReviewSampler
from filter_worker.service.classify import Classify
from filter_worker.service.shell import Requests, ServiceShell

log = get_logger("filter_worker.service.worker")

# The longest the loop blocks in one wait: commits, lag, probes and reloads run at least this often.
_IDLE_POLL_S = 0.1
# While delivery reports are outstanding (a few ms after each batch is published) the loop wakes this
# often to serve them: acknowledgements, latency and commits should not wait for the next forward pass.
# Only for this long after the last produce: reports that take longer (a broker outage) are served at
# the normal pace rather than by waking 200 times a second for the whole outage.
_DELIVERY_POLL_S = 0.005
_DELIVERY_WINDOW_S = 1.0
# A run of dead letters below the limit is let through once no record arrived for this long (the
# stream may simply have ended on a few bad records); under load a run is let through when it ends.
_QUIET_S = 2.0
# Group joins: statistics (the group state) this often; the first "waiting to join" line after this
# long, and then one every so often.
_STATS_INTERVAL_MS = 5000
_JOIN_LOG_AFTER_S = 5.0
_JOIN_LOG_INTERVAL_S = 10.0
# Batches' worth of records buffered ahead of the model before the loop stops reading: the bound on
# tokenized work waiting for the model (and so on what a revocation may have to finish), inside the budget.
_BUFFER_BATCHES = 32
# How long closing the consumer (leaving the group) may take. Leaving is a courtesy that lets the group
# reassign at once; with the coordinator unreachable librdkafka would wait out its request timeouts,
# and the group reassigns after the session timeout anyway.
_CONSUMER_CLOSE_S = 2.0
# Net container allocations between young garbage collections (Python's default is 700).
_GC_YOUNG_THRESHOLD = 10_000


@dataclass(slots=True)
class _Running:
    """What exists only while ``run`` runs: the clients and the stages built on them."""

    consumer: Consumer
    publisher: Publisher
    committer: Committer
    gate: DeadLetterGate
    classify: Classify
    pausing: Pausing
    lifecycle: Lifecycle
    lag: LagMeter
    admin: AdminClient


class Worker:
    """One consumer-group member. ``run`` blocks until ``stop`` or a fatal error; returns an exit code."""

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        clock: Callable[[], float] = time.monotonic,
        reload_routing: Callable[[], RoutingSettings] | None = None,
        candidate: Classifier | None = None,
        precision: Precision | None = None,
        requests: Requests | None = None,
    ) -> None:
        self._settings = settings
        self._classifier = classifier
        self._precision = precision  # FILTER_MODEL__DTYPE=auto's choice, re-checked on every rule reload
        self._candidate = candidate  # FILTER_CANDIDATE__NAME loaded: compared in shadow (pipeline/candidate.py)
        self._topics = settings.topics.outputs()
        self._reload_routing = reload_routing
        self._clock = clock
        self.metrics = Metrics()
        self.health = Health(settings.health.liveness_window_s, clock)
        port = settings.metrics.port if settings.metrics.enabled else None
        self.shell = ServiceShell(
            self.health, self.metrics.registry, settings.kafka, port, "FILTER_METRICS__PORT", clock, requests
        )
        self._failures = self.shell.failures
        self.metrics.initialise(self._topics, settings.topics.input, settings.cache.size > 0)
        self.metrics.track_readiness(self.health.ready)
        if candidate is not None:
            self.metrics.initialise_candidate(PAIRS)
        self._observer = Observer.from_settings(self.metrics, settings, classifier.head, classifier.identity)
        self._running: _Running | None = None
        self._last_consumed = self._last_lag = clock()
        # Joining the group: librdkafka's group state (from its statistics), and since when nothing is assigned.
        self._group_state: dict[str, Any] = {}
        self._unassigned_since: float | None = None
        self._last_join_log = 0.0

    @property
    def http_port(self) -> int | None:
        """Port of the metrics and health endpoint once ``run`` started it (useful with port 0)."""
        return self.shell.http_port

    @property
    def _r(self) -> _Running:
        assert self._running is not None, "only while run() runs"
        return self._running

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self.shell.stop()

    def request_reload(self) -> None:
        """Ask the loop to reload the routing settings (SIGHUP); safe from signal handlers."""
        self.shell.request_reload()

    # -- run --------------------------------------------------------------------------------------

    def run(self) -> int:
        settings = self._settings
        if self.shell.stopping:  # SIGTERM while the model loaded: nothing was started, nothing to finish
            log.info("stop requested during start-up; the worker did not join the group")
            return int(ExitCode.OK)
        log.info(
            "worker starting",
            model=self._classifier.identity,
            device=self._classifier.device,
            input=settings.topics.input,
            group=settings.kafka.group_id,
            exactly_once=settings.kafka.exactly_once,
            shadow=settings.routing.shadow,
            kafka=settings.kafka.redacted_properties(),
        )
        self.shell.start_http()
        self._warm_up()
        # Everything alive now (torch, transformers, the model) lives as long as the process: moved out
        # of the collector's generations, a full collection no longer walks millions of objects each
        # time the loop's short-lived records trigger one. The record path makes no reference cycles
        # (its objects die by reference count), so young collections only walk records still in
        # flight. Both settings are process-wide.
        gc.freeze()
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        code = ExitCode.OK
        try:
            self._running = self._build()
            if not self._start_up():
                return code
            while not self.shell.stopping:
                self._step()
            code = self._stop()
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
        if self._candidate is not None:
            self._candidate.classify(["warm-up"])
        self._model_info()
        self.health.model_ready = True

    def _model_info(self) -> None:
        classifier = self._classifier
        self.metrics.model.info(
            {
                "name": classifier.name,
                "revision": classifier.revision,
                "weights_sha256": classifier.weights_sha256,
                "device": classifier.device,
                "dtype": classifier.dtype,
                "backend": classifier.backend,
                "precision_source": self._precision.source if self._precision is not None else "setting",
            }
        )

    def _build(self) -> _Running:
        """The clients and the stages on them; the commit mode is chosen here, once."""
        settings = self._settings
        callbacks = {"error_cb": self.shell.client_error, "logger": librdkafka_logger()}

        def new_producer() -> Producer:
            return Producer({**clients.producer_config(settings.kafka), **callbacks})

        producer = new_producer()
        consumer = Consumer(
            {
                **clients.consumer_config(settings.kafka),
                **callbacks,
                "on_commit": self._on_commit,
                "statistics.interval.ms": _STATS_INTERVAL_MS,
                "stats_cb": self._on_stats,
            }
        )
        admin_config: dict[str, Any] = {**clients.admin_config(settings.kafka), "logger": librdkafka_logger()}
        admin = AdminClient(admin_config)
        publisher = Publisher(
            producer,
            self._topics["dead_letter"],
            clients.producer_max_bytes(settings.kafka),
            settings.dead_letter.oversized == "cut",
            self.metrics,
            self._failures,
            self._clock,
        )
        stages = (settings.kafka, consumer, publisher, self.metrics, self.health, self._failures, self._clock)
        committer: Committer = (
            Transactional(*stages, new_producer=new_producer) if settings.kafka.exactly_once else AtLeastOnce(*stages)
        )
        gate = DeadLetterGate(settings.dead_letter, committer.publish)
        batch = settings.batch
        inference: InferenceThread[Pending] = InferenceThread(
            self._classifier.predict,
            lambda p: p.ids,
            batch.max_size,
            batch.max_tokens,
            observe=self._observe_forward,
            workers=self._classifier.streams,
        )
        routing = settings.routing
        classify = Classify(
            buffer=BatchBuffer(
                batch.max_size,
                batch.max_tokens,
                batch.max_wait_ms / 1000,
                self._clock,
                pass_overhead=pass_overhead(self._classifier.device),
            ),
            inference=inference,
            tokenize=self._classifier.tokenize,
            decider=self._decider(routing),
            observer=self._observer,
            metrics=self.metrics,
            message=settings.message,
            emit=gate.submit_many,
            current=committer.is_current,
            max_buffered=batch.max_size * _BUFFER_BATCHES,
            cache=DecisionCache(settings.cache.size) if settings.cache.size else None,
            embed=settings.output.embed,
            log_text=settings.log.include_text,
            candidate=self._candidate_shadow(self._candidate_router(routing)),
        )
        pausing = Pausing(
            consumer, InFlightBudget(settings.budget.max_records, settings.budget.max_bytes), committer, self.metrics
        )
        lifecycle = Lifecycle(
            consumer=consumer,
            classify=classify,
            gate=gate,
            committer=committer,
            pausing=pausing,
            failures=self._failures,
            revoke_timeout_s=min(settings.shutdown_timeout_s, settings.kafka.max_poll_interval_ms / 2000),
            cooperative=settings.kafka.assignment_strategy == "cooperative-sticky",
            clock=self._clock,
        )
        lag = LagMeter(consumer, admin, self.metrics)
        return _Running(consumer, publisher, committer, gate, classify, pausing, lifecycle, lag, admin)

    def _decider(self, routing: RoutingSettings, router: Router | None = None) -> Decider:
        """Decisions under ``routing``; with review sampling on, drawn records carry a copy for review."""
        review = self._settings.review
        sampler = ReviewSampler(review) if review.enabled else None
        router = router or Router(routing, self._classifier.head)
        return Decider(router, routing.shadow, self._topics, self._classifier.identity, sampler)

    def _candidate_router(self, routing: RoutingSettings) -> Router | None:
        """The candidate's rules: its own (FILTER_CANDIDATE__ROUTING), else the routing in force."""
        if self._candidate is None:
            return None
        return Router(self._settings.candidate.routing or routing, self._candidate.head)

    def _candidate_shadow(self, router: Router | None) -> Candidate | None:
        candidate = self._candidate
        if candidate is None or router is None:
            return None
        batch = self._settings.batch
        return Candidate(
            lambda texts: candidate.classify(texts, batch.max_size, batch.max_tokens)[0],
            candidate.identity,
            router,
            self._settings.message,
            self._settings.review.topic,
            self._settings.candidate.sample_rate,
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
        metadata = self.shell.await_kafka(self._r.consumer)
        if metadata is None:
            return False
        existing = {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}
        limits = prepare_topics(self._r.admin, self._settings, existing)
        self._r.publisher.dead_letter_max_bytes = limits.accepted_by(self._topics["dead_letter"])
        if self._settings.kafka.exactly_once:
            self._init_transactions()
        self._r.consumer.subscribe(
            self._settings.topics.input, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._unassigned_since = self._clock()
        return True

    def _init_transactions(self) -> None:
        """Register the transactional id: fences a previous incarnation and aborts its open transaction."""
        committer = self._r.committer
        assert isinstance(committer, Transactional), "only exactly-once has transactions"
        while not self.shell.stopping:
            self.health.progress()
            if committer.init_transactions():
                return

    # -- the loop ---------------------------------------------------------------------------------

    def _step(self) -> None:
        r = self._r
        self._failures.raise_if_set()
        self._maybe_reload()
        r.pausing.poll()
        r.committer.begin_read()
        try:
            messages = self._wait()
            self._ingest(messages)
        finally:
            r.committer.end_read()
        r.classify.poll()  # the model starts its next batch before this turn publishes the last one
        self._observer.flush_if_due(caught_up=self._caught_up())
        now = self._clock()
        if messages:
            self._last_consumed = now
        elif len(r.gate) and r.classify.empty() and now - self._last_consumed >= _QUIET_S:
            r.gate.open()  # a run of dead letters stalled below the limit: the stream went quiet
        r.lifecycle.poll(caught_up=self._caught_up())
        self._failures.raise_if_set()
        if now - self._last_lag >= self._settings.kafka.commit_interval_ms / 1000:
            self._last_lag = now
            r.lag.update(r.committer.tracker.assigned(), r.pausing.paused)
        self.shell.probe(r.consumer)
        self._log_join_wait()
        records, size = r.committer.in_flight()
        self.metrics.in_flight.set(records)
        self.metrics.in_flight_bytes.set(size)
        self.health.progress()

    def _caught_up(self) -> bool:
        """Nothing buffered, nothing in the model, no dead letters held: everything consumed is decided."""
        return self._r.classify.empty() and not len(self._r.gate)

    def _wait(self) -> list[Message]:
        """Block until there is something to do; returns new records (finished passes wait in the stage).

        What the loop waits on depends on what can happen next. While the model runs and nothing can
        be dispatched, only the pass's end matters: the loop sleeps on the result queue, so it wakes
        the moment the pass ends (records arriving meanwhile wait in librdkafka's queue, and are read
        just before the next batch is formed). Otherwise it waits for records, returning on the first
        one. Each wake-up takes the GIL from the forward pass's Python, so the loop never spins; it
        polls every few ms only while delivery reports are outstanding, up to a second after the last
        produce.
        """
        r = self._r
        classify = r.classify
        publisher = r.publisher
        awaiting_reports = publisher.outstanding and self._clock() - publisher.last_produce < _DELIVERY_WINDOW_S
        cap = _DELIVERY_POLL_S if awaiting_reports else _IDLE_POLL_S
        if classify.in_model and not classify.dispatchable():
            if not classify.full():  # read what is there, so the next batch is ready when the pass ends
                messages = self._read()
                if messages:
                    return messages
                cap = min(cap, _DELIVERY_POLL_S)
            classify.await_pass(cap)
            return self._read()
        messages = self._read()
        if messages or classify.dispatchable():
            return messages
        room = classify.room()  # a whole batch: a buffer holding one would be dispatchable here
        due = classify.time_to_due()
        first = r.consumer.poll(cap if due is None else min(due, cap))
        if first is None:
            return []
        return [first, *r.consumer.consume(num_messages=room - 1, timeout=0)] if room > 1 else [first]

    def _read(self) -> list[Message]:
        """The records librdkafka has ready, as many as the stage has room for; none while its buffer is full.

        A full buffer stops the reading, not the fetching: pausing the partitions would throw away what
        librdkafka has prefetched, and the first record after a resume can take a fetch round trip to
        come. Pauses are for the in-flight budget (the pausing stage). The loop still calls the consumer
        at least once per forward pass, as each pass makes room.
        """
        room = self._r.classify.room()
        return self._r.consumer.consume(num_messages=room, timeout=0) if room > 0 else []

    def _ingest(self, messages: list[Message]) -> None:
        """Consumed records into the committer's tracker, then into the classify stage."""
        r = self._r
        records: list[tuple[InputRecord, int]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                self._consumer_error(error)
                continue
            record = clients.to_input_record(message)
            generation = r.committer.track(record)
            if generation is not None:
                records.append((record, generation))
        if not records:
            return
        self.health.broker_reachable = True
        for topic, count in Counter(record.topic for record, _ in records).items():
            self.metrics.consumed.labels(topic).inc(count)
        r.classify.submit(records)

    def _maybe_reload(self) -> None:
        """Swap in new routing settings between records, or keep the old ones if the new are invalid.

        Records decided before the swap keep their decision (it is in their headers); a rule change
        never re-routes what was already published.
        """
        if not self.shell.reload_requested() or self._reload_routing is None:
            return
        try:
            routing = self._reload_routing()
            router = Router(routing, self._classifier.head)
            candidate_router = self._candidate_router(routing)  # refused too when the candidate cannot follow
            if self._precision is not None and self._precision.recheck(router):
                self._model_info()
        except ConfigError as exc:
            self.metrics.rule_reloads.labels("refused").inc()
            log.error("routing reload refused; the previous rules stay in force", error=str(exc))
            return
        self._r.classify.decider = self._decider(routing, router)
        if self._r.classify.candidate is not None and candidate_router is not None:
            self._r.classify.candidate.router = candidate_router
        self.metrics.rule_reloads.labels("applied").inc()
        log.info(
            "routing reloaded",
            rules=[r.model_dump() for r in routing.rules],
            scopes=[scope.name for scope in routing.scopes],
            shadow=routing.shadow,
        )

    # -- rebalances (librdkafka's callbacks, on the loop's thread inside a consumer call) ----------

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
        if since is None or now - since < _JOIN_LOG_AFTER_S or now - self._last_join_log < _JOIN_LOG_INTERVAL_S:
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

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        running = self._running
        if running is None:
            return
        tps = running.lifecycle.assigned(partitions)
        self.metrics.rebalances.labels("assign").inc()
        self.health.joined = self.health.broker_reachable = True
        self._unassigned_since = None
        log.info("partitions assigned", partitions=[f"{t}/{p}" for t, p in tps])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        running = self._running  # read once: a close that outlived its bound clears it from another thread
        if running is None:
            return
        tps = [(p.topic, p.partition) for p in partitions]
        finished, dropped = running.lifecycle.revoked(tps)
        running.lag.forget(tps)
        if not running.committer.tracker.assigned():
            self._unassigned_since = self._clock()
        self.metrics.rebalances.labels("revoke").inc()
        # In the README's words: what was started is finished and committed; records fetched but not yet
        # started are not committed, and whoever owns the partition next reads them again.
        log.info(
            "partitions revoked",
            partitions=[f"{t}/{p}" for t, p in tps],
            finished_in_time=finished,
            read_again_by_next_owner=dropped,
        )

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        running = self._running
        if running is None:
            return
        tps = sorted({(p.topic, p.partition) for p in partitions})
        running.lifecycle.lost(tps)
        running.lag.forget(tps)
        self._unassigned_since = self._clock()
        self.metrics.rebalances.labels("lost").inc()
        self.health.joined = False
        log.warning("partitions lost", partitions=[f"{t}/{p}" for t, p in tps])

    # -- stop, errors, close ----------------------------------------------------------------------

    def _stop(self) -> ExitCode:
        """Graceful stop within FILTER_SHUTDOWN_TIMEOUT_S; what it cuts short is read again by the next owner."""
        timeout_s = self._settings.shutdown_timeout_s
        log.info("stopping: finishing in-flight work", in_flight=self._r.committer.tracker.in_flight())
        done = self._r.lifecycle.stop(self._clock() + timeout_s)
        self._failures.raise_if_set()
        if done:
            return ExitCode.OK
        log.warning(
            "shutdown deadline passed with work unfinished; it is read again by the next owner", timeout_s=timeout_s
        )
        return ExitCode.SHUTDOWN_DEADLINE

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
        """Close the stages (the lifecycle's last row), then the clients (leaving the group now), then HTTP.

        Never raises: a failure is already on its way out of ``run`` as an exit code.
        """
        running = self._running
        if running is not None:
            try:
                running.lifecycle.close()
                _close_consumer(running.consumer)  # revokes (the lifecycle commits nothing more), leaves the group
            finally:
                self._running = None  # drop the clients so their connections close here, not at GC
        self.shell.stop_http()
        log.info("worker stopped")


def _close_consumer(consumer: Consumer) -> None:
    """Close the consumer (leave the group), waiting at most ``_CONSUMER_CLOSE_S``. Never raises."""

    def close() -> None:
        try:
            consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer failed", error=str(exc))

    closer = threading.Thread(target=close, name="consumer-close", daemon=True)
    closer.start()
    closer.join(_CONSUMER_CLOSE_S)
    if closer.is_alive():
        log.warning(
            "leaving the consumer group did not finish in time; the group reassigns the partitions once "
            "FILTER_KAFKA__SESSION_TIMEOUT_MS passes",
            waited_s=_CONSUMER_CLOSE_S,
        )
