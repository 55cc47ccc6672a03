"""The model's head: its labels, the function that turns its logits into scores, and what a rule over
several labels means. The one object every caller (both engines, routing, eval, calibrate, drift) uses.

The score function follows the model's configuration exactly as transformers' text-classification
pipeline does, so a threshold means what the model card's numbers mean:

- ``problem_type: regression``: no function (the outputs are the scores);
- ``problem_type: multi_label_classification``, or a single output: a sigmoid per label (independent
  yes/no answers, as most public toxicity and abuse classifiers are trained);
- otherwise, with two or more outputs: a softmax (one label of many, the scores sum to 1).

Many multi-label models leave ``problem_type`` unset, so the function can be set
(``FILTER_MODEL__SCORE_FUNCTION``); the function in use is logged at load. Labels the training run never
named (``LABEL_0``, ``LABEL_1``, ...) can be named with ``FILTER_MODEL__LABELS``.

A rule names one or more labels. Under a softmax the labels are exclusive, so their scores add up to
the probability of the set (``sum``); under a sigmoid they are independent, so a sum means nothing and
the rule asks whether any of them is at or above its ``min_score`` (``max``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from filter_worker.config import ConfigError, ModelSettings
from filter_worker.pipeline.routing import Combine

ScoreFunction = Literal["softmax", "sigmoid", "none"]

# What transformers names the outputs of a config without id2label: names no rule can mean anything by.
_PLACEHOLDER = re.compile(r"LABEL_\d+")


def configured_function(config: Any) -> ScoreFunction:
    """The function transformers' text-classification pipeline applies for this config (its postprocess)."""
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    if problem == "single_label_classification" or config.num_labels > 1:
        return "softmax"
    configured = str(getattr(config, "function_to_apply", "none")).lower()
    return "sigmoid" if configured == "sigmoid" else "softmax" if configured == "softmax" else "none"


def placeholder_labels(labels: Sequence[str]) -> bool:
    """Whether every label is a generated ``LABEL_N``: the model's outputs have no names."""
    return all(_PLACEHOLDER.fullmatch(label) for label in labels)


def labels_of(config: Any) -> list[str]:
    """The model's labels in output order (``id2label``), which routing rules and graphs refer to."""
    return [config.id2label[i] for i in range(len(config.id2label))]


@dataclass(frozen=True, slots=True)
class Head:
    """Labels in output order and the score function; ``combine`` is what a rule over several labels means."""

    labels: tuple[str, ...]
    function: ScoreFunction
    # True when FILTER_MODEL__SCORE_FUNCTION replaced what the config says: the scores are not the model's own.
    overridden: bool = False

    @classmethod
    def of(cls, config: Any, settings: ModelSettings) -> Head:
        """The head of a transformers config, with the settings' score-function override and label names."""
        own = labels_of(config)
        labels = own
        if settings.labels is not None:
            if len(settings.labels) != len(own):
                raise ConfigError(
                    f"FILTER_MODEL__LABELS names {len(settings.labels)} outputs but the model has {len(own)} "
                    f"({', '.join(own)}); give one name per output, in output order"
                )
            labels = list(settings.labels)
        configured = configured_function(config)
        function = configured if settings.score_function == "auto" else settings.score_function
        return cls(tuple(labels), function, overridden=function != configured)

    @property
    def combine(self) -> Combine:
        """A rule's score from its labels' scores: their sum for exclusive labels, else the highest one."""
        return "sum" if self.function == "softmax" else "max"

    @property
    def named(self) -> bool:
        """Whether the outputs have names a rule can mean something by (not only ``LABEL_N``)."""
        return not placeholder_labels(self.labels)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Scores (float32, rows x labels) from logits, computed as the transformers pipeline computes them."""
        values = np.asarray(logits, dtype=np.float32)
        if self.function == "sigmoid":
            with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x below -88: a score of 0, as it is
                return np.asarray(1.0 / (1.0 + np.exp(-values)), dtype=np.float32)
        if self.function == "softmax":
            shifted = np.exp(values - values.max(axis=-1, keepdims=True))
            return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True), dtype=np.float32)
        return values

    def describe(self) -> str:
        """For the load log line and ``--help`` texts: the function and what a rule means with it."""
        meaning = (
            "a rule's score is the sum of its labels'" if self.combine == "sum" else "a rule takes its highest label"
        )
        origin = "FILTER_MODEL__SCORE_FUNCTION" if self.overridden else "the model's config"
        return f"{self.function} (from {origin}; {meaning})"
