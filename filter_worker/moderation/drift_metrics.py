"""The drift monitor's numbers on the worker's metrics: the index, the take rates, and their expiry.

``filter_score_psi{scope,rule}`` and ``filter_take_rate{,_reference,_zscore}{scope,rule}`` (with the
live share's parts, ``filter_take_rate_taken_records`` and ``filter_take_rate_window_records``, which
the dashboard pools over workers as sum over sum) are set
from the held score rows whenever the observer feeds them (``publish``), and removed when their
scope goes quiet for ``FILTER_DRIFT__EXPIRE_S``, is no longer configured, or a rule is no longer in
force with the reference's labels: a series that stays after its traffic stopped would keep an alert
firing on numbers that describe nothing happening (``expire``, cheap enough for every loop turn).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from prometheus_client import Gauge

from filter_worker.moderation.drift import DriftMonitor
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.routing import Router


def thresholds_of(router: Router) -> Callable[[str], Mapping[str, tuple[tuple[str, ...], float]] | None]:
    """The rules in force of a scope, by name, with their labels and ``min_score`` (None: no such scope)."""

    def of(scope: str) -> Mapping[str, tuple[tuple[str, ...], float]] | None:
        if scope not in router.scopes:
            return None
        rules = router.rules(scope)
        return {name: (labels, t) for (name, labels), t in zip(rules.items(), router.thresholds(scope), strict=True)}

    return of


class DriftExporter:
    """Feeds a ``DriftMonitor`` and keeps its series on ``metrics`` true to the current windows."""

    def __init__(self, metrics: Metrics, monitor: DriftMonitor) -> None:
        self.monitor = monitor
        self._metrics = metrics
        self._indices: set[tuple[str, str]] = set()
        self._rates: set[tuple[str, str]] = set()
        self._days: set[tuple[str, str]] = set()

    def publish(self, probs: np.ndarray, scopes: Sequence[str], router: Router) -> None:
        """Held rows (``probs``, one scope each) decided under ``router``: into the windows, then the series."""
        in_force = thresholds_of(router)
        self.monitor.observe(probs, scopes, in_force)
        readings = self.monitor.readings(in_force)
        m = self._metrics
        for key, value in readings.indices.items():
            m.score_psi.labels(*key).set(value)
        for key, value in readings.day_indices.items():
            m.score_psi_day.labels(*key).set(value)
        for key, rate in readings.take_rates.items():
            m.take_rate.labels(*key).set(rate.live)
            m.take_rate_reference.labels(*key).set(rate.reference)
            m.take_rate_zscore.labels(*key).set(rate.z)
            m.take_rate_taken.labels(*key).set(rate.taken)
            m.take_rate_records.labels(*key).set(rate.records)
            if rate.day is not None:
                m.take_rate_day.labels(*key).set(rate.day.live)
                m.take_rate_day_zscore.labels(*key).set(rate.day.z)
            else:
                self._drop({key}, (m.take_rate_day, m.take_rate_day_zscore))
        self._drop(self._indices - set(readings.indices), (m.score_psi,))
        self._drop(self._days - set(readings.day_indices), (m.score_psi_day,))
        self._drop(self._rates - set(readings.take_rates), self._rate_gauges())
        self._indices, self._rates = set(readings.indices), set(readings.take_rates)
        self._days = set(readings.day_indices)

    def expire(self) -> None:
        """Remove the series of scopes without a record for ``FILTER_DRIFT__EXPIRE_S``."""
        quiet = set(self.monitor.expired())
        if not quiet:
            return
        m = self._metrics
        gone_indices = {key for key in self._indices if key[0] in quiet}
        gone_rates = {key for key in self._rates if key[0] in quiet}
        gone_days = {key for key in self._days if key[0] in quiet}
        self._drop(gone_days, (m.score_psi_day,))
        self._days -= gone_days
        self._drop(gone_indices, (m.score_psi,))
        self._drop(gone_rates, self._rate_gauges())
        self._indices -= gone_indices
        self._rates -= gone_rates

    def _rate_gauges(self) -> tuple[Gauge, ...]:
        m = self._metrics
        return (
            m.take_rate,
            m.take_rate_reference,
            m.take_rate_zscore,
            m.take_rate_taken,
            m.take_rate_records,
            m.take_rate_day,
            m.take_rate_day_zscore,
        )

    @staticmethod
    def _drop(keys: set[tuple[str, str]], gauges: Sequence[Gauge]) -> None:
        for key in keys:
            for gauge in gauges:
                with contextlib.suppress(KeyError):  # a series that was never set
                    gauge.remove(*key)
