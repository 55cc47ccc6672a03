"""Threshold calibration: the lowest ``min_score`` for a rule that still reaches a target precision.

The lowest such threshold is the one that catches the most (recall only falls as the threshold
rises). A record counts as positive when its gold label is one of the rule's labels, and its score is
its labels' scores combined as the model's head says (summed for a softmax head, the highest for a
sigmoid head), computed exactly as ``Router`` computes it, so the printed
rule selects on live traffic exactly what it selected here. The bootstrap (resampling the examples
with a seeded generator) says how much of that is luck of the sample. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from filter_worker.pipeline.routing import Outputs, rule_score_matrix
from filter_worker.tools.evaluation import Curve, pr_curve


@dataclass(frozen=True, slots=True)
class Calibration:
    """The result. ``threshold`` is the lowest one reaching the target, or, when none does
    (``meets_target`` false), the one with the best precision.

    ``*_interval`` are bootstrap percentile intervals: of the precision and recall at ``threshold``,
    and of the threshold that calibration would pick on a resample. ``reached_share`` is the share of
    resamples on which some threshold reached the target at all.
    """

    target_precision: float
    meets_target: bool
    threshold: float
    precision: float
    recall: float
    taken: int
    positives: int
    examples: int
    precision_interval: tuple[float, float] | None
    recall_interval: tuple[float, float] | None
    threshold_interval: tuple[float, float] | None
    reached_share: float
    confidence: float
    resamples: int
    curve: Curve

    @property
    def proposed(self) -> float | None:
        """The threshold the charts draw: the one found, if it reaches the target."""
        return self.threshold if self.meets_target else None


def rule_scores(probs: np.ndarray, head: Outputs, rule_labels: Sequence[str]) -> np.ndarray:
    """A rule's score per row: the number ``Router`` compares with ``min_score`` (the same function)."""
    indices = np.array([list(head.labels).index(label) for label in rule_labels])
    return rule_score_matrix(probs, [indices], head.combine)[:, 0]


def lowest_threshold(curve: Curve, target: float) -> int | None:
    """Index into ``curve`` of the lowest threshold whose precision reaches ``target``."""
    reaching = np.flatnonzero(curve.precision >= target)
    return int(reaching[-1]) if len(reaching) else None  # thresholds descend, so the last is the lowest


def calibrate(
    score: np.ndarray,
    positive: np.ndarray,
    target_precision: float,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Calibration:
    """Pick the threshold on the data, then bootstrap it. When the target is never reached, the
    threshold with the best precision is reported (``threshold`` None, its precision and recall kept)."""
    positive = positive.astype(bool)
    curve = pr_curve(score, positive)
    chosen = lowest_threshold(curve, target_precision)
    # Without a threshold reaching the target: the lowest of those with the best precision (most recall).
    at = chosen if chosen is not None else int(np.flatnonzero(curve.precision == curve.precision.max())[-1])
    threshold = float(curve.thresholds[at])
    taken = int((score >= threshold).sum())

    rng = np.random.default_rng(seed)
    boot_precision, boot_recall, boot_threshold = [], [], []
    n = len(score)
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        s, p = score[rows], positive[rows]
        selected = s >= threshold
        boot_precision.append(p[selected].mean() if selected.any() else np.nan)
        boot_recall.append(p[selected].sum() / p.sum() if p.any() else np.nan)
        resampled = pr_curve(s, p)
        pick = lowest_threshold(resampled, target_precision)
        boot_threshold.append(resampled.thresholds[pick] if pick is not None else np.nan)
    tail = (1.0 - confidence) / 2
    reached_share = float(np.mean(~np.isnan(boot_threshold))) if resamples else 0.0

    def interval(values: list[float]) -> tuple[float, float] | None:
        data = np.array(values, dtype=np.float64)
        data = data[~np.isnan(data)]
        if not len(data):
            return None
        low, high = np.quantile(data, [tail, 1.0 - tail], method="inverted_cdf")  # observed values
        return float(low), float(high)

    return Calibration(
        target_precision=target_precision,
        meets_target=chosen is not None,
        threshold=threshold,
        precision=float(curve.precision[at]),
        recall=float(curve.recall[at]),
        taken=taken,
        positives=int(positive.sum()),
        examples=n,
        precision_interval=interval(boot_precision) if chosen is not None else None,
        recall_interval=interval(boot_recall) if chosen is not None else None,
        threshold_interval=interval(boot_threshold),
        reached_share=reached_share,
        confidence=confidence,
        resamples=resamples,
        curve=curve,
    )


def calibration_json(result: Calibration, rule: dict[str, object] | None) -> dict[str, object]:
    """The machine-readable form (``--out-json``); the curve is left to the HTML report."""
    return {
        "rule": rule,
        "target_precision": result.target_precision,
        "meets_target": result.meets_target,
        "min_score": result.threshold,
        "precision": result.precision,
        "recall": result.recall,
        "taken": result.taken,
        "positives": result.positives,
        "examples": result.examples,
        "bootstrap": {
            "resamples": result.resamples,
            "confidence": result.confidence,
            "precision": result.precision_interval,
            "recall": result.recall_interval,
            "min_score": result.threshold_interval,
            "target_reached": result.reached_share,
        },
    }
