"""Probabilities (or a failure) -> the output record: topic, headers, value, under the current rules.

Plain functions of the record and the routing settings; the worker swaps in a new ``Decider`` when
the rules are reloaded, so a record is decided entirely under one set of rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.records import InputRecord, Outgoing, dead_letter, routed
from filter_worker.pipeline.routing import Decision, Router


class Decider:
    def __init__(self, router: Router, shadow: bool, topics: dict[str, str], model: str) -> None:
        self.router = router
        self.shadow = shadow
        self._topics = topics
        self._model = model

    def classified(
        self,
        record: InputRecord,
        generation: int,
        probs: np.ndarray,
        truncated: bool,
        embed_into: dict[str, Any] | None,
    ) -> tuple[Outgoing, Decision]:
        """The routed output, and the decision (in shadow mode its action is not the one published)."""
        decision = self.router.decide(probs)
        action = "allow" if self.shadow else decision.action
        out = routed(record, decision, self._topics[action], self._model, truncated, embed_into, self.shadow)
        return Outgoing(out, record, generation, action), decision

    def failed(self, record: InputRecord, generation: int, failure: DecodeFailure) -> Outgoing:
        out = dead_letter(record, failure, self._topics["dead_letter"])
        return Outgoing(out, record, generation, "dead_letter", failure)
