"""Rules x label probabilities -> an action. First matching rule wins; no match means allow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from filter_worker.config import ConfigError, Rule

ACTIONS: tuple[str, ...] = ("allow", "quarantine", "drop")
DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one record and why.

    ``score`` is the matched rule's summed probability, or the top label's probability when no rule
    matched; ``scores`` holds every label's probability for the embedded output and for audits.
    """

    action: str
    rule: str
    label: str
    score: float
    scores: dict[str, float]


class Router:
    """Rules compiled against a model's labels; built once at start-up, then a pure function."""

    def __init__(self, rules: Sequence[Rule], labels: Sequence[str]) -> None:
        known = {label: i for i, label in enumerate(labels)}
        for position, rule in enumerate(rules):
            unknown = [label for label in rule.labels if label not in known]
            if unknown:
                raise ConfigError(
                    f"FILTER_ROUTING__RULES (routing.rules[{position}].labels): unknown label(s) {unknown}; "
                    f"the model's labels are {list(labels)}"
                )
        self._labels = list(labels)
        self._rules = [
            (rule.name or f"rules[{position}]", rule.action, np.array([known[x] for x in rule.labels]), rule.min_score)
            for position, rule in enumerate(rules)
        ]

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    def decide(self, probabilities: np.ndarray) -> Decision:
        """Route one record from its probability vector (one entry per label, summing to 1)."""
        top = int(np.argmax(probabilities))
        scores = {label: float(p) for label, p in zip(self._labels, probabilities, strict=True)}
        for name, action, indices, min_score in self._rules:
            score = float(probabilities[indices].sum())
            if score >= min_score:
                return Decision(action, name, self._labels[top], score, scores)
        return Decision("allow", DEFAULT_RULE, self._labels[top], float(probabilities[top]), scores)
