"""Prometheus metrics, on a registry per worker (so tests and the demo can run several in one process)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from filter_worker.config import Rule
from filter_worker.pipeline.decode import ERROR_CLASSES

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
        self.commits = Counter("filter_commits", "Successful offset commits", registry=r)
        self.commit_failures = Counter("filter_commit_failures", "Failed offset commits", registry=r)
        self.lag = Gauge("filter_consumer_lag", "Records behind the high watermark", ["topic", "partition"], registry=r)
        self.rebalances = Counter("filter_rebalances", "Rebalance events", ["kind"], registry=r)
        self.in_flight = Gauge("filter_in_flight_records", "Consumed records not yet acknowledged", registry=r)
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
        self.model = Info("filter_model", "The loaded model", registry=r)
        self.ready = Gauge(
            "filter_ready", "1 while /readyz answers 200 (model warm, group joined, broker up)", registry=r
        )
        # process_start_time_seconds (restarts), CPU and memory, on this registry like everything else.
        ProcessCollector(registry=r)

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
        if cache:
            for result in ("hit", "miss"):
                self.cache_records.labels(result)

    def track_readiness(self, ready: Callable[[], bool]) -> None:
        """``filter_ready`` reads ``ready`` (``Health.ready``) at every scrape: no call site per state change."""
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
