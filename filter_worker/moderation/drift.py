"""Score drift: how far live rule scores have moved from a reference sample, and what the thresholds now do.

A rule's score distribution on live traffic shifts when the traffic changes (a new audience, a spam
campaign, another language) or the model does (a new revision, a broken tokenizer): thresholds tuned
on the old distribution then act differently, long before anyone reads a complaint. The reference
is a sample the thresholds were tuned on (``filter-worker drift snapshot``): every rule's scores on
it, kept whole, so that both numbers below can be taken at any threshold without a new snapshot. The
live side is the last ``FILTER_DRIFT__WINDOW`` records of each scope.

- **The population stability index**, over bins that each hold a tenth of the reference's scores
  (its deciles): PSI = sum over bins of (live share - reference share) * ln(live share / reference
  share), both floored at ``EPSILON``. Equal-mass bins keep the index's noise close to its chi-square
  approximation (``expected_noise``); fixed bins left most of them nearly empty, and with a 100-record
  window the index read above 0.2 in about 45 % of windows without any drift.
- **The take rate** of each rule: the share of records scoring at or above its ``min_score`` in force,
  live against the reference, with a two-proportion z statistic. The index sees any change of the
  distribution, also one entirely below every threshold (harmless); the take rate is what a threshold
  does: a drop rate going from 10 % to 25 % moved the old index to only 0.17.

Both need samples large enough to mean something: a reference scope needs ``MIN_DRIFT_REFERENCE``
records (refused at start-up otherwise), a window at least ``MIN_DRIFT_WINDOW`` (a setting's minimum).
A scope without a record for ``FILTER_DRIFT__EXPIRE_S`` reports nothing: its last numbers describe
traffic that stopped. Pure: numpy in, numbers out; the clock is passed in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from filter_worker.config import DEFAULT_SCOPE, MIN_DRIFT_REFERENCE, SCOPE_NAME, ConfigError
from filter_worker.moderation.minutes import MinuteCounts
from filter_worker.moderation.stats import two_proportion_z
from filter_worker.moderation.take_rate import FEWEST_MINUTES, DayCounts, DayRate
from filter_worker.pipeline.routing import Combine, Outputs, rule_score_matrix

# The index's bins hold these shares of the reference's scores: deciles, the usual PSI binning.
QUANTILES: tuple[float, ...] = tuple(i / 10 for i in range(11))
EPSILON = 1e-4
REFERENCE_FORMAT = "filter-worker/drift-reference"
REFERENCE_VERSION = 2
_SETTING = "FILTER_DRIFT__REFERENCE"
# A scope's rules in force, by name: their labels and min_score.
_Thresholds = Mapping[str, tuple[tuple[str, ...], float]]


def psi(reference: np.ndarray, live: np.ndarray, epsilon: float = EPSILON) -> float:
    """Population stability index of two count vectors over the same bins (0 when the shares agree)."""
    expected = np.maximum(reference / max(reference.sum(), 1), epsilon)
    actual = np.maximum(live / max(live.sum(), 1), epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def expected_noise(bins: int, reference_records: int, window: int) -> float:
    """About the mean index two samples of one distribution show by chance: (bins - 1) x (1/n1 + 1/n2).

    PSI is a symmetric divergence; for samples of sizes n1 and n2 from one distribution it is about a
    chi-square with bins - 1 degrees of freedom scaled by 1/n1 + 1/n2. An approximation of the mean, not
    a bound: single windows read above it about half the time, and a bin with few records on either
    side (fixed bins at a small window) adds more than it says. With decile bins and the minimum sizes
    the simulated null mean is within a few percent of it (``tests/test_drift.py``).
    """
    return (bins - 1) * (1 / reference_records + 1 / window)


def decile_edges(scores: np.ndarray) -> np.ndarray:
    """The inner bin edges: the reference's score deciles, without repeats (ties merge two bins)."""
    return np.unique(np.quantile(scores, QUANTILES[1:-1], method="inverted_cdf"))


def binned(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: bin i holds [edges[i-1], edges[i]), the first everything below edges[0]."""
    return np.bincount(np.searchsorted(edges, scores, side="right"), minlength=len(edges) + 1)


# ---- the reference file ----


class _RuleReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: list[str] = Field(min_length=1)
    scores: list[float] = Field(min_length=1)

    @field_validator("scores")
    @classmethod
    def _probabilities(cls, scores: list[float]) -> list[float]:
        if min(scores) < 0.0 or max(scores) > 1.0:
            raise ValueError("scores must be from 0 to 1")
        return scores


class _ScopeReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: int = Field(ge=MIN_DRIFT_REFERENCE)
    rules: dict[str, _RuleReference] = Field(min_length=1)

    @model_validator(mode="after")
    def _sizes(self) -> _ScopeReference:
        for name, rule in self.rules.items():
            if len(rule.scores) != self.records:
                raise ValueError(f"rule '{name}': {len(rule.scores)} scores, not records ({self.records})")
        return self


class _ReferenceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["filter-worker/drift-reference"]
    version: Literal[2]
    model: str
    data: str
    scopes: dict[str, _ScopeReference] = Field(min_length=1)

    @field_validator("scopes")
    @classmethod
    def _names(cls, scopes: dict[str, _ScopeReference]) -> dict[str, _ScopeReference]:
        for scope in scopes:
            if scope != DEFAULT_SCOPE and not SCOPE_NAME.fullmatch(scope):
                raise ValueError(f"scope name {scope!r} is not a valid scope name")
        return scopes


@dataclass(frozen=True, slots=True)
class RuleReference:
    """A rule's scores on the reference sample (sorted), and the decile bins taken from them."""

    labels: tuple[str, ...]
    scores: np.ndarray
    edges: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, labels: Sequence[str], scores: np.ndarray) -> RuleReference:
        ordered = np.sort(np.asarray(scores, dtype=np.float64))
        edges = decile_edges(ordered)
        return cls(tuple(labels), ordered, edges, binned(ordered, edges))

    def take_rate(self, min_score: float) -> tuple[int, int]:
        """(reference records at or above ``min_score``, reference records)."""
        below = int(np.searchsorted(self.scores, min_score, side="left"))
        return len(self.scores) - below, len(self.scores)


@dataclass(frozen=True, slots=True)
class Reference:
    """Score samples per scope and rule: what live traffic is compared with.

    A rule is kept with its labels because its score depends only on them (not on ``min_score``):
    the index follows the labels the reference was taken with, whatever the rules say today.
    ``edges`` are the quantile levels that bound the index's bins (0, 0.1, ..., 1).
    """

    model: str
    data: str
    edges: tuple[float, ...]
    records: dict[str, int]
    rules: dict[str, dict[str, RuleReference]]

    def to_json(self) -> dict[str, Any]:
        """The versioned file format ``drift snapshot`` writes and ``FILTER_DRIFT__REFERENCE`` reads."""
        return {
            "format": REFERENCE_FORMAT,
            "version": REFERENCE_VERSION,
            "model": self.model,
            "data": self.data,
            "scopes": {
                scope: {
                    "records": self.records[scope],
                    "rules": {
                        name: {"labels": list(rule.labels), "scores": rule.scores.tolist()}
                        for name, rule in rules.items()
                    },
                }
                for scope, rules in self.rules.items()
            },
        }

    def check_labels(self, labels: Sequence[str]) -> None:
        """Every rule's labels must be the model's; else the index would be computed on nothing."""
        for scope, rules in self.rules.items():
            for name, rule in rules.items():
                unknown = [label for label in rule.labels if label not in labels]
                if unknown:
                    raise ConfigError(
                        f"{_SETTING}: scope '{scope}' rule '{name}' has label(s) {unknown} that the model does not "
                        f"have (its labels are {list(labels)}); take a new snapshot with this model"
                    )


def reference_of(
    model: str, data: str, scores: Mapping[str, Mapping[str, tuple[Sequence[str], np.ndarray]]]
) -> Reference:
    """Build a reference from each scope's rule scores: ``scores[scope][rule] = (labels, scores)``."""
    rules = {
        scope: {name: RuleReference.of(labels, values) for name, (labels, values) in by_rule.items()}
        for scope, by_rule in scores.items()
    }
    records = {scope: len(next(iter(by_rule.values()))[1]) for scope, by_rule in scores.items()}
    return Reference(model, data, QUANTILES, records, rules)


def parse_reference(document: Any, source: str) -> Reference:
    """Validate a reference document; a bad one is a ``ConfigError`` naming the setting and the problem."""
    try:
        parsed = _ReferenceFile.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "greater_than_equal" and where.endswith(".records"):
            raise ConfigError(
                f"{_SETTING}={source}: scope '{first['loc'][1]}' has {first['input']} records; an index needs at "
                f"least {MIN_DRIFT_REFERENCE} to be more than noise: take a larger snapshot"
            ) from None
        raise ConfigError(
            f"{_SETTING}={source}: not a drift reference ({where + ': ' if where else ''}{first['msg']}); "
            "write one with filter-worker drift snapshot"
        ) from None
    return reference_of(
        parsed.model,
        parsed.data,
        {
            scope: {name: (r.labels, np.array(r.scores, dtype=np.float64)) for name, r in s.rules.items()}
            for scope, s in parsed.scopes.items()
        },
    )


def load_reference(path: Path) -> Reference:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{_SETTING}={path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{_SETTING}={path}: not valid JSON") from None
    return parse_reference(document, str(path))


# ---- the live side ----


@dataclass(frozen=True, slots=True)
class TakeRate:
    """A rule's share of records at or above its ``min_score``: live (``taken`` of ``records``), on the
    reference, and their z."""

    live: float
    reference: float
    z: float
    taken: int
    records: int
    day: DayRate | None = None  # the last day's, per minute: the one the alert reads


class _ScopeWindow:
    """Each reference rule's scores on a scope's last ``size`` records (a ring), and when it last grew."""

    def __init__(self, rules: Mapping[str, RuleReference], labels: Sequence[str], combine: Combine, size: int) -> None:
        self.rules = dict(rules)
        self.combine = combine
        self.columns = [np.array([list(labels).index(label) for label in rule.labels]) for rule in rules.values()]
        self.ring = np.zeros((size, len(rules)), dtype=np.float64)
        self.position = 0
        self.filled = 0
        self.seen = float("-inf")
        self.days: dict[str, DayCounts] = {}
        # Each rule's reference bins, counted per minute over the last day: the day index.
        self.day_bins = [MinuteCounts(len(rule.edges) + 1) for rule in rules.values()]

    def add(self, probs: np.ndarray, now: float, thresholds: _Thresholds | None = None) -> None:
        """A batch of the scope's rows; with the rules in force, each rule's day counts take it too."""
        size = len(self.ring)
        scored = rule_score_matrix(probs, self.columns, self.combine)
        for column, rule in enumerate(self.rules.values()):
            self.day_bins[column].add(binned(scored[:, column], rule.edges), now)
        if thresholds is not None:
            self._count_day(scored, now, thresholds)
        new = scored[-size:]
        positions = (self.position + np.arange(len(new))) % size
        self.ring[positions] = new  # the oldest records' slots: they leave the window
        self.position = int((self.position + len(new)) % size)
        self.filled = min(size, self.filled + len(new))
        self.seen = now

    def _count_day(self, scored: np.ndarray, now: float, thresholds: _Thresholds) -> None:
        for column, (name, rule) in enumerate(self.rules.items()):
            current = thresholds.get(name)
            if current is None or current[0] != rule.labels:
                self.days.pop(name, None)
                continue
            counts = self.days.get(name)
            if counts is None or counts.threshold != current:  # another threshold: another rule's rate
                counts = self.days[name] = DayCounts(current)
            counts.add(scored[:, column], now)

    def full(self) -> bool:
        return self.filled == len(self.ring)

    def indices(self) -> dict[str, float]:
        return {
            name: psi(rule.counts, binned(self.ring[:, column], rule.edges))
            for column, (name, rule) in enumerate(self.rules.items())
        }

    def day_indices(self) -> dict[str, float]:
        """The index of each rule's last day of records, once ``FEWEST_MINUTES`` minutes had records.

        A day at a record a second holds 86 400 records: a burst of near-identical messages that fills
        a 1000-record window (one bin, hence a large index) is a small share of it. With Pareto-sized
        bursts and nothing changed the window's index exceeded 0.2 in 30 % (tail 1.5) to 76 % (tail 1.2)
        of windows, the day's never (``tests/test_drift.py``)."""
        out = {}
        for column, (name, rule) in enumerate(self.rules.items()):
            minutes = self.day_bins[column].minutes()
            if np.count_nonzero(minutes.sum(axis=1)) >= FEWEST_MINUTES:
                out[name] = psi(rule.counts, minutes.sum(axis=0))
        return out

    def take_rates(self, thresholds: Mapping[str, tuple[tuple[str, ...], float]]) -> dict[str, TakeRate]:
        """Per rule in force whose labels are the reference's: its take rate, live against the reference."""
        rates = {}
        for column, (name, rule) in enumerate(self.rules.items()):
            current = thresholds.get(name)
            if current is None or current[0] != rule.labels:
                continue  # no such rule now, or other labels: the reference's scores are of another score
            taken = int(np.count_nonzero(self.ring[:, column] >= current[1]))
            reference_taken, reference_records = rule.take_rate(current[1])
            z = two_proportion_z(taken, len(self.ring), reference_taken, reference_records)
            records = len(self.ring)
            counts = self.days.get(name)
            day = counts.rate(reference_taken, reference_records) if counts and counts.threshold == current else None
            rates[name] = TakeRate(taken / records, reference_taken / reference_records, z, taken, records, day)
        return rates


@dataclass(frozen=True, slots=True)
class Readings:
    """What the scopes with a full, recent window say: a (scope, rule) missing here has no numbers now."""

    indices: dict[tuple[str, str], float]
    take_rates: dict[tuple[str, str], TakeRate]
    day_indices: dict[tuple[str, str], float] = field(default_factory=dict)


class DriftMonitor:
    """Live windows per scope of the reference; the index and take rates once a scope's window is full."""

    def __init__(
        self,
        reference: Reference,
        head: Outputs,
        window: int,
        expire_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        reference.check_labels(head.labels)
        self.reference = reference
        self._expire_s = expire_s
        self._clock = clock
        self._windows = {
            scope: _ScopeWindow(rules, head.labels, head.combine, window) for scope, rules in reference.rules.items()
        }
        self._reported: set[str] = set()

    def observe(
        self,
        probs: np.ndarray,
        scopes: Sequence[str],
        thresholds: Callable[[str], _Thresholds | None] | None = None,
    ) -> dict[tuple[str, str], float]:
        """Add a batch (``probs`` rows with their scopes); the index of every rule of every scope the
        batch touched whose window is full. Scopes the reference does not cover are ignored. With
        ``thresholds`` (the rules in force) each rule's day counts take the batch too."""
        indices: dict[tuple[str, str], float] = {}
        now = self._clock()
        scope_of_row = np.array(scopes, dtype=object)
        for scope in dict.fromkeys(scopes):
            window = self._windows.get(scope)
            if window is None:
                continue
            window.add(np.asarray(probs)[scope_of_row == scope], now, thresholds(scope) if thresholds else None)
            if window.full():
                indices.update({(scope, rule): value for rule, value in window.indices().items()})
        return indices

    def readings(self, thresholds: Callable[[str], Mapping[str, tuple[tuple[str, ...], float]] | None]) -> Readings:
        """Index and take rates of every scope whose window is full and saw a record within ``expire_s``.

        ``thresholds(scope)`` gives the rules in force, by name, with their labels and ``min_score``
        (None: the scope is no longer configured, and reports nothing).
        """
        now = self._clock()
        indices: dict[tuple[str, str], float] = {}
        rates: dict[tuple[str, str], TakeRate] = {}
        days: dict[tuple[str, str], float] = {}
        live = set()
        for scope, window in self._windows.items():
            rules = thresholds(scope)
            if rules is None or not window.full() or now - window.seen > self._expire_s:
                continue
            live.add(scope)
            indices.update({(scope, rule): value for rule, value in window.indices().items()})
            days.update({(scope, rule): value for rule, value in window.day_indices().items()})
            rates.update({(scope, rule): rate for rule, rate in window.take_rates(rules).items()})
        self._reported = live
        return Readings(indices, rates, days)

    def expired(self) -> list[str]:
        """The scopes reported before that saw no record for ``expire_s``: a cheap check for every loop
        turn, so a scope's numbers go also when nothing at all arrives (no ``readings`` to compute)."""
        now = self._clock()
        quiet = sorted(scope for scope in self._reported if now - self._windows[scope].seen > self._expire_s)
        self._reported.difference_update(quiet)
        return quiet
