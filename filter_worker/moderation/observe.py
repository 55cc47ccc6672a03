"""What moderation decisions look like: counts per scope, score histograms, drift.

The worker calls ``Observer.observe`` once per routed batch and ``Observer.flush_if_due`` once per loop
turn. Every metric label comes from configuration (scope and rule names, actions), never from a
record, so series stay bounded.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from filter_worker.config import Settings
from filter_worker.logs import get_logger
from filter_worker.moderation.drift import DriftMonitor, expected_noise, load_reference
from filter_worker.moderation.drift_metrics import DriftExporter
from filter_worker.monitoring.metrics import Metrics, observe_many
from filter_worker.pipeline.routing import Decision, Outputs, Router, ScopeMatcher

log = get_logger("filter_worker.moderation.observe")


# Score histograms and the drift index take the rows of this many records, or of this long, at once.
FLUSH_RECORDS = 2048
FLUSH_INTERVAL_S = 0.25


class Observer:
    """Feeds the moderation metrics: ``filter_decisions_total``, the score histograms and ``filter_score_psi``.

    Decisions are counted as they are made. The histograms and the drift index are fed from the
    probability rows of several batches at once (``FLUSH_RECORDS``, ``FLUSH_INTERVAL_S`` checked once
    per loop turn, whenever the worker has caught up, and when the rules change): their numpy work
    costs about the same for 20 rows as for 2000, and at small batch sizes it was a visible share of
    the loop. A scrape may therefore lag the decisions by about that interval (longer while a loop
    turn blocks).
    """

    def __init__(
        self, metrics: Metrics, drift: DriftExporter | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._metrics = metrics
        self._drift = drift
        self._clock = clock
        self._rows: list[np.ndarray] = []
        self._scopes: list[str] = []
        self._router: Router | None = None  # the rules the held rows were decided under
        self._since = 0.0  # when the oldest held row came

    @classmethod
    def from_settings(cls, metrics: Metrics, settings: Settings, head: Outputs, model: str) -> Observer:
        """With ``FILTER_DRIFT__REFERENCE`` set: load and check it (``ConfigError`` naming it when bad)."""
        path = settings.drift.reference
        if path is None:
            return cls(metrics)
        monitor = DriftMonitor(load_reference(path), head, settings.drift.window, settings.drift.expire_s)
        _log_coverage(monitor, settings, model)
        return cls(metrics, DriftExporter(metrics, monitor))

    def observe(self, probs: np.ndarray, decisions: Sequence[Decision], router: Router) -> None:
        """One routed batch: ``probs`` (rows, labels) and the decisions ``router`` made from those rows, in order."""
        m = self._metrics
        for (scope, action, rule), count in Counter((d.scope, d.action, d.rule) for d in decisions).items():
            m.decisions.labels(scope, action, rule).inc(count)
        if router is not self._router:
            self.flush()  # rows decided under the old rules are scored under them
            self._router = router
        if not self._scopes:
            self._since = self._clock()
        self._rows.append(probs)
        self._scopes += [d.scope for d in decisions]
        if len(self._scopes) >= FLUSH_RECORDS:
            self.flush()

    def flush_if_due(self, caught_up: bool) -> None:
        """Feed the held rows once enough time passed, or at once when nothing more is on its way."""
        if self._scopes and (caught_up or self._clock() - self._since >= FLUSH_INTERVAL_S):
            self.flush()
        if self._drift is not None:
            self._drift.expire()

    def flush(self) -> None:
        """The held rows into the histograms (per scope, with numpy) and the drift index."""
        if not self._scopes:
            return
        router = self._router
        assert router is not None, "rows are held only with the router that decided them"
        probs = self._rows[0] if len(self._rows) == 1 else np.concatenate(self._rows)
        scopes = self._scopes
        self._rows, self._scopes = [], []
        m = self._metrics
        present = list(dict.fromkeys(scopes))
        by_scope = np.array(scopes, dtype=object) if len(present) > 1 else None
        for scope in present:
            rows = probs if by_scope is None else probs[by_scope == scope]
            observe_many(m.top_label_probability.labels(scope), rows.max(axis=1).tolist())
            scored = router.rule_scores(rows, scope)
            for column, rule in enumerate(router.rules(scope)):
                observe_many(m.rule_score.labels(scope, rule), scored[:, column].tolist())
        if self._drift is not None:
            self._drift.publish(probs, scopes, router)


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
