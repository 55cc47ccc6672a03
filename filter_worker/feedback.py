"""Reviewers' verdicts become live precision: ``filter-worker feedback`` and the verdict format.

A verdict is a record on ``FILTER_FEEDBACK__TOPIC`` whose value is JSON
``{"source": "<topic/partition/offset>", "verdict": "abuse" | "ok", "reviewer": "..."}`` and whose
headers are the decision headers the reviewed record carried (``filter.action``, ``filter.rule``,
``filter.scope``, ``filter.score``, ``filter.model``, copied unchanged). Everything needed travels in
the record, so the service keeps no state but its windows and joins nothing.

Per (scope, rule, action, model) it keeps the last ``FILTER_FEEDBACK__WINDOW`` verdicts on quarantine
and drop decisions, keyed by source (a repeated or revised verdict replaces the earlier one), and
exports their share of "abuse" as the rule's precision. Labels stay bounded: scopes and rules must be
in the routing configuration, actions are two, and at most ``MAX_MODELS`` models are tracked at once.

Restarts: the windows live in memory. Offsets are committed only after a verdict is counted
(at-least-once), and at start-up each partition is read again from up to ``FILTER_FEEDBACK__REPLAY``
records before the committed offset. Those records refill the windows without being counted again,
so a restart neither empties the precision nor double counts. One replica should run, since a
window split across replicas would give each a partial view.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from filter_worker import kafka_io
from filter_worker.config import ConfigError, KafkaSettings, RoutingSettings, Settings, rule_names
from filter_worker.exit_codes import ExitCode
from filter_worker.health import Health, HealthServer
from filter_worker.kafka_io import headers_of, to_input_record
from filter_worker.logs import get_logger, librdkafka_logger
from filter_worker.metrics import FeedbackMetrics
from filter_worker.pipeline.routing import scope_rules

log = get_logger("filter_worker.feedback")

VERDICTS = ("abuse", "ok")
MODERATED = ("quarantine", "drop")  # the decisions reviewers judge; allowed records are never held for review
DECISION_HEADERS = ("filter.action", "filter.rule", "filter.scope", "filter.score", "filter.model")
INVALID_REASONS = (
    "not_json",  # the value is not JSON
    "bad_verdict",  # not an object, or verdict not "abuse"/"ok", or reviewer not a string
    "bad_source",  # source is not topic/partition/offset
    "missing_header",  # a decision header is absent
    "bad_header",  # a decision header is not UTF-8, the score not a probability, an unknown action or model form
    "not_moderated",  # the decision was allow or dead_letter: there is no quarantine/drop to judge
    "unknown_scope",  # filter.scope is not a scope of the routing configuration
    "unknown_rule",  # filter.rule is not a rule of that scope
)
# A deploy rolls one model at a time; a few cover a rollout, a rollback and verdicts still arriving on
# older decisions. A new model beyond this drops the one that had no verdict for longest.
MAX_MODELS = 4
_SOURCE = re.compile(r"[A-Za-z0-9._-]{1,249}/\d+/\d+")
_MODEL = re.compile(r"\S{1,256}")
_METADATA_TIMEOUT_S = 2.0
_WAITING_LOG_INTERVAL_S = 10.0
_POLL_S = 0.1
_PROBE_INTERVAL_S = 2.0


Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reviewer's judgement of one decision (the reviewer's name is checked, not kept: it is no label)."""

    source: str
    abuse: bool
    action: str
    rule: str
    scope: str
    score: float
    model: str


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a verdict record was skipped: ``reason`` is one of ``INVALID_REASONS``, ``detail`` for people."""

    reason: str
    detail: str


def parse_verdict(headers: Sequence[tuple[str, bytes | None]], value: bytes | None) -> Verdict | Invalid:
    """A verdict record -> ``Verdict``, or ``Invalid`` saying why not. Never raises: a bad record is data."""
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return Invalid("not_json", "the value is not JSON")
    if not isinstance(body, dict):
        return Invalid("bad_verdict", f"the value is JSON {type(body).__name__}, not an object")
    verdict, reviewer, source = body.get("verdict"), body.get("reviewer"), body.get("source")
    if verdict not in VERDICTS:
        return Invalid("bad_verdict", f"verdict must be one of {list(VERDICTS)}")
    if reviewer is not None and not isinstance(reviewer, str):
        return Invalid("bad_verdict", "reviewer must be a string")
    if not isinstance(source, str) or not _SOURCE.fullmatch(source):
        return Invalid("bad_source", "source must be topic/partition/offset, as in the filter.source header")
    found: dict[str, bytes | None] = {}
    for key, raw in headers:
        if key in DECISION_HEADERS:
            found[key] = raw  # the last one counts, as in routing
    missing = [name for name in DECISION_HEADERS if found.get(name) is None]
    if missing:
        return Invalid("missing_header", f"missing decision header(s) {missing}")
    try:
        action, rule, scope, score_text, model = (found[name].decode() for name in DECISION_HEADERS)  # type: ignore[union-attr]
    except UnicodeDecodeError:
        return Invalid("bad_header", "a decision header is not UTF-8")
    try:
        score = float(score_text)
    except ValueError:
        score = float("nan")
    if not 0.0 <= score <= 1.0:
        return Invalid("bad_header", "filter.score is not a number from 0 to 1")
    if action in ("allow", "dead_letter"):
        return Invalid("not_moderated", f"the decision was {action}; only quarantine and drop are judged")
    if action not in MODERATED:
        return Invalid("bad_header", "filter.action is not an action")
    if not _MODEL.fullmatch(model):
        return Invalid("bad_header", "filter.model is empty, too long or has spaces")
    return Verdict(source, verdict == "abuse", action, rule, scope, score, model)


class RuleIndex:
    """The scopes and rules of the routing configuration: only they may become metric labels."""

    def __init__(self, routing: RoutingSettings) -> None:
        self._rules = {scope: set(rule_names(rules)) for scope, rules in scope_rules(routing).items()}

    def check(self, verdict: Verdict) -> Invalid | None:
        rules = self._rules.get(verdict.scope)
        if rules is None:
            return Invalid("unknown_scope", f"scope {verdict.scope!r} is not in FILTER_ROUTING__SCOPES")
        if verdict.rule not in rules:
            return Invalid("unknown_rule", f"rule {verdict.rule!r} is not a rule of scope {verdict.scope!r}")
        return None


class Key(NamedTuple):
    """One precision series; the field order is the metrics' label order."""

    scope: str
    rule: str
    action: str
    model: str


class PrecisionWindows:
    """The last ``size`` verdicts per key, one per source; at most ``max_models`` models at a time."""

    def __init__(self, size: int, max_models: int = MAX_MODELS) -> None:
        self._size = size
        self._max_models = max_models
        self._windows: dict[Key, OrderedDict[str, bool]] = {}
        self._models: OrderedDict[str, None] = OrderedDict()  # least recently judged first

    def add(self, key: Key, source: str, abuse: bool) -> list[Key]:
        """Record a verdict; returns the keys dropped to make room for a new model (their series go too)."""
        window = self._windows.setdefault(key, OrderedDict())
        window.pop(source, None)  # a repeat (re-read after a crash) or a revised verdict replaces the earlier one
        window[source] = abuse
        if len(window) > self._size:
            window.popitem(last=False)
        self._models[key.model] = None
        self._models.move_to_end(key.model)
        dropped: list[Key] = []
        while len(self._models) > self._max_models:
            model, _ = self._models.popitem(last=False)
            dropped += [k for k in self._windows if k.model == model]
        for k in dropped:
            del self._windows[k]
        return dropped

    def stats(self, key: Key) -> tuple[int, int]:
        """(abuse verdicts, verdicts) in the key's window."""
        window = self._windows.get(key, OrderedDict())
        return sum(window.values()), len(window)


# ---- reading verdicts for calibration ----


def read_verdicts(source: str, kafka: KafkaSettings) -> tuple[list[Verdict], Counter[str]]:
    """Every verdict in a JSON-lines export (an existing file) or a topic read from its beginning, and
    the skipped records per reason."""
    path = Path(source)
    records = _jsonl_records(path) if path.is_file() else _topic_records(source, kafka)
    verdicts: list[Verdict] = []
    skipped: Counter[str] = Counter()
    for headers, value in records:
        outcome = parse_verdict(headers, value)
        if isinstance(outcome, Invalid):
            skipped[outcome.reason] += 1
        else:
            verdicts.append(outcome)
    return verdicts, skipped


def _jsonl_records(path: Path) -> list[tuple[Headers, bytes]]:
    """``{"headers": {"filter.action": "drop", ...}, "value": {"source": ..., "verdict": ...}}`` per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"--from-feedback {path}: not UTF-8 text") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ConfigError(f"--from-feedback {path} line {n}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("headers"), dict) or "value" not in row:
            raise ConfigError(f"--from-feedback {path} line {n}: expected an object with 'headers' and 'value'")
        headers = [(str(k), None if v is None else str(v).encode()) for k, v in row["headers"].items()]
        value = row["value"]
        records.append((headers, value.encode() if isinstance(value, str) else orjson.dumps(value)))
    return records


def _topic_records(topic: str, kafka: KafkaSettings, stall_s: float = 30.0) -> list[tuple[Headers, bytes | None]]:
    """Every record of ``topic`` up to the end it had when reading began, with a throwaway group."""
    config = {
        **kafka_io.consumer_config(
            kafka.model_copy(update={"group_id": f"filter-worker-calibrate-{uuid.uuid4().hex}"})
        ),
        "auto.offset.reset": "earliest",
        "logger": librdkafka_logger(),
    }
    consumer = Consumer(config)
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=10)
        except KafkaException as exc:
            raise ConfigError(
                f"--from-feedback {topic}: no such file, and Kafka at FILTER_KAFKA__BOOTSTRAP_SERVERS="
                f"{kafka.bootstrap_servers} did not answer ({exc.args[0].str() if exc.args else exc})"
            ) from None
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise ConfigError(f"--from-feedback {topic}: no such file, and no such topic on {kafka.bootstrap_servers}")
        ends: dict[int, int] = {}
        starts = []
        for partition in described.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
        consumer.assign(starts)
        records: list[tuple[Headers, bytes | None]] = []
        last_progress = time.monotonic()
        while ends:
            for message in consumer.consume(500, 1.0):
                if message.error() is None:
                    records.append((headers_of(message), message.value()))
                    last_progress = time.monotonic()
            # Positions, not the last record's offset: a transaction marker may be the last offset.
            for tp in consumer.position([TopicPartition(topic, partition) for partition in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
            if time.monotonic() - last_progress > stall_s:
                raise ConfigError(f"--from-feedback {topic}: reading stalled for {stall_s:.0f} s before the end")
        return records
    finally:
        consumer.close()


# ---- the service ----


class FeedbackService:
    """Consumes verdicts until ``stop``; ``run`` returns an exit code. One thread owns the consumer."""

    def __init__(
        self,
        settings: Settings,
        reload_routing: Callable[[], RoutingSettings] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._topic = settings.feedback.topic
        self._rules = RuleIndex(settings.routing)
        self._windows = PrecisionWindows(settings.feedback.window)
        self._reload_routing = reload_routing
        self._reload_requested = threading.Event()
        self._stop = threading.Event()
        self._clock = clock
        self._replay_until: dict[int, int] = {}  # partition -> committed offset at assignment
        self._uncommitted = False
        self._fatal: str | None = None  # a fatal client error: stop, exit 1 (offsets stay at what was counted)
        self._last_commit = self._last_probe = clock()
        self._consumer: Consumer | None = None
        self._http: HealthServer | None = None
        self.metrics = FeedbackMetrics(INVALID_REASONS)
        self.health = Health(settings.health.liveness_window_s, clock)
        self.health.model_ready = True  # no model here: ready means joined and the broker reachable

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self._stop.set()

    def request_reload(self) -> None:
        """Re-read the routing settings (SIGHUP), so verdicts on new rules are accepted."""
        self._reload_requested.set()

    def run(self) -> int:
        settings = self._settings
        group = settings.feedback.group(settings.kafka)
        log.info(
            "feedback starting",
            topic=self._topic,
            group=group,
            window=settings.feedback.window,
            replay=settings.feedback.replay,
            kafka=settings.kafka.redacted_properties(),
        )
        if settings.metrics.enabled:
            port = settings.feedback.metrics_port
            try:
                self._http = HealthServer(port, self.health, self.metrics.registry).start()
            except OSError as exc:
                raise ConfigError(f"FILTER_FEEDBACK__METRICS_PORT={port}: {exc.strerror}") from None
        config = {
            **kafka_io.consumer_config(settings.kafka.model_copy(update={"group_id": group})),
            # Eager assignment: the start offsets are rewritten on assignment (the replay), which an
            # incremental assignment would not take.
            "partition.assignment.strategy": "range",
            "error_cb": self._client_error,
            "logger": librdkafka_logger(),
        }
        self._consumer = Consumer(config)
        try:
            if not self._await_topic():
                return ExitCode.OK if self._stop.is_set() else ExitCode.TOPICS
            self._consumer.subscribe(
                [self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            while not self._stop.is_set():
                self._step()
            if self._fatal is not None:
                log.error("feedback failed on a fatal Kafka error", error=self._fatal)
                return ExitCode.FAILED
            self._commit()
            return ExitCode.OK
        finally:
            self._consumer.close()
            if self._http is not None:
                self._http.stop()

    def _await_topic(self) -> bool:
        """Wait for Kafka (logging every 10 s, live but not ready); ``False`` if the topic is missing or stopped."""
        assert self._consumer is not None
        started = last_log = self._clock()
        last_log -= _WAITING_LOG_INTERVAL_S
        while not self._stop.is_set():
            self.health.progress()
            try:
                metadata = self._consumer.list_topics(timeout=_METADATA_TIMEOUT_S)
            except KafkaException as exc:
                if self._clock() - last_log >= _WAITING_LOG_INTERVAL_S:
                    last_log = self._clock()
                    log.warning("waiting for Kafka", waited_s=round(self._clock() - started, 1), error=str(exc))
                continue
            self.health.broker_reachable = True
            described = metadata.topics.get(self._topic)
            if described is None or described.error is not None:
                log.error(
                    "the verdict topic does not exist; create it or fix FILTER_FEEDBACK__TOPIC",
                    topic=self._topic,
                    bootstrap_servers=self._settings.kafka.bootstrap_servers,
                )
                return False
            return True
        return False

    def _step(self) -> None:
        assert self._consumer is not None
        self.health.progress()
        self._maybe_reload()
        if not self.health.broker_reachable and self._clock() - self._last_probe >= _PROBE_INTERVAL_S:
            self._probe()
        message = self._consumer.poll(_POLL_S)
        if message is not None:
            error = message.error()
            if error is None:
                self.health.broker_reachable = True
                self._handle(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", error=error.str())
        if self._clock() - self._last_commit >= self._settings.kafka.commit_interval_ms / 1000:
            self._commit()

    def _probe(self) -> None:
        """While the broker is unreachable, a metadata request now and then says when it is back (readiness)."""
        assert self._consumer is not None
        self._last_probe = self._clock()
        try:
            self._consumer.list_topics(self._topic, timeout=_METADATA_TIMEOUT_S)
        except KafkaException:
            return
        self.health.broker_reachable = True
        log.info("Kafka reachable again")

    def _handle(self, message: Message) -> None:
        """Count one verdict (or the reason it is skipped), then let its offset be committed."""
        record = to_input_record(message)
        replayed = record.offset < self._replay_until.get(record.partition, -1)
        outcome = parse_verdict(record.headers, record.value)
        if isinstance(outcome, Verdict):
            outcome = self._rules.check(outcome) or outcome
        if isinstance(outcome, Invalid):
            if not replayed:
                self.metrics.invalid.labels(outcome.reason).inc()
                log.warning(
                    "verdict skipped",
                    reason=outcome.reason,
                    detail=outcome.detail,
                    topic=message.topic(),
                    partition=message.partition(),
                    offset=message.offset(),
                )
        else:
            self._count(outcome, replayed)
        if not replayed:
            assert self._consumer is not None
            try:
                self._consumer.store_offsets(message)
                self._uncommitted = True
            except KafkaException as exc:  # its partition was just revoked: the new owner reads it again
                log.warning("offset not stored", partition=message.partition(), offset=message.offset(), error=str(exc))

    def _count(self, verdict: Verdict, replayed: bool) -> None:
        key = Key(verdict.scope, verdict.rule, verdict.action, verdict.model)
        for dropped in self._windows.add(key, verdict.source, verdict.abuse):
            self._forget(dropped)
        abuse, total = self._windows.stats(key)
        self.metrics.precision.labels(*key).set(abuse / total)
        self.metrics.window.labels(*key).set(total)
        if not replayed:  # counted before the restart already
            self.metrics.verdicts.labels(*key, "abuse" if verdict.abuse else "ok").inc()

    def _forget(self, key: Key) -> None:
        log.info("dropping the precision of an older model", scope=key.scope, rule=key.rule, model=key.model)
        m = self.metrics
        for metric, labels in [(m.precision, key), (m.window, key), *((m.verdicts, (*key, v)) for v in VERDICTS)]:
            with contextlib.suppress(KeyError):  # a series that was never set
                metric.remove(*labels)

    def _commit(self) -> None:
        self._last_commit = self._clock()
        if not self._uncommitted or self._consumer is None:
            return
        try:
            self._consumer.commit(asynchronous=False)
            self._uncommitted = False
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError._NO_OFFSET:
                self._uncommitted = False
            else:  # stored offsets stay stored: the next commit carries them
                log.warning("commit failed; retried at the next interval", error=str(exc))

    def _maybe_reload(self) -> None:
        if not self._reload_requested.is_set() or self._reload_routing is None:
            return
        self._reload_requested.clear()
        try:
            self._rules = RuleIndex(self._reload_routing())
        except ConfigError as exc:
            self.metrics.rule_reloads.labels("refused").inc()
            log.error("routing reload refused; the previous rules stay in force", error=str(exc))
            return
        self.metrics.rule_reloads.labels("applied").inc()
        log.info("routing reloaded")

    # -- rebalance callbacks (on the loop's thread, inside poll) --

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition up to ``replay`` records before its committed offset, to refill the windows."""
        replay = self._settings.feedback.replay
        if replay:
            committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
            for tp in partitions:
                offset = committed.get(tp.partition, OFFSET_INVALID)
                if offset < 0:
                    continue  # a new group: it reads from the start (auto.offset.reset) and counts everything
                low, _ = consumer.get_watermark_offsets(tp, timeout=10)
                tp.offset = max(low, offset - replay)
                self._replay_until[tp.partition] = offset
        consumer.assign(partitions)
        self.health.joined = True
        log.info(
            "partitions assigned",
            partitions=[tp.partition for tp in partitions],
            replaying_from={tp.partition: tp.offset for tp in partitions if tp.partition in self._replay_until},
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit()
        self._forget_partitions(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget_partitions(partitions)

    def _forget_partitions(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._replay_until.pop(tp.partition, None)
        self.health.joined = False

    def _client_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = self._fatal or error.str()
            self._stop.set()
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            if self.health.broker_reachable:
                log.error("Kafka unreachable; retrying, nothing is committed meanwhile", error=error.str())
            self.health.broker_reachable = False
        else:
            log.warning("kafka client error", code=error.name(), error=error.str())
