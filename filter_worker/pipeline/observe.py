"""What moderation decisions look like, per routed batch: counts per scope, score histograms, drift.

The worker calls ``Observer.observe`` once per routed batch. Every metric label comes from
configuration (scope and rule names, actions), never from a record, so series stay bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from filter_worker.config import Settings
from filter_worker.logs import get_logger
from filter_worker.metrics import Metrics, observe_many
from filter_worker.pipeline.drift import DriftMonitor, expected_noise, load_reference
from filter_worker.pipeline.routing import Decision, Router, ScopeMatcher

log = get_logger("filter_worker.observe")


class Observer:
    """Feeds the moderation metrics: ``filter_decisions_total``, the score histograms and ``filter_score_psi``."""

    def __init__(self, metrics: Metrics, drift: DriftMonitor | None = None) -> None:
        self._metrics = metrics
        self._drift = drift

    @classmethod
    def from_settings(cls, metrics: Metrics, settings: Settings, labels: Sequence[str], model: str) -> Observer:
        """With ``FILTER_DRIFT__REFERENCE`` set: load and check it (``ConfigError`` naming it when bad)."""
        path = settings.drift.reference
        if path is None:
            return cls(metrics)
        monitor = DriftMonitor(load_reference(path), labels, settings.drift.window)
        _log_coverage(monitor, settings, model)
        return cls(metrics, monitor)

    def observe(self, probs: np.ndarray, decisions: Sequence[Decision], router: Router) -> None:
        """One routed batch: ``probs`` (rows, labels) and the decisions ``router`` made from those rows, in order.

        Counted per scope with numpy (the rules' scores recomputed from ``probs``): per-record metric
        calls were a measurable share of the loop at tens of thousands of records a second.
        """
        m = self._metrics
        for (scope, action, rule), count in Counter((d.scope, d.action, d.rule) for d in decisions).items():
            m.decisions.labels(scope, action, rule).inc(count)
        scopes = [d.scope for d in decisions]
        by_scope = np.array(scopes, dtype=object)
        for scope in dict.fromkeys(scopes):
            rows = probs[by_scope == scope]
            observe_many(m.top_label_probability.labels(scope), rows.max(axis=1).tolist())
            scored = router.rule_scores(rows, scope)
            for column, rule in enumerate(router.rules(scope)):
                observe_many(m.rule_score.labels(scope, rule), scored[:, column].tolist())
        if self._drift is not None:
            for (scope, rule), value in self._drift.observe(probs, scopes).items():
                m.score_psi.labels(scope, rule).set(value)


def _log_coverage(monitor: DriftMonitor, settings: Settings, model: str) -> None:
    """Say at start-up what the index will and will not cover, and when it is not comparable."""
    reference = monitor.reference
    scopes = ScopeMatcher(settings.routing.scopes).names
    window = settings.drift.window
    log.info(
        "drift reference loaded",
        path=str(settings.drift.reference),
        data=reference.data,
        scopes={scope: sorted(rules) for scope, rules in reference.rules.items()},
        window=window,
        noise={
            scope: round(expected_noise(len(reference.edges) - 1, n, window), 3)
            for scope, n in reference.records.items()
        },
    )
    uncovered = [scope for scope in scopes if scope not in reference.rules]
    if uncovered:
        log.warning("no drift reference for these scopes; take a new snapshot to cover them", scopes=uncovered)
    unknown = [scope for scope in reference.rules if scope not in scopes]
    if unknown:
        log.warning("the drift reference has scopes the routing does not; they get no index", scopes=unknown)
    if reference.model != model:
        log.warning(
            "the drift reference was taken with another model; the index measures the model change too",
            reference_model=reference.model,
            model=model,
        )
