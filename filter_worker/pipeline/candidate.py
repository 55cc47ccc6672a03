"""A candidate model in shadow: decided on the same records as the live model, compared, never acted on.

Before a retrained model (``filter-worker model train``) replaces the live one, it runs beside it on
live traffic (``FILTER_CANDIDATE__*``): every record the live model decides is classified by the
candidate too and decided under the candidate's rules, and the two actions are compared. What differs
is counted by action pair, live first (``allow->drop``: the candidate would drop what is allowed
today), and a sample of the disagreements goes to the review topic with both decisions in its headers,
so reviewers say which of the two was right before anyone promotes it.

The sample rides on the review-copy path (``Outgoing.review``, as ``pipeline/sampling.py``): the copy
is published with the routed output and the record is acknowledged once both are, so a copy is never
lost and, like every output, repeated only where at-least-once delivery repeats its record. A record
that random review sampling already drew keeps that one copy, with the candidate's headers added.
The draw is a hash of the record's source (salted, so it is independent of the review sampling's
draw): a record decided again after a rebalance is drawn again exactly when it was before.

Pure apart from the candidate's forward pass, which comes in as ``classify``: texts in, probabilities
(rows x the candidate's labels) out.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from filter_worker.config import DEFAULT_SCOPE, ConfigError, MessageSettings, Settings
from filter_worker.pipeline.decide import Classified
from filter_worker.pipeline.decode import DecodeFailure, decode
from filter_worker.pipeline.records import Outgoing, OutputRecord
from filter_worker.pipeline.routing import ACTIONS, Decision, Outputs, Router
from filter_worker.pipeline.sampling import draw

ACTION_HEADER = "filter.candidate.action"
LABEL_HEADER = "filter.candidate.label"
RULE_HEADER = "filter.candidate.rule"
SCORE_HEADER = "filter.candidate.score"
MODEL_HEADER = "filter.candidate.model"
_SALT = "candidate/"

# Every ordered pair of different actions: the label values of the disagreement counter.
PAIRS: tuple[str, ...] = tuple(f"{a}->{b}" for a in ACTIONS for b in ACTIONS if a != b)


def pair(live: str, candidate: str) -> str:
    """``"allow->drop"``: what the live model did, then what the candidate would have done."""
    return f"{live}->{candidate}"


@dataclass(frozen=True, slots=True)
class Comparison:
    """One batch compared: the outputs (drawn disagreements carrying a review copy), the candidate's
    actions, the disagreements per pair, how many copies were drawn, and the candidate's seconds."""

    outputs: list[Outgoing]
    actions: list[str]
    disagreements: Counter[str]
    drawn: int
    seconds: float


def check_candidate_rules(settings: Settings, head: Outputs) -> None:
    """Refuse, before the worker starts, a candidate its rules cannot decide (they name labels it lacks)."""
    own = settings.candidate.routing
    try:
        Router(own or settings.routing, head)
    except ConfigError as exc:
        rules = "its rules (FILTER_CANDIDATE__ROUTING)" if own else "the routing in force"
        raise ConfigError(
            f"FILTER_CANDIDATE__NAME={settings.candidate.name}: the candidate's labels {list(head.labels)} cannot be "
            f"decided under {rules}: {exc}; give it rules over its own labels in FILTER_CANDIDATE__ROUTING"
        ) from None


def candidate_headers(decision: Decision, model: str) -> list[tuple[str, bytes]]:
    return [
        (ACTION_HEADER, decision.action.encode()),
        (LABEL_HEADER, decision.label.encode()),
        (RULE_HEADER, decision.rule.encode()),
        (SCORE_HEADER, b"%.6f" % decision.score),
        (MODEL_HEADER, model.encode()),
    ]


class Candidate:
    """The candidate model and its rules; ``compare`` is called with every batch the live model decided."""

    def __init__(
        self,
        classify: Callable[[Sequence[str]], np.ndarray],
        identity: str,
        router: Router,
        message: MessageSettings,
        review_topic: str,
        sample_rate: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._classify = classify
        self.identity = identity
        self.router = router  # swapped when the routing is reloaded and the candidate follows it
        self._message = message
        self._topic = review_topic
        self._rate = sample_rate
        self._clock = clock

    def _text(self, item: Classified) -> str:
        decoded = decode(item.record.value, self._message.format, self._message.text_field)
        # The live model classified this record, so its value decoded once already.
        assert not isinstance(decoded, DecodeFailure)
        return decoded.text

    def compare(
        self, items: Sequence[Classified], decisions: Sequence[Decision], outputs: Sequence[Outgoing]
    ) -> Comparison:
        """Decide ``items`` with the candidate, in the live decision's scope where the candidate's rules
        have it (else its default rules), and compare actions with the live ``decisions``."""
        start = self._clock()
        probs = self._classify([self._text(item) for item in items])
        seconds = self._clock() - start
        known = set(self.router.scopes)
        scopes = [d.scope if d.scope in known else DEFAULT_SCOPE for d in decisions]
        theirs = self.router.decide_batch(probs, scopes)
        disagreements: Counter[str] = Counter()
        compared: list[Outgoing] = []
        drawn = 0
        for outgoing, live, candidate in zip(outputs, decisions, theirs, strict=True):
            if live.action == candidate.action:
                compared.append(outgoing)
                continue
            disagreements[pair(live.action, candidate.action)] += 1
            if self._rate <= 0.0 or draw(_SALT + outgoing.source.source) >= self._rate:
                compared.append(outgoing)
                continue
            drawn += 1
            compared.append(self._with_copy(outgoing, candidate))
        return Comparison(compared, [d.action for d in theirs], disagreements, drawn, seconds)

    def _with_copy(self, outgoing: Outgoing, candidate: Decision) -> Outgoing:
        """``outgoing`` with a review copy carrying both decisions: its existing copy (drawn by review
        sampling) extended, else a copy of its routed output."""
        extra = candidate_headers(candidate, self.identity)
        copy = outgoing.review
        if copy is not None:
            review = copy._replace(headers=[*copy.headers, *extra])
        else:
            out = outgoing.out
            review = OutputRecord(self._topic, out.key, out.value, [*out.headers, *extra], out.timestamp_ms)
        return dataclasses.replace(outgoing, review=review)
