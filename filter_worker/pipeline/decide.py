"""Probabilities (or a failure) -> output records: topic, headers, value, under the current rules.

A batch at a time: the scopes' rules are applied with numpy (``Router.decide_batch``), and only the
output records are built one by one. The worker swaps in a new ``Decider`` when the rules are
reloaded, so a record is decided entirely under one set of rules, scopes included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from filter_worker.config import DEFAULT_SCOPE
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import InputRecord, Outgoing, dead_letter, routed
from filter_worker.pipeline.routing import Decision, Router
from filter_worker.pipeline.sampling import ReviewSampler


class Classified(Protocol):
    """A record the model (or the cache) classified: what deciding it needs besides its probabilities."""

    @property
    def record(self) -> InputRecord: ...

    @property
    def generation(self) -> int: ...

    @property
    def truncated(self) -> bool: ...

    @property
    def document(self) -> dict[str, Any] | None: ...

    @property
    def embed_into(self) -> dict[str, Any] | None: ...


class Decider:
    def __init__(
        self,
        router: Router,
        shadow: bool,
        topics: dict[str, str],
        model: str,
        sampler: ReviewSampler | None = None,
    ) -> None:
        self.router = router
        self.shadow = shadow
        self._topics = topics
        self._model = model
        self._sampler = sampler  # FILTER_REVIEW__*: drawn records carry a copy for review

    def classified(self, items: Sequence[Classified], probs: np.ndarray) -> tuple[list[Outgoing], list[Decision]]:
        """The routed outputs of ``items`` (row ``i`` of ``probs`` is item ``i``'s), and their decisions.

        In shadow mode every output goes to the allow topic and the decision says what would have happened.
        With review sampling on, a drawn record's output carries its copy for review, drawn under the
        thresholds that decided it ("just below a threshold" means the threshold in force).
        """
        router = self.router
        if router.has_scopes:
            scopes = [router.scope_of(item.record.headers, item.document, item.record.topic) for item in items]
        else:
            scopes = [DEFAULT_SCOPE] * len(items)
        decisions = router.decide_batch(probs, scopes)
        outputs = []
        topics, model, shadow = self._topics, self._model, self.shadow
        for item, decision in zip(items, decisions, strict=True):
            action = "allow" if shadow else decision.action
            out = routed(item.record, decision, topics[action], model, item.truncated, item.embed_into, shadow)
            outputs.append(Outgoing(out, item.record, item.generation, action))
        if self._sampler is not None:
            outputs = self._sampler.attach(outputs, decisions, router)
        return outputs, decisions

    def failed(self, record: InputRecord, generation: int, failure: DecodeFailure) -> Outgoing:
        out = dead_letter(record, failure, self._topics["dead_letter"])
        return Outgoing(out, record, generation, "dead_letter", failure)
