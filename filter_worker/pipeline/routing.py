"""Scopes, then rules x label scores -> an action. First matching rule wins; no match means allow.

A rule's score is what its labels say together, by the model's head (``model/head.py``): for a softmax
head (exclusive labels) the sum of their scores, the probability of the set; for a sigmoid head
(independent labels) the highest of them, "any of these labels at or above ``min_score``".

A record's scope (a tenant, a language: ``FILTER_ROUTING__SCOPES``) picks the rule list that applies
to it; the first scope whose match accepts the record wins, and a record no scope matches gets
``FILTER_ROUTING__RULES`` as scope ``default``. Everything here is pure: built once from settings
(every scope's rules checked against the model's labels, so a reload is all-or-nothing; a scope a
sender can choose with laxer rules than the default is logged as a warning), then a function of its
inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from filter_worker.config import DEFAULT_SCOPE, ConfigError, RoutingSettings, Rule, Scope, rule_names
from filter_worker.logs import get_logger

# The score histograms' bucket bounds (finer near 0 and 1, where softmax outputs pile up).
SCORE_EDGES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

log = get_logger("filter_worker.routing")

ACTIONS: tuple[str, ...] = ("allow", "quarantine", "drop")
DEFAULT_RULE = "default"

# How a rule's labels' scores make its score: summed (exclusive labels) or the highest (independent ones).
Combine = Literal["sum", "max"]


class Outputs(Protocol):
    """What routing needs of the model's head (``model.head.Head``): the labels in output order, whether
    they have names, and how a rule's labels combine."""

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def named(self) -> bool: ...

    @property
    def combine(self) -> Combine: ...


# A NamedTuple, not a frozen dataclass: as immutable, built in a third of the time (one per record).
class Decision(NamedTuple):
    """What happens to one record and why.

    ``score`` is the matched rule's score (see ``rule_score_matrix``), or the top label's score when no
    rule matched. ``probabilities`` (one per label, in ``labels`` order) and ``rule_row`` (one per rule of
    the scope, in ``rule_names`` order) are kept as they came out of the batch; ``scores`` and
    ``rule_scores`` name them on demand, for the embedded output and ``classify``. Building those two
    dicts for every record cost more than the rest of the decision; most records never need them.
    """

    action: str
    rule: str
    label: str
    score: float
    scope: str
    labels: Sequence[str]
    probabilities: Sequence[float]
    rule_names: Sequence[str]
    rule_row: Sequence[float]

    @property
    def scores(self) -> dict[str, float]:
        """Every label's score, by label."""
        return dict(zip(self.labels, self.probabilities, strict=True))

    @property
    def rule_scores(self) -> dict[str, float]:
        """Every rule of the scope with its score: the matched rule's score alone would hide how close
        the others came."""
        return dict(zip(self.rule_names, self.rule_row, strict=True))


class _ScopeTest:
    """One scope's match, compiled: the input topic, a header compared as bytes, or a path walked into
    the JSON value."""

    def __init__(self, scope: Scope) -> None:
        match = scope.match
        self.name = scope.name
        self.topics = frozenset(match.topics) if match.topics is not None else None
        self.header = match.header
        self.path = tuple(match.field.split(".")) if match.field is not None else None
        self.values = frozenset(match.values or ())
        self.raw_values = frozenset(value.encode() for value in match.values or ())

    def matches(
        self, headers: Sequence[tuple[str, bytes | None]], document: dict[str, Any] | None, topic: str | None
    ) -> bool:
        if self.topics is not None:
            return topic in self.topics
        if self.header is not None:
            # The last header of that name counts, as Kafka's own clients read headers (lastHeader).
            value = None
            for key, raw in headers:
                if key == self.header:
                    value = raw
            return value is not None and value in self.raw_values
        node: Any = document
        for part in self.path or ():
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return isinstance(node, str) and node in self.values


class ScopeMatcher:
    """Which scope a record belongs to. Needs no model, so data files can be split by scope before one loads."""

    def __init__(self, scopes: Sequence[Scope]) -> None:
        self._tests = [_ScopeTest(scope) for scope in scopes]

    @property
    def names(self) -> list[str]:
        """Every scope a record can get: ``default`` first, then the configured ones in order."""
        return [DEFAULT_SCOPE, *(test.name for test in self._tests)]

    @property
    def header_names(self) -> list[str]:
        """Headers some scope matches on (a data file supplies them as columns of the same name)."""
        return list(dict.fromkeys(test.header for test in self._tests if test.header is not None))

    def scope_of(
        self, headers: Sequence[tuple[str, bytes | None]], document: dict[str, Any] | None, topic: str | None = None
    ) -> str:
        """The first scope that matches, else ``default``. ``document`` is the parsed JSON value (None for
        text); ``topic`` the input topic the record was read from (None: a data file without one)."""
        for test in self._tests:
            if test.matches(headers, document, topic):
                return test.name
        return DEFAULT_SCOPE


_SEVERITY = {"allow": 0, "quarantine": 1, "drop": 2}


def _covers(rules: Sequence[Rule], rule: Rule) -> bool:
    """Whether ``rules`` take everything ``rule`` takes, at least as severely: a rule on a superset of its
    labels (so a score at least as high, summed or the highest), at a threshold no higher, with an action
    no milder, and no allow rule before it (first match wins)."""
    for candidate in rules:
        if candidate.action == "allow":
            return False
        if (
            set(candidate.labels) >= set(rule.labels)
            and candidate.min_score <= rule.min_score
            and _SEVERITY[candidate.action] >= _SEVERITY[rule.action]
        ):
            return True
    return False


def sender_chosen_laxer_scopes(routing: RoutingSettings) -> list[str]:
    """Scopes a sender can pick (matched on a header or a field it writes) whose rules may let through
    what the default rules take: with them, a sender adding ``tier: staff`` escapes moderation."""
    taken = [rule for rule in routing.rules if rule.action != "allow"]
    return [
        scope.name
        for scope in routing.scopes
        if scope.match.topics is None and not all(_covers(scope.rules, rule) for rule in taken)
    ]


def scope_rules(routing: RoutingSettings) -> dict[str, list[Rule]]:
    """Every scope's rule list, ``default`` first."""
    return {DEFAULT_SCOPE: list(routing.rules), **{scope.name: list(scope.rules) for scope in routing.scopes}}


@dataclass(frozen=True, slots=True)
class _Rules:
    """One scope's rules as arrays: first-match routing becomes a few numpy operations per batch."""

    names: tuple[str, ...]
    actions: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    indices: tuple[np.ndarray, ...]
    min_scores: np.ndarray  # float64, one per rule


def rule_score_matrix(probs: np.ndarray, indices: Sequence[np.ndarray], combine: Combine) -> np.ndarray:
    """Each rule's score per row, (rows, rules): its labels' scores summed (``sum``, in the model's dtype)
    or the highest of them (``max``), as the head says.

    The one place a rule's score is computed, so calibration, drift and the ``filter.rule-score``
    header and metrics show exactly the numbers routing compares with ``min_score``.
    """
    reduce = np.sum if combine == "sum" else np.max
    columns = [reduce(probs[:, index], axis=1) for index in indices]
    if not columns:
        return np.zeros((len(probs), 0), dtype=np.float64)
    return np.stack(columns, axis=1).astype(np.float64)


class Router:
    """Scopes and their rules compiled against a model's labels; built once, then a pure function."""

    def __init__(self, routing: RoutingSettings, head: Outputs) -> None:
        self._labels = tuple(head.labels)  # shared by every Decision: immutable
        self._named = head.named
        self.combine: Combine = head.combine
        self._matcher = ScopeMatcher(routing.scopes)
        self._rules = {DEFAULT_SCOPE: self._compile(routing.rules, "FILTER_ROUTING__RULES", "routing.rules")}
        for i, scope in enumerate(routing.scopes):
            where = f"routing.scopes[{i}].rules"
            self._rules[scope.name] = self._compile(scope.rules, "FILTER_ROUTING__SCOPES", where, scope.name)
        lax = sender_chosen_laxer_scopes(routing)
        if lax:
            log.warning(
                "scope rules laxer than the default on a header or field the sender sets: a sender can choose "
                "them; match these scopes on the input topic instead, or make their rules at least as strict",
                scopes=lax,
            )

    def _compile(self, rules: Sequence[Rule], variable: str, where: str, scope: str | None = None) -> _Rules:
        known = {label: i for i, label in enumerate(self._labels)}
        if rules and not self._named:
            example = ",".join(f"name{i}" for i in range(len(self._labels)))
            raise ConfigError(
                f"{variable}: the model's outputs have no names ({', '.join(self._labels)}), so no rule can say what "
                f"it routes; name them in output order with FILTER_MODEL__LABELS (for example "
                f"FILTER_MODEL__LABELS={example}) and write the rules with those names"
            )
        for position, rule in enumerate(rules):
            unknown = [label for label in rule.labels if label not in known]
            if unknown:
                of_scope = f", scope '{scope}'" if scope else ""
                raise ConfigError(
                    f"{variable} ({where}[{position}].labels{of_scope}): unknown label(s) {unknown}; "
                    f"the model's labels are {list(self._labels)}"
                )
        return _Rules(
            names=tuple(rule_names(list(rules))),
            actions=tuple(rule.action for rule in rules),
            labels=tuple(tuple(rule.labels) for rule in rules),
            indices=tuple(np.array([known[label] for label in rule.labels]) for rule in rules),
            min_scores=np.array([rule.min_score for rule in rules], dtype=np.float64),
        )

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    @property
    def scopes(self) -> list[str]:
        """``default`` and every configured scope, in order."""
        return self._matcher.names

    def rules(self, scope: str) -> dict[str, tuple[str, ...]]:
        """The scope's rule names, in order, with their labels."""
        rules = self._scope_rules(scope)
        return dict(zip(rules.names, rules.labels, strict=True))

    def thresholds(self, scope: str) -> list[float]:
        """The scope's ``min_score`` per rule, in rule order (as ``Decision.rule_row``)."""
        return self._scope_rules(scope).min_scores.tolist()

    def _scope_rules(self, scope: str) -> _Rules:
        try:
            return self._rules[scope]
        except KeyError:
            raise ValueError(f"unknown scope {scope!r}; the scopes are {self.scopes}") from None

    @property
    def has_scopes(self) -> bool:
        """Whether any scope is configured (without one, every record is ``default``: nothing to match)."""
        return len(self._matcher.names) > 1

    def scope_of(
        self, headers: Sequence[tuple[str, bytes | None]], document: dict[str, Any] | None, topic: str | None = None
    ) -> str:
        """The scope whose rules apply to a record: see ``ScopeMatcher.scope_of``."""
        return self._matcher.scope_of(headers, document, topic)

    def rule_scores(self, probs: np.ndarray, scope: str) -> np.ndarray:
        """Every rule of ``scope`` scored on every row of ``probs``: (rows, rules), rule order."""
        return rule_score_matrix(np.asarray(probs), self._scope_rules(scope).indices, self.combine)

    def decide(self, probabilities: np.ndarray, scope: str = DEFAULT_SCOPE) -> Decision:
        """Route one record from its score vector (one entry per label)."""
        return self.decide_batch(np.asarray(probabilities)[np.newaxis, :], [scope])[0]

    def decide_batch(self, probs: np.ndarray, scopes: Sequence[str]) -> list[Decision]:
        """Route a batch: ``probs`` (rows, labels), ``scopes[i]`` the scope of row ``i``.

        Scores, the first matching rule and the top label are computed per scope with numpy; only the
        Decision objects themselves are built row by row.
        """
        probs = np.asarray(probs)
        if probs.ndim != 2 or probs.shape != (len(scopes), len(self._labels)):
            raise ValueError(f"probs must be ({len(scopes)}, {len(self._labels)}), got {probs.shape}")
        labels = self._labels
        top_label = [labels[i] for i in probs.argmax(axis=1).tolist()]
        top_probability: list[float] = probs.max(axis=1).astype(np.float64).tolist()
        rows_as_floats = probs.tolist()
        decisions: list[Decision | None] = [None] * len(scopes)
        scope_of_row = np.array(scopes, dtype=object)
        for scope in dict.fromkeys(scopes):
            rules = self._scope_rules(scope)
            rows: list[int] = np.flatnonzero(scope_of_row == scope).tolist()
            scored = rule_score_matrix(probs[rows], rules.indices, self.combine)
            hits: np.ndarray = np.asarray(scored >= rules.min_scores)
            matched: list[bool] = np.asarray(hits.any(axis=1)).tolist()
            first: list[int] = hits.argmax(axis=1).tolist() if len(rules.names) else [0] * len(rows)
            names, actions = rules.names, rules.actions
            for row, rule_row, hit, at in zip(rows, scored.tolist(), matched, first, strict=True):
                if hit:
                    action, rule, score = actions[at], names[at], rule_row[at]
                else:
                    action, rule, score = "allow", DEFAULT_RULE, top_probability[row]
                decisions[row] = Decision(
                    action, rule, top_label[row], score, scope, labels, rows_as_floats[row], names, rule_row
                )
        return decisions  # type: ignore[return-value]  # every row belongs to exactly one scope
