"""Prometheus metrics, on a registry per worker (so tests and the demo can run several in one process)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from filter_worker.config import Rule
from filter_worker.pipeline.decode import ERROR_CLASSES
from filter_worker.pipeline.routing import SCORE_EDGES

# Dead-letter classes: the decoder's, plus the two the worker assigns after decoding.
DEAD_LETTER_ERRORS: tuple[str, ...] = (*ERROR_CLASSES, "model_error", "publish_rejected")
ACTIONS: tuple[str, ...] = typing.get_args(Rule.model_fields["action"].annotation)  # a rule's actions
REBALANCE_KINDS: tuple[str, ...] = ("assign", "revoke", "lost")
RELOAD_RESULTS: tuple[str, ...] = ("applied", "refused")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# The drift index's bins (finer near 0 and 1, where softmax outputs pile up), as upper bounds.
_SCORE_BUCKETS = SCORE_EDGES[1:]


class Metrics:
    """Every metric the worker exports; ``initialise`` and ``track_readiness`` are called once at start-up."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("filter_records_consumed", "Records consumed", ["topic"], registry=r)
        self.published = Counter(
            "filter_records_published", "Records whose output the broker acknowledged", ["action", "topic"], registry=r
        )
        self.dead_letters = Counter(
            "filter_dead_letters", "Records dead-lettered, by error class", ["error"], registry=r
        )
        self.batch_size = Histogram("filter_batch_size", "Records per forward pass", buckets=_SIZE_BUCKETS, registry=r)
        self.padded_tokens = Histogram(
            "filter_batch_padded_tokens", "Padded tokens per forward pass", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.fill_ratio = Histogram(
            "filter_batch_fill_ratio",
            "Real tokens / padded tokens per forward pass",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.forward_tokens = Counter(
            "filter_forward_tokens",
            "Tokens through the forward pass: real, or padded (real plus padding)",
            ["kind"],
            registry=r,
        )
        self.forward_seconds = Histogram(
            "filter_forward_seconds", "Forward pass time", buckets=_FORWARD_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "filter_end_to_end_latency_seconds",
            "Record timestamp to publish acknowledgement",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.review_records = Counter(
            "filter_review_records",
            "Copies of decided records drawn for review (FILTER_REVIEW__*): published, or refused by the review topic",
            ["result"],
            registry=r,
        )
        self.commits = Counter("filter_commits", "Successful offset commits", registry=r)
        self.commit_failures = Counter("filter_commit_failures", "Failed offset commits", registry=r)
        self.lag = Gauge("filter_consumer_lag", "Records behind the high watermark", ["topic", "partition"], registry=r)
        self.rebalances = Counter("filter_rebalances", "Rebalance events", ["kind"], registry=r)
        self.in_flight = Gauge(
            "filter_in_flight_records",
            "Records consumed whose output is not acknowledged yet (the in-flight budget)",
            registry=r,
        )
        self.in_flight_bytes = Gauge(
            "filter_in_flight_bytes",
            "Input bytes of the records consumed whose output is not acknowledged yet",
            registry=r,
        )
        self.fetch_paused = Gauge(
            "filter_fetch_paused",
            "1 while fetching is paused: in-flight budget spent, or a transaction backoff",
            registry=r,
        )
        self.oversized = Counter(
            "filter_oversized_dead_letters",
            "Dead letters too large for the dead-letter topic, published with their value cut or omitted",
            ["value"],
            registry=r,
        )
        self.transaction_aborts = Counter(
            "filter_transaction_aborts",
            "Exactly-once: transactions aborted and re-read from the last commit",
            registry=r,
        )
        self.cache_records = Counter(
            "filter_cache_records",
            "Records with the decision cache on: hit (answered from the cache) or miss (classified by the model)",
            ["result"],
            registry=r,
        )
        self.shadow_decisions = Counter(
            "filter_shadow_decisions",
            "Shadow mode: the action each record would have had (it went to the allow topic)",
            ["action"],
            registry=r,
        )
        self.rule_reloads = Counter(
            "filter_routing_reloads", "Routing reloads on SIGHUP, by result", ["result"], registry=r
        )
        # FILTER_CANDIDATE__*: a second model in shadow (pipeline/candidate.py).
        self.candidate_records = Counter(
            "filter_candidate_records", "Records the candidate model decided in shadow beside the live one", registry=r
        )
        self.candidate_decisions = Counter(
            "filter_candidate_decisions", "The action the candidate model would have taken", ["action"], registry=r
        )
        self.candidate_disagreements = Counter(
            "filter_candidate_disagreements",
            "Records the candidate would have routed otherwise, by pair: live action->candidate action",
            ["pair"],
            registry=r,
        )
        self.candidate_review_copies = Counter(
            "filter_candidate_review_copies",
            "Disagreements drawn for review (FILTER_CANDIDATE__SAMPLE_RATE), with both decisions in headers",
            registry=r,
        )
        self.candidate_failures = Counter(
            "filter_candidate_failures",
            "Records the candidate model failed on (the live decisions stood; see the log)",
            registry=r,
        )
        self.candidate_seconds = Counter(
            "filter_candidate_forward_seconds",
            "Seconds spent in the candidate's forward passes (its cost; compare filter_forward_seconds_sum)",
            registry=r,
        )
        # dtype and backend: the running precision and engine; precision_source: how they were chosen
        # (setting: FILTER_MODEL__DTYPE; auto: measured at start-up; fallback: float32 after a reload
        # made the chosen precision disagree).
        self.model = Info("filter_model", "The loaded model, its precision and engine", registry=r)
        self.latency_listeners: list[Callable[[Sequence[float]], None]] = []
        # Moderation, per scope (labels from FILTER_ROUTING__SCOPES and rule names: configuration only).
        self.decisions = Counter(
            "filter_decisions",
            "Routing decisions per scope, action and rule (in shadow mode: the would-be ones)",
            ["scope", "action", "rule"],
            registry=r,
        )
        self.rule_score = Histogram(
            "filter_rule_score",
            "Every rule's score on every record of its scope, matched or not",
            ["scope", "rule"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.top_label_probability = Histogram(
            "filter_top_label_probability",
            "The top label's probability per record",
            ["scope"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.score_psi = Gauge(
            "filter_score_psi",
            "Population stability index of a rule's score over the scope's last FILTER_DRIFT__WINDOW records "
            "against FILTER_DRIFT__REFERENCE",
            ["scope", "rule"],
            registry=r,
        )
        self.score_psi_day = Gauge(
            "filter_score_psi_day",
            "Population stability index of a rule's score over the scope's records of the last day (per minute) "
            "against FILTER_DRIFT__REFERENCE: what FilterScoreDrift reads",
            ["scope", "rule"],
            registry=r,
        )
        self.take_rate = Gauge(
            "filter_take_rate",
            "Share of the scope's last FILTER_DRIFT__WINDOW records whose rule score is at or above the rule's "
            "min_score",
            ["scope", "rule"],
            registry=r,
        )
        # The share's parts, so a dashboard can pool the workers: sum over sum, where the highest of 20
        # workers' shares read 11.8 % for a true 10 %.
        self.take_rate_taken = Gauge(
            "filter_take_rate_taken_records",
            "Records of the scope's last FILTER_DRIFT__WINDOW whose rule score is at or above the rule's min_score",
            ["scope", "rule"],
            registry=r,
        )
        self.take_rate_records = Gauge(
            "filter_take_rate_window_records",
            "Records the take rate is taken over (FILTER_DRIFT__WINDOW once full)",
            ["scope", "rule"],
            registry=r,
        )
        # The last day's take rate, counted per minute, with a z whose variance bursts cannot fool: what
        # FilterTakeRateShift reads (moderation/take_rate.py).
        self.take_rate_day = Gauge(
            "filter_take_rate_day",
            "Share of the scope's records of the last day (per minute, at the min_score in force) at or above it",
            ["scope", "rule"],
            registry=r,
        )
        self.take_rate_day_zscore = Gauge(
            "filter_take_rate_day_zscore",
            "z of filter_take_rate_day against filter_take_rate_reference, with a per-minute (Newey-West) variance",
            ["scope", "rule"],
            registry=r,
        )
        self.take_rate_reference = Gauge(
            "filter_take_rate_reference",
            "The same share on the FILTER_DRIFT__REFERENCE sample, at the min_score in force",
            ["scope", "rule"],
            registry=r,
        )
        self.take_rate_zscore = Gauge(
            "filter_take_rate_zscore",
            "Two-proportion z statistic of filter_take_rate against filter_take_rate_reference",
            ["scope", "rule"],
            registry=r,
        )

        self.ready = Gauge(
            "filter_ready", "1 while /readyz answers 200 (model warm, group joined, broker up)", registry=r
        )
        # process_start_time_seconds (restarts), CPU and memory, on this registry like everything else.
        ProcessCollector(registry=r)

    def record_latencies(self, seconds: Sequence[float]) -> None:
        """End-to-end latencies of a batch of acknowledged records: the histogram, then any listener.

        ``latency_listeners`` lets a tool watch every acknowledgement without reading the registry
        (``bench`` counts them and notes the last one's time).
        """
        observe_many(self.latency, seconds)
        for listener in self.latency_listeners:
            listener(seconds)

    def initialise(self, topics: dict[str, str], inputs: Iterable[str], cache: bool) -> None:
        """Create every labelled series at 0, so ``rate()`` and ``increase()`` see its first event.

        A labelled counter otherwise appears only on first use, at 1: Prometheus then has no earlier
        sample to compare with, so the first dead letter of a class, the first lost partition, the
        first refused reload never show in a rate or fire an alert. ``topics`` is the action -> output
        topic map (``TopicSettings.outputs()``); ``inputs`` are the input topics (regex subscriptions,
        "^...", name no topic and are skipped); ``cache`` is whether the decision cache is on.
        """
        named = [topic for topic in inputs if not topic.startswith("^")]
        for topic in named:
            self.consumed.labels(topic)
            for action in topics:
                self.published.labels(action, topic)
        for error in DEAD_LETTER_ERRORS:
            self.dead_letters.labels(error)
        for kind in REBALANCE_KINDS:
            self.rebalances.labels(kind)
        for result in RELOAD_RESULTS:
            self.rule_reloads.labels(result)
        for action in ACTIONS:  # shadow mode can be switched on by a reload, so always
            self.shadow_decisions.labels(action)
        for kind in ("real", "padded"):
            self.forward_tokens.labels(kind)
        for form in ("cut", "omitted"):
            self.oversized.labels(form)
        if cache:
            for result in ("hit", "miss"):
                self.cache_records.labels(result)

    def initialise_candidate(self, pairs: Iterable[str]) -> None:
        """The candidate's series at 0 (only with a candidate: without one they would say it agrees)."""
        for action in ACTIONS:
            self.candidate_decisions.labels(action)
        for pair in pairs:
            self.candidate_disagreements.labels(pair)

    def track_readiness(self, ready: Callable[[], bool]) -> None:
        """``filter_ready`` reads ``ready`` (``Health.ready``) at every scrape: no call site per state change."""
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)


class FeedbackMetrics:
    """``filter-worker feedback``: reviewers' verdicts and the precision they give each rule."""

    def __init__(self, invalid_reasons: tuple[str, ...]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        key = ["scope", "rule", "action", "model"]
        self.verdicts = Counter(
            "filter_feedback_verdicts", "Verdicts counted, per decision and verdict", [*key, "verdict"], registry=r
        )
        self.invalid = Counter("filter_feedback_invalid", "Verdict records skipped, by reason", ["reason"], registry=r)
        for reason in invalid_reasons:  # every reason exists from the start, so rate() sees the first one
            self.invalid.labels(reason)
        self.precision, self.precision_lower, self.precision_upper = _estimate(
            "filter_feedback_precision",
            "Share of 'abuse' among the last FILTER_FEEDBACK__WINDOW verdicts on a rule's decisions",
            "Clopper-Pearson",
            key,
            r,
        )
        self.evidence = Gauge(
            "filter_feedback_precision_evidence",
            "A rule's precision CUSUM against its floor (FILTER_FEEDBACK__DROP_FLOOR, _QUARANTINE_FLOOR) as a share "
            "of the sum that pages: 1 or more means the precision is below the floor",
            key,
            registry=r,
        )
        self.window = Gauge(
            "filter_feedback_window_verdicts",
            "Verdicts the precision is taken over (up to the window)",
            key,
            registry=r,
        )
        self.last_verdict = Gauge(
            "filter_feedback_last_verdict_timestamp_seconds",
            "Publication time of the newest verdict on a rule's decisions (time() minus it: how long reviews stopped)",
            ["scope", "rule", "action"],
            registry=r,
        )
        # Random review sampling (FILTER_REVIEW__*): verdicts weighted by 1 / their probability of being drawn.
        sampled = ["scope", "model"]
        self.sampled = Counter(
            "filter_feedback_sampled_verdicts",
            "Verdicts on records drawn at random for review, counted",
            [*sampled, "verdict"],
            registry=r,
        )
        self.sample_window = Gauge(
            "filter_feedback_sample_window_verdicts",
            "Drawn verdicts that prevalence and recall are estimated from (up to FILTER_FEEDBACK__SAMPLE_WINDOW)",
            sampled,
            registry=r,
        )
        self.prevalence, self.prevalence_lower, self.prevalence_upper = _estimate(
            "filter_feedback_prevalence",
            "Estimated share of abuse among a scope's decided records (inverse-probability weighted sample)",
            "Wilson on the effective sample size",
            sampled,
            r,
        )
        self.recall, self.recall_lower, self.recall_upper = _estimate(
            "filter_feedback_recall",
            "Estimated share of a scope's abuse that the rule takes, under the rules in force",
            "Wilson on the effective sample size",
            ["scope", "rule", "model"],
            r,
        )
        self.scope_recall, self.scope_recall_lower, self.scope_recall_upper = _estimate(
            "filter_feedback_scope_recall",
            "Estimated share of a scope's abuse that some rule takes (quarantine or drop), under the rules in force",
            "Wilson on the effective sample size",
            sampled,
            r,
        )
        self.rule_reloads = Counter(
            "filter_routing_reloads", "Routing reloads on SIGHUP, by result", ["result"], registry=r
        )
        for result in RELOAD_RESULTS:  # at 0 from the start, as the worker's: increase() sees the first
            self.rule_reloads.labels(result)


def _estimate(
    name: str, documentation: str, interval: str, labels: list[str], registry: CollectorRegistry
) -> tuple[Gauge, Gauge, Gauge]:
    """A share and the two ends of its 95 % interval, as three gauges: an alert compares an end with
    a floor, so each end is a series of its own."""
    return (
        Gauge(name, documentation, labels, registry=registry),
        Gauge(f"{name}_lower", f"Lower end of the 95 % interval ({interval}) of {name}", labels, registry=registry),
        Gauge(f"{name}_upper", f"Upper end of the 95 % interval ({interval}) of {name}", labels, registry=registry),
    )


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe`` for a whole batch: one increment per bucket instead of one lock per value.

    Per-record observations were a measurable share of the loop at tens of thousands of records a
    second. This uses the histogram's own bucket bounds and counters (prometheus_client keeps
    per-bucket, non-cumulative counts and a sum), so the exposition is exactly what ``observe``
    would give; ``tests/test_metrics.py`` compares the two.
    """
    if not values:
        return
    bounds = np.asarray(histogram._upper_bounds)  # noqa: SLF001 - see the docstring
    counts = np.bincount(np.searchsorted(bounds, np.asarray(values, dtype=np.float64), side="left"))
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(int(count))  # noqa: SLF001
    histogram._sum.inc(float(np.sum(values)))  # noqa: SLF001
