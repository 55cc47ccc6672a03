"""Random review sampling: which decided records go to reviewers by chance, and what they carry.

Verdicts on what a rule took say how precise it is, and nothing about what it missed: allowed records
are never reviewed, so recall and prevalence are invisible and a threshold can only ever be pushed up.
A sample drawn with a *known* probability fixes that. Every decided record (allowed, quarantined or
dropped) is drawn with probability ``FILTER_REVIEW__RATE``, and an allowed record whose score for
some rule of its scope lies less than ``FILTER_REVIEW__NEAR_MARGIN`` below that rule's ``min_score``
with ``FILTER_REVIEW__NEAR_RATE`` (records near a threshold are few and decide whether it may move).
Weighting each verdict by 1 / probability then estimates the whole stream without bias.

The draw is a hash of the record's source (``topic/partition/offset``), not a random generator: a
record decided again after a crash or a rebalance is drawn again exactly when it was drawn before,
so at-least-once delivery repeats a review record at most (reviewers' verdicts count once per
source) and never draws a second, independent chance. The source says nothing about the content, so
the draw is independent of whether the record is abuse. Pure: decisions in, review records out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import orjson

from filter_worker.config import ReviewSettings
from filter_worker.pipeline.records import Outgoing, OutputRecord
from filter_worker.pipeline.routing import Decision, Router

SAMPLED_HEADER = "filter.sampled"
PROBABILITY_HEADER = "filter.sample-probability"
RULE_SCORES_HEADER = "filter.rule-scores"
_TAKEN = ("quarantine", "drop")
_SCALE = float(1 << 64)


def draw(source: str) -> float:
    """A number in [0, 1) fixed by the record's source: uniform over sources, the same on every re-read."""
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "big") / _SCALE


class ReviewSampler:
    """Decides which decided records are drawn for review, with which probability, and builds their records."""

    def __init__(self, settings: ReviewSettings) -> None:
        self._topic = settings.topic
        self._rate = settings.rate
        self._near_rate = settings.near_rate
        self._margin = settings.near_margin

    def probability(self, decision: Decision, thresholds: Sequence[float]) -> float:
        """The chance that ``decision``'s record is drawn, given its scope's ``min_score`` per rule (in
        ``decision.rule_names`` order): the near rate for an allowed record just below some threshold,
        else the uniform rate."""
        if decision.action not in _TAKEN and self._near_rate > self._rate:
            for score, threshold in zip(decision.rule_row, thresholds, strict=True):
                if threshold - self._margin <= score < threshold:
                    return self._near_rate
        return self._rate

    def attach(self, outputs: Sequence[Outgoing], decisions: Sequence[Decision], router: Router) -> list[Outgoing]:
        """``outputs``, the drawn ones carrying their review record (``Outgoing.review``): published with
        the routed output, so the record is acknowledged once both are."""
        attached: list[Outgoing] = []
        thresholds: dict[str, Sequence[float]] = {}
        for outgoing, decision in zip(outputs, decisions, strict=True):
            scope_thresholds = thresholds.get(decision.scope)
            if scope_thresholds is None:
                scope_thresholds = thresholds[decision.scope] = router.thresholds(decision.scope)
            probability = self.probability(decision, scope_thresholds)
            if probability <= 0.0 or draw(outgoing.source.source) >= probability:
                attached.append(outgoing)
                continue
            out = outgoing.out
            headers = [
                *out.headers,
                (SAMPLED_HEADER, b"true"),
                (PROBABILITY_HEADER, b"%.9g" % probability),
                (RULE_SCORES_HEADER, orjson.dumps(decision.rule_scores)),
            ]
            review = OutputRecord(self._topic, out.key, out.value, headers, out.timestamp_ms)
            attached.append(dataclasses.replace(outgoing, review=review))
        return attached
