"""Score drift: how far live rule scores have moved from a reference sample (population stability index).

A rule's score distribution on live traffic shifts when the traffic changes (a new audience, a spam
campaign, another language) or the model does (a new revision, a broken tokenizer): thresholds tuned
on the old distribution then act differently, long before anyone reads a complaint. The reference
is the distribution on a sample the thresholds were tuned on (``filter-worker drift snapshot``);
the live one is the last ``FILTER_DRIFT__WINDOW`` records of each scope.

PSI = sum over bins of (live share - reference share) * ln(live share / reference share). Both
shares are floored at ``EPSILON`` first, so an empty bin on either side adds a large but finite
term instead of infinity. Pure: numpy in, numbers out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from filter_worker.config import DEFAULT_SCOPE, SCOPE_NAME, ConfigError
from filter_worker.pipeline.routing import rule_score_matrix

# Softmax outputs pile up near 0 and 1, so the bins are finer there; 14 bins keep the index's noise
# low (roughly bins-1 over the sample sizes: 0.03 for a 1000-record window against a 1000-record
# reference). The score histograms use the same edges, so a dashboard shows what the index measures.
SCORE_EDGES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
EPSILON = 1e-4
REFERENCE_FORMAT = "filter-worker/drift-reference"
REFERENCE_VERSION = 1
_SETTING = "FILTER_DRIFT__REFERENCE"


def bins_of(scores: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index of each score: bin i holds [edges[i], edges[i+1]), the last one also 1.0 itself."""
    inner = np.asarray(edges[1:-1], dtype=np.float64)
    return np.searchsorted(inner, np.clip(scores, 0.0, 1.0), side="right")


def histogram(scores: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts per bin."""
    return np.bincount(bins_of(np.asarray(scores, dtype=np.float64), edges), minlength=len(edges) - 1)


def psi(reference: np.ndarray, live: np.ndarray, epsilon: float = EPSILON) -> float:
    """Population stability index of two count vectors over the same bins (0 when the shares agree)."""
    expected = np.maximum(reference / max(reference.sum(), 1), epsilon)
    actual = np.maximum(live / max(live.sum(), 1), epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def expected_noise(bins: int, reference_records: int, window: int) -> float:
    """Roughly the index two samples of one distribution show by chance: (bins - 1) x (1/n1 + 1/n2).

    PSI is a symmetric divergence; for samples of sizes n1 and n2 from the same distribution it is
    about a chi-square with bins-1 degrees of freedom scaled by 1/n1 + 1/n2. Bins both samples leave
    empty add nothing, so this is an upper estimate.
    """
    return (bins - 1) * (1 / reference_records + 1 / window)


# ---- the reference file ----


class _RuleReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: list[str] = Field(min_length=1)
    counts: list[int] = Field(min_length=1)

    @field_validator("counts")
    @classmethod
    def _non_negative(cls, counts: list[int]) -> list[int]:
        if min(counts) < 0:
            raise ValueError("counts must not be negative")
        return counts


class _ScopeReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: int = Field(ge=1)
    rules: dict[str, _RuleReference] = Field(min_length=1)

    @model_validator(mode="after")
    def _sums(self) -> _ScopeReference:
        for name, rule in self.rules.items():
            if sum(rule.counts) != self.records:
                raise ValueError(f"rule '{name}': counts sum to {sum(rule.counts)}, not records ({self.records})")
        return self


class _ReferenceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["filter-worker/drift-reference"]
    version: Literal[1]
    model: str
    data: str
    edges: list[float] = Field(min_length=2)
    scopes: dict[str, _ScopeReference] = Field(min_length=1)

    @field_validator("edges")
    @classmethod
    def _edges(cls, edges: list[float]) -> list[float]:
        if edges[0] != 0.0 or edges[-1] != 1.0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError("edges must rise strictly from 0 to 1")
        return edges

    @model_validator(mode="after")
    def _shape(self) -> _ReferenceFile:
        for scope, reference in self.scopes.items():
            if scope != DEFAULT_SCOPE and not SCOPE_NAME.fullmatch(scope):
                raise ValueError(f"scope name {scope!r} is not a valid scope name")
            for name, rule in reference.rules.items():
                if len(rule.counts) != len(self.edges) - 1:
                    raise ValueError(
                        f"scope '{scope}' rule '{name}': {len(rule.counts)} counts for {len(self.edges) - 1} bins"
                    )
        return self


@dataclass(frozen=True, slots=True)
class RuleReference:
    labels: tuple[str, ...]
    counts: np.ndarray


@dataclass(frozen=True, slots=True)
class Reference:
    """Score distributions per scope and rule on a sample: what live traffic is compared with.

    A rule is kept with its labels because its score depends only on them (not on ``min_score``):
    the index follows the labels the reference was taken with, whatever the rules say today.
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
            "edges": list(self.edges),
            "scopes": {
                scope: {
                    "records": self.records[scope],
                    "rules": {
                        name: {"labels": list(rule.labels), "counts": [int(c) for c in rule.counts]}
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
        scope: {
            name: RuleReference(tuple(labels), histogram(values, SCORE_EDGES))
            for name, (labels, values) in by_rule.items()
        }
        for scope, by_rule in scores.items()
    }
    records = {scope: len(next(iter(by_rule.values()))[1]) for scope, by_rule in scores.items()}
    return Reference(model, data, SCORE_EDGES, records, rules)


def parse_reference(document: Any, source: str) -> Reference:
    """Validate a reference document; a bad one is a ``ConfigError`` naming the setting and the problem."""
    try:
        parsed = _ReferenceFile.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"{_SETTING}={source}: not a drift reference ({where + ': ' if where else ''}{first['msg']}); "
            "write one with filter-worker drift snapshot"
        ) from None
    return Reference(
        model=parsed.model,
        data=parsed.data,
        edges=tuple(parsed.edges),
        records={scope: s.records for scope, s in parsed.scopes.items()},
        rules={
            scope: {
                name: RuleReference(tuple(r.labels), np.array(r.counts, dtype=np.int64)) for name, r in s.rules.items()
            }
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


class _ScopeWindow:
    """The bins of each reference rule's score for a scope's last ``size`` records, and their counts."""

    def __init__(self, rules: Mapping[str, RuleReference], labels: Sequence[str], edges: Sequence[float], size: int):
        self.names = list(rules)
        self.indices = [np.array([list(labels).index(label) for label in rule.labels]) for rule in rules.values()]
        self.expected = [rule.counts for rule in rules.values()]
        self.edges = edges
        self.ring = np.zeros((size, len(rules)), dtype=np.int16)
        self.counts = np.zeros((len(rules), len(edges) - 1), dtype=np.int64)
        self.position = 0
        self.filled = 0

    def add(self, probs: np.ndarray) -> None:
        size = len(self.ring)
        new = bins_of(rule_score_matrix(probs, self.indices), self.edges)[-size:]
        positions = (self.position + np.arange(len(new))) % size
        old = self.ring[positions[positions < self.filled]]  # occupied slots: [0, filled) until the ring is full
        columns = np.arange(len(self.names))[np.newaxis, :]
        np.subtract.at(self.counts, (columns, old), 1)
        self.ring[positions] = new
        np.add.at(self.counts, (columns, new), 1)
        self.position = int((self.position + len(new)) % size)
        self.filled = min(size, self.filled + len(new))

    def indices_now(self) -> dict[str, float] | None:
        if self.filled < len(self.ring):
            return None  # a part-filled window is mostly noise: no index until it is full
        return {
            name: psi(expected, live)
            for name, expected, live in zip(self.names, self.expected, self.counts, strict=True)
        }


class DriftMonitor:
    """Live windows per scope of the reference; the index per (scope, rule) once a scope's window is full."""

    def __init__(self, reference: Reference, labels: Sequence[str], window: int) -> None:
        reference.check_labels(labels)
        self.reference = reference
        self._windows = {
            scope: _ScopeWindow(rules, labels, reference.edges, window) for scope, rules in reference.rules.items()
        }

    def observe(self, probs: np.ndarray, scopes: Sequence[str]) -> dict[tuple[str, str], float]:
        """Add a batch (``probs`` rows with their scopes); the index of every rule of every scope the
        batch touched whose window is full. Scopes the reference does not cover are ignored."""
        indices: dict[tuple[str, str], float] = {}
        scope_of_row = np.array(scopes, dtype=object)
        for scope in dict.fromkeys(scopes):
            window = self._windows.get(scope)
            if window is None:
                continue
            window.add(np.asarray(probs)[scope_of_row == scope])
            for rule, value in (window.indices_now() or {}).items():
                indices[(scope, rule)] = value
        return indices
