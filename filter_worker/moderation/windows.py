"""What ``filter-worker feedback`` keeps in memory, and the numbers it derives from it.

- ``PrecisionWindows``: the last verdicts on each rule's decisions (one per source), for its precision
  with a Clopper–Pearson interval. A window holds only verdicts on decisions the rule in force would
  still take: when a ``min_score`` rises, verdicts below it leave; when it falls, the window empties,
  since the old verdicts cover only part of what the rule now takes.
- ``ModelRoster``: which model identities may become labels (those configured), how many at once, and
  when one has gone quiet for long enough to be forgotten.
- ``SampleWindows``: verdicts on randomly drawn records, weighted by the inverse of their probability
  of being drawn, for prevalence and each rule's recall: ratio (Hájek) estimates with Korn–Graubard
  intervals on their linearised variance.
  Each drawn record carries every rule's score, so it is decided again under the rules in force.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from filter_worker.moderation.stats import clopper_pearson, effective_size, korn_graubard
from filter_worker.moderation.verdicts import MODERATED, Invalid, Sample

# A deploy rolls one model at a time; a few cover a rollout, a rollback and verdicts still arriving on
# older decisions.
MAX_MODELS = 4


class Key(NamedTuple):
    """One precision series; the field order is the metrics' label order."""

    scope: str
    rule: str
    action: str
    model: str


@dataclass(frozen=True, slots=True)
class Estimate:
    """A share with its 95 % interval and the sample size it rests on (verdicts, or an effective size)."""

    value: float
    low: float
    high: float
    size: float


class _Window:
    """One key's verdicts by source, oldest first, with the abuse among them counted as they come and go."""

    def __init__(self) -> None:
        self.verdicts: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self.abuse = 0

    def put(self, source: str, abuse: bool, score: float) -> None:
        self.remove(source)
        self.verdicts[source] = (abuse, score)
        self.abuse += abuse

    def remove(self, source: str) -> None:
        earlier = self.verdicts.pop(source, None)
        if earlier is not None:
            self.abuse -= earlier[0]

    def oldest(self) -> str:
        return next(iter(self.verdicts))


class PrecisionWindows:
    """The last ``size`` verdicts per key, one per source, each with the rule score it was decided at."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._windows: dict[Key, _Window] = {}

    def add(self, key: Key, source: str, abuse: bool, score: float) -> bool:
        """Record a verdict; a repeat (re-read after a crash) or a revision replaces the earlier one.
        Whether the source is new to the window: a repeat must not count twice in a sequential test."""
        window = self._windows.setdefault(key, _Window())
        new = source not in window.verdicts
        window.put(source, abuse, score)
        if len(window.verdicts) > self._size:
            window.remove(window.oldest())
        return new

    def tracked(self) -> list[Key]:
        return list(self._windows)

    def stats(self, key: Key) -> tuple[int, int]:
        """(abuse verdicts, verdicts) in the key's window."""
        window = self._windows.get(key)
        return (window.abuse, len(window.verdicts)) if window is not None else (0, 0)

    def precision(self, key: Key) -> Estimate | None:
        """The share of abuse with its Clopper–Pearson interval; None for an empty window."""
        abuse, total = self.stats(key)
        if not total:
            return None
        low, high = clopper_pearson(abuse, total)
        return Estimate(abuse / total, low, high, total)

    def keep_from(self, scope: str, rule: str, min_score: float) -> list[Key]:
        """A raised threshold: verdicts below ``min_score`` leave (the rule no longer takes such records).
        Returns the keys left empty, which are dropped."""
        emptied = []
        for key, window in self._windows.items():
            if (key.scope, key.rule) == (scope, rule):
                for source in [s for s, (_, score) in window.verdicts.items() if score < min_score]:
                    window.remove(source)
                if not window.verdicts:
                    emptied.append(key)
        for key in emptied:
            del self._windows[key]
        return emptied

    def drop(self, which: Callable[[Key], bool]) -> list[Key]:
        """Forget the windows of the keys ``which`` selects; returns them."""
        dropped = [key for key in self._windows if which(key)]
        for key in dropped:
            del self._windows[key]
        return dropped


class ModelRoster:
    """Model identities that may label series: configured ones only, ``cap`` at a time, quiet ones forgotten.

    ``accepted`` holds full ``filter.model`` values or model names (an entry matches an identity equal to
    it or starting with it and ``@``). A verdict's own model string is never trusted to name a series:
    a review tool that invents model strings would otherwise create series, and evict the real model's.
    """

    def __init__(self, accepted: Sequence[str], cap: int, idle_s: float) -> None:
        self._accepted = tuple(accepted)
        self._cap = cap
        self._idle_s = idle_s
        self._last: dict[str, float] = {}  # model -> newest verdict's time

    def admit(self, model: str, at: float, now: float) -> Invalid | None:
        """Whether a verdict on ``model`` (published at ``at``) may be counted; remembers it when so."""
        if not any(model == entry or model.startswith(entry + "@") for entry in self._accepted):
            return Invalid("unknown_model", f"filter.model {model!r} is not one of FILTER_FEEDBACK__MODELS")
        if model not in self._last and len(self._last) >= self._cap:
            return Invalid(
                "too_many_models",
                f"{self._cap} models already have verdicts from the last {self._idle_s:.0f} s; "
                f"{model!r} waits until one goes quiet",
            )
        self._last[model] = max(at, self._last.get(model, at))
        return None

    def idle(self, now: float) -> list[str]:
        """The models without a verdict for ``idle_s``, forgotten from now on."""
        gone = [model for model, last in self._last.items() if now - last > self._idle_s]
        for model in gone:
            del self._last[model]
        return gone


class RuleOrder(NamedTuple):
    """A scope's rule as routing applies it: in order, first match wins."""

    name: str
    action: str
    min_score: float


class _SampleWindow:
    """One (scope, model)'s drawn verdicts: weights, verdicts, and the rule that takes each now."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.weight = np.zeros(size)
        self.abuse = np.zeros(size, dtype=bool)
        self.taker = np.full(size, -1)  # index of the rule in force that takes it; -1: allowed
        self.decided = np.zeros(size, dtype=bool)  # every rule in force has a score in it
        self.scores: list[dict[str, float]] = [{} for _ in range(size)]
        self.source: list[str | None] = [None] * size
        self.slot: dict[str, int] = {}
        self.next = 0

    def add(self, source: str, abuse: bool, sample: Sample, rules: Sequence[RuleOrder]) -> None:
        at = self.slot.get(source)
        if at is None:  # a new source takes the oldest slot
            at = self.next
            self.next = (self.next + 1) % self.size
            old = self.source[at]
            if old is not None:
                del self.slot[old]
            self.slot[source] = at
            self.source[at] = source
        self.weight[at] = sample.weight
        self.abuse[at] = abuse
        self.scores[at] = sample.rule_scores
        self.taker[at], self.decided[at] = _decide(sample.rule_scores, rules)

    def redecide(self, rules: Sequence[RuleOrder]) -> None:
        for at, source in enumerate(self.source):
            if source is not None:
                self.taker[at], self.decided[at] = _decide(self.scores[at], rules)

    def filled(self) -> np.ndarray:
        return np.array([source is not None for source in self.source])


def _decide(scores: dict[str, float], rules: Sequence[RuleOrder]) -> tuple[int, bool]:
    """The rule in force that takes a record with these scores (-1: allowed), and whether that could be
    told (a rule added since the record was drawn has no score in it)."""
    for index, rule in enumerate(rules):
        score = scores.get(rule.name)
        if score is None:
            return -1, False
        if score >= rule.min_score:
            return (index if rule.action in MODERATED else -1), True
    return -1, True


def _weighted_share(weights: np.ndarray, hits: np.ndarray) -> Estimate | None:
    """The ratio (Hájek) estimate of a share from verdicts weighted by 1 / their probability of being
    drawn, with Korn and Graubard's interval on its linearised variance.

    The draws are independent (Poisson sampling: each record by its own hash), so the variance of the
    ratio is about sum (1 - p) w^2 (hit - share)^2 / (sum w)^2 over the drawn records, p = 1 / w. The
    size reported is the interval's effective size."""
    total = float(weights.sum())
    if total <= 0:
        return None
    share = float(weights[hits].sum()) / total
    residual = hits.astype(np.float64) - share
    variance = float(np.sum((1.0 - 1.0 / weights) * np.square(weights * residual))) / (total * total)
    kish = effective_size(weights)
    low, high = korn_graubard(share, variance, min(len(weights), int(np.ceil(kish))), kish)
    size = share * (1 - share) / variance if variance > 0 and 0.0 < share < 1.0 else kish
    return Estimate(share, low, high, min(size, float(len(weights))))


@dataclass(frozen=True, slots=True)
class SampleEstimates:
    """Prevalence (abuse among all decided records) and recall (the share of abuse a rule takes, and
    all rules of the scope together), from one (scope, model)'s drawn verdicts."""

    drawn: int
    prevalence: Estimate | None
    recall: dict[str, Estimate]
    scope_recall: Estimate | None


class SampleWindows:
    """The last ``size`` drawn verdicts per (scope, model), one per source."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._windows: dict[tuple[str, str], _SampleWindow] = {}

    def add(self, scope: str, model: str, source: str, abuse: bool, sample: Sample, rules: Sequence[RuleOrder]) -> None:
        window = self._windows.get((scope, model))
        if window is None:
            window = self._windows[(scope, model)] = _SampleWindow(self._size)
        window.add(source, abuse, sample, rules)

    def scopes_and_models(self) -> list[tuple[str, str]]:
        return list(self._windows)

    def redecide(self, rules_of: Callable[[str], Sequence[RuleOrder] | None]) -> list[tuple[str, str]]:
        """Decide every drawn record again under reloaded rules; scopes that are gone are dropped (returned)."""
        dropped = []
        for (scope, model), window in list(self._windows.items()):
            rules = rules_of(scope)
            if rules is None:
                del self._windows[(scope, model)]
                dropped.append((scope, model))
            else:
                window.redecide(rules)
        return dropped

    def drop_models(self, models: Iterable[str]) -> list[tuple[str, str]]:
        gone = set(models)
        dropped = [key for key in self._windows if key[1] in gone]
        for key in dropped:
            del self._windows[key]
        return dropped

    def estimates(self, scope: str, model: str, rules: Sequence[RuleOrder]) -> SampleEstimates:
        """Prevalence, and recall per moderating rule of ``rules`` (the scope's, in force)."""
        window = self._windows.get((scope, model))
        if window is None:
            return SampleEstimates(0, None, {}, None)
        filled = window.filled()
        weight, abuse = window.weight[filled], window.abuse[filled]
        prevalence = _weighted_share(weight, abuse)
        judged = filled & window.abuse & window.decided
        recall: dict[str, Estimate] = {}
        scope_recall = None
        if judged.any():
            weights, taker = window.weight[judged], window.taker[judged]
            for index, rule in enumerate(rules):
                if rule.action in MODERATED:
                    estimate = _weighted_share(weights, taker == index)
                    if estimate is not None:
                        recall[rule.name] = estimate
            scope_recall = _weighted_share(weights, taker >= 0)
        return SampleEstimates(int(filled.sum()), prevalence, recall, scope_recall)
