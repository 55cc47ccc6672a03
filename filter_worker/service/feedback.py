"""``filter-worker feedback``: reviewers' verdicts become live precision, recall and prevalence.

The verdict format is ``moderation/verdicts.py``'s. Per (scope, rule, action, model) the service keeps the last
``FILTER_FEEDBACK__WINDOW`` verdicts on quarantine and drop decisions, keyed by source (a repeated or
revised verdict replaces the earlier one), and exports their share of "abuse" as the rule's precision,
with its Clopper–Pearson interval: the alerts page on the interval, not on the point estimate. Verdicts
on randomly drawn records (``FILTER_REVIEW__*``) go, per (scope, model), into a second window that
gives prevalence and each rule's recall by inverse-probability weighting (``moderation/windows.py``).

Series mean what they say or go: only configured scopes, named rules and configured models become
labels; a rule removed or renamed by a reload loses its series; a raised ``min_score`` keeps only the
verdicts the rule would still take (a lowered one empties the window); a model without verdicts for
``FILTER_FEEDBACK__MODEL_IDLE_S`` is forgotten.

Restarts: the windows live in memory. Offsets are committed only after a verdict is counted
(at-least-once), and at start-up each partition is read again from up to ``FILTER_FEEDBACK__REPLAY``
records before the committed offset. Those records refill the windows without being counted again,
so a restart neither empties the precision nor double counts. One replica should run, since a
window split across replicas would give each a partial view.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Gauge
from prometheus_client.metrics import MetricWrapperBase

from filter_worker.config import DEFAULT_SCOPE, ConfigError, RoutingSettings, Settings
from filter_worker.exit_codes import ExitCode, FatalError
from filter_worker.kafka import clients
from filter_worker.kafka.clients import to_input_record
from filter_worker.logs import get_logger, librdkafka_logger
from filter_worker.moderation.sequential import design
from filter_worker.moderation.verdicts import INVALID_REASONS, MODERATED, VERDICTS, Invalid, Verdict, parse_verdict
from filter_worker.moderation.windows import (
    MAX_MODELS,
    Estimate,
    Key,
    ModelRoster,
    PrecisionWindows,
    RuleOrder,
    SampleWindows,
)
from filter_worker.monitoring.health import Health
from filter_worker.monitoring.metrics import FeedbackMetrics
from filter_worker.pipeline.records import InputRecord
from filter_worker.pipeline.routing import DEFAULT_RULE, scope_rules
from filter_worker.service.shell import ServiceShell

log = get_logger("filter_worker.service.feedback")

_POLL_S = 0.1


class RuleIndex:
    """The scopes and rules of the routing configuration: only they may become metric labels.

    Every rule must be named. An unnamed rule is called ``rules[N]`` by its place, so reordering the
    rules would hand one rule's verdicts (and its precision) to another.
    """

    def __init__(self, routing: RoutingSettings) -> None:
        self._rules: dict[str, list[RuleOrder]] = {}
        for scope, rules in scope_rules(routing).items():
            for position, rule in enumerate(rules):
                if rule.name is None:
                    where = "FILTER_ROUTING__RULES" if scope == DEFAULT_SCOPE else f"FILTER_ROUTING__SCOPES ({scope})"
                    raise ConfigError(
                        f"{where}: rule rules[{position}] has no name; filter-worker feedback keys each rule's "
                        "verdicts by name, and a name taken from the rule's place would mix two rules' verdicts "
                        "when the rules are reordered"
                    )
            self._rules[scope] = [RuleOrder(rule.name or "", rule.action, rule.min_score) for rule in rules]

    def rules(self, scope: str) -> list[RuleOrder] | None:
        """The scope's rules in routing order, or None for a scope that is not configured."""
        return self._rules.get(scope)

    def min_score(self, scope: str, rule: str) -> float | None:
        """The rule's threshold in force, or None when the scope has no such rule."""
        for candidate in self._rules.get(scope, ()):
            if candidate.name == rule:
                return candidate.min_score
        return None

    def check(self, verdict: Verdict) -> Invalid | None:
        rules = self._rules.get(verdict.scope)
        if rules is None:
            return Invalid("unknown_scope", f"scope {verdict.scope!r} is not in FILTER_ROUTING__SCOPES")
        allowed = verdict.action == "allow" and verdict.rule == DEFAULT_RULE  # a drawn record no rule took
        if not allowed and self.min_score(verdict.scope, verdict.rule) is None:
            return Invalid("unknown_rule", f"rule {verdict.rule!r} is not a rule of scope {verdict.scope!r}")
        return None

    def below_threshold(self, verdict: Verdict) -> Invalid | None:
        """A decision the rule in force would not take: made under an older, lower ``min_score``."""
        threshold = self.min_score(verdict.scope, verdict.rule)
        if threshold is not None and verdict.score < threshold:
            return Invalid(
                "below_threshold",
                f"score {verdict.score} is below rule {verdict.rule!r}'s min_score {threshold} in force",
            )
        return None


# ---- the service ----


class FeedbackService:
    """Consumes verdicts until ``stop``; ``run`` returns an exit code. One thread owns the consumer."""

    def __init__(
        self,
        settings: Settings,
        reload_routing: Callable[[], RoutingSettings] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._topic = settings.feedback.topic
        feedback = settings.feedback
        self._rules = RuleIndex(settings.routing)
        self._windows = PrecisionWindows(feedback.window)
        self._cusums = {
            "drop": design(feedback.drop_floor, feedback.false_page_verdicts),
            "quarantine": design(feedback.quarantine_floor, feedback.false_page_verdicts),
        }
        self._evidence: dict[Key, float] = {}  # each key's CUSUM: evidence of a precision below its floor
        self._samples = SampleWindows(feedback.sample_window)
        self._roster = ModelRoster(feedback.models or [settings.model.name], MAX_MODELS, feedback.model_idle_s)
        self._newest: dict[tuple[str, str, str], float] = {}  # (scope, rule, action) -> newest verdict's time
        self._recall_rules: dict[tuple[str, str], set[str]] = {}  # (scope, model) -> rules with a recall series
        self._wall = wall_clock  # verdict times are record timestamps: wall-clock seconds
        self._reload_routing = reload_routing
        self._clock = clock
        self._replay_until: dict[int, int] = {}  # partition -> committed offset at assignment
        self._uncommitted = False
        self._last_commit = clock()
        self._consumer: Consumer | None = None
        self.metrics = FeedbackMetrics(INVALID_REASONS)
        self.health = Health(settings.health.liveness_window_s, clock)
        self.health.model_ready = True  # no model here: ready means joined and the broker reachable
        port = feedback.metrics_port if settings.metrics.enabled else None
        self.shell = ServiceShell(
            self.health,
            self.metrics.registry,
            settings.kafka,
            port,
            "FILTER_FEEDBACK__METRICS_PORT",
            clock,
        )

    @property
    def http_port(self) -> int | None:
        return self.shell.http_port

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self.shell.stop()

    def request_reload(self) -> None:
        """Re-read the routing settings (SIGHUP), so verdicts on new rules are accepted."""
        self.shell.request_reload()

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
        self.shell.start_http()
        config = {
            **clients.consumer_config(settings.kafka.model_copy(update={"group_id": group})),
            # Eager assignment: the start offsets are rewritten on assignment (the replay), which an
            # incremental assignment would not take.
            "partition.assignment.strategy": "range",
            "error_cb": self.shell.client_error,
            "logger": librdkafka_logger(),
        }
        self._consumer = Consumer(config)
        try:
            metadata = self.shell.await_kafka(self._consumer)
            if metadata is None:
                return ExitCode.OK
            described = metadata.topics.get(self._topic)
            if described is None or described.error is not None:
                log.error(
                    "the verdict topic does not exist; create it or fix FILTER_FEEDBACK__TOPIC",
                    topic=self._topic,
                    bootstrap_servers=self._settings.kafka.bootstrap_servers,
                )
                return ExitCode.TOPICS
            self._consumer.subscribe(
                [self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            while not self.shell.stopping:
                self.shell.failures.raise_if_set()
                self._step()
            self._commit()
            return ExitCode.OK
        except FatalError as exc:
            log.error("feedback failed; offsets stay at the last counted verdict", error=str(exc))
            return exc.code
        finally:
            self._consumer.close()
            self.shell.stop_http()

    def _step(self) -> None:
        assert self._consumer is not None
        self.health.progress()
        self._maybe_reload()
        self.shell.probe(self._consumer)
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
        self.expire()

    def _handle(self, message: Message) -> None:
        """Count one verdict (or the reason it is skipped), then let its offset be committed."""
        record = to_input_record(message)
        replayed = record.offset < self._replay_until.get(record.partition, -1)
        self.judge(record, replayed)
        if not replayed:
            assert self._consumer is not None
            try:
                self._consumer.store_offsets(message)
                self._uncommitted = True
            except KafkaException as exc:  # its partition was just revoked: the new owner reads it again
                log.warning("offset not stored", partition=message.partition(), offset=message.offset(), error=str(exc))

    def judge(self, record: InputRecord, replayed: bool = False) -> None:
        """Count a verdict record into the windows and series, or count and log why it is skipped.

        ``replayed``: read again at start-up to refill the windows; counted before the restart already,
        so no counter moves and nothing is logged twice.
        """
        outcome: Verdict | Invalid | None = parse_verdict(record.headers, record.value)
        at = record.timestamp_ms / 1000 if record.timestamp_ms is not None else self._wall()
        if isinstance(outcome, Verdict):
            outcome = self._rules.check(outcome) or self._roster.admit(outcome.model, at, self._wall()) or outcome
        if isinstance(outcome, Verdict):
            outcome = self._count(outcome, replayed, at)
        if isinstance(outcome, Invalid) and not replayed:
            self.metrics.invalid.labels(outcome.reason).inc()
            log.warning(
                "verdict skipped",
                reason=outcome.reason,
                detail=outcome.detail,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )

    def _count(self, verdict: Verdict, replayed: bool, at: float) -> Invalid | None:
        """A drawn record's verdict into its sample window; a verdict on a rule's decision into its precision."""
        if verdict.sample is not None:
            rules = self._rules.rules(verdict.scope) or []
            self._samples.add(verdict.scope, verdict.model, verdict.source, verdict.abuse, verdict.sample, rules)
            self._publish_sample(verdict.scope, verdict.model)
            if not replayed:
                self.metrics.sampled.labels(verdict.scope, verdict.model, _verdict_label(verdict)).inc()
        if verdict.action not in MODERATED:
            return None
        stale = self._rules.below_threshold(verdict)
        if stale is not None:
            return stale if verdict.sample is None else None  # a drawn record still counted in its sample
        key = Key(verdict.scope, verdict.rule, verdict.action, verdict.model)
        if self._windows.add(key, verdict.source, verdict.abuse, verdict.score):
            self._evidence[key] = self._cusums[verdict.action].step(self._evidence.get(key, 0.0), verdict.abuse)
        self._publish_precision(key)
        stamp = (verdict.scope, verdict.rule, verdict.action)
        if at > self._newest.get(stamp, float("-inf")):
            self._newest[stamp] = at
            self.metrics.last_verdict.labels(*stamp).set(at)
        if not replayed:  # counted before the restart already
            self.metrics.verdicts.labels(*key, _verdict_label(verdict)).inc()
        return None

    def _publish_precision(self, key: Key) -> None:
        estimate = self._windows.precision(key)
        if estimate is None:
            self._forget(key)
            return
        m = self.metrics
        _set(m.precision, m.precision_lower, m.precision_upper, key, estimate)
        m.window.labels(*key).set(estimate.size)
        m.evidence.labels(*key).set(self._evidence.get(key, 0.0) / self._cusums[key.action].limit)

    def _publish_sample(self, scope: str, model: str) -> None:
        """Prevalence and recall of a (scope, model) from its drawn verdicts, under the rules in force."""
        m = self.metrics
        estimates = self._samples.estimates(scope, model, self._rules.rules(scope) or [])
        m.sample_window.labels(scope, model).set(estimates.drawn)
        _set_or_remove(m.prevalence, m.prevalence_lower, m.prevalence_upper, (scope, model), estimates.prevalence)
        _set_or_remove(
            m.scope_recall, m.scope_recall_lower, m.scope_recall_upper, (scope, model), estimates.scope_recall
        )
        published = self._recall_rules.setdefault((scope, model), set())
        for rule in published | set(estimates.recall):
            _set_or_remove(m.recall, m.recall_lower, m.recall_upper, (scope, rule, model), estimates.recall.get(rule))
        published.clear()
        published.update(estimates.recall)

    def _forget(self, key: Key) -> None:
        m = self.metrics
        self._evidence.pop(key, None)
        series = [(m.precision, key), (m.precision_lower, key), (m.precision_upper, key), (m.window, key)]
        series.append((m.evidence, key))
        for metric, labels in [*series, *((m.verdicts, (*key, v)) for v in VERDICTS)]:
            _remove(metric, labels)

    def _forget_sample(self, scope: str, model: str) -> None:
        m = self.metrics
        _remove(m.sample_window, (scope, model))
        _set_or_remove(m.prevalence, m.prevalence_lower, m.prevalence_upper, (scope, model), None)
        _set_or_remove(m.scope_recall, m.scope_recall_lower, m.scope_recall_upper, (scope, model), None)
        for rule in self._recall_rules.pop((scope, model), set()):
            _set_or_remove(m.recall, m.recall_lower, m.recall_upper, (scope, rule, model), None)
        for verdict in VERDICTS:
            _remove(m.sampled, (scope, model, verdict))

    def expire(self) -> None:
        """Forget the models that had no verdict for ``FILTER_FEEDBACK__MODEL_IDLE_S``, series and all."""
        idle = self._roster.idle(self._wall())
        if not idle:
            return
        gone = set(idle)
        for key in self._windows.drop(lambda key: key.model in gone):
            self._forget(key)
        for scope, model in self._samples.drop_models(gone):
            self._forget_sample(scope, model)
        log.info("forgetting models without recent verdicts", models=idle)

    def _apply_rules(self, rules: RuleIndex) -> None:
        """Routing reloaded: series of rules that are gone go; windows keep only what the rules in force take."""
        old, self._rules = self._rules, rules
        for scope, rule in {(key.scope, key.rule) for key in self._windows.tracked()}:
            before, now = old.min_score(scope, rule), rules.min_score(scope, rule)
            if now is None or (before is not None and now < before):  # gone, or lowered: nothing covers the new range
                dropped = self._windows.drop(_of_rule(scope, rule))
            elif before is not None and now > before:
                dropped = self._windows.keep_from(scope, rule, now)
                for key in self._windows.tracked():  # another rule now: its evidence starts afresh
                    if (key.scope, key.rule) == (scope, rule):
                        self._evidence.pop(key, None)
            else:
                continue
            for key in dropped:
                self._forget(key)
            for key in self._windows.tracked():
                if (key.scope, key.rule) == (scope, rule):
                    self._publish_precision(key)
        for stamp in [stamp for stamp in self._newest if rules.min_score(stamp[0], stamp[1]) is None]:
            del self._newest[stamp]
            _remove(self.metrics.last_verdict, stamp)
        for scope, model in self._samples.redecide(rules.rules):
            self._forget_sample(scope, model)
        for scope, model in self._samples.scopes_and_models():
            self._publish_sample(scope, model)

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
        if not self.shell.reload_requested() or self._reload_routing is None:
            return
        try:
            rules = RuleIndex(self._reload_routing())
        except ConfigError as exc:
            self.metrics.rule_reloads.labels("refused").inc()
            log.error("routing reload refused; the previous rules stay in force", error=str(exc))
            return
        self._apply_rules(rules)
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


def _of_rule(scope: str, rule: str) -> Callable[[Key], bool]:
    return lambda key: (key.scope, key.rule) == (scope, rule)


def _verdict_label(verdict: Verdict) -> str:
    return "abuse" if verdict.abuse else "ok"


def _remove(metric: MetricWrapperBase, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):  # a series that was never set
        metric.remove(*labels)


def _set(value: Gauge, lower: Gauge, upper: Gauge, labels: tuple[str, ...], estimate: Estimate) -> None:
    value.labels(*labels).set(estimate.value)
    lower.labels(*labels).set(estimate.low)
    upper.labels(*labels).set(estimate.high)


def _set_or_remove(
    value: Gauge, lower: Gauge, upper: Gauge, labels: tuple[str, ...], estimate: Estimate | None
) -> None:
    """An estimate's three series, or none of them when there is nothing to estimate from."""
    if estimate is None:
        for metric in (value, lower, upper):
            _remove(metric, labels)
    else:
        _set(value, lower, upper, labels, estimate)
