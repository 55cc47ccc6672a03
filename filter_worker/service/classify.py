"""The classify stage: consumed records in, decided outputs out.

    submit (decode, cache, tokenize) -> batch buffer -> model thread -> decide -> emit

Everything between a record's consumption and its decision lives here: the batch buffer, the passes
in the model, the passes taken from the model but not yet routed. A revocation or a stop asks the
stage to ``finish`` what must not be abandoned (the records of its partitions that sit below a decided
one, and the passes in the model) and to ``forget`` the rest; the lifecycle decides when
(``delivery/lifecycle.py``). Its collaborators come in as arguments, so a test builds the stage with a
fake model and a list as ``emit``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from filter_worker.config import MessageSettings
from filter_worker.logs import get_logger
from filter_worker.moderation.observe import Observer
from filter_worker.monitoring.metrics import Metrics
from filter_worker.pipeline.batching import BatchBuffer
from filter_worker.pipeline.cache import DecisionCache
from filter_worker.pipeline.candidate import Candidate
from filter_worker.pipeline.decide import Classified, Decider
from filter_worker.pipeline.decode import DecodeFailure
from filter_worker.pipeline.inference import InferenceThread, Result
from filter_worker.pipeline.intake import Answered, Pending, Tokenize, take_in
from filter_worker.pipeline.records import InputRecord, Outgoing
from filter_worker.pipeline.routing import Decision

log = get_logger("filter_worker.service.classify")

TP = tuple[str, int]
# Whether a record's partition generation is still the owned one (revoked or rewound records are not).
Current = Callable[[TP, int], bool]
# The highest offset of a partition consumed and not buffered: in the model, decided or published.
HighestDecided = Callable[[TP, set[int]], int | None]


class Classify:
    """One stage of the loop; see the module docstring. Only the loop's thread calls it."""

    def __init__(
        self,
        *,
        buffer: BatchBuffer[Pending],
        inference: InferenceThread[Pending],
        tokenize: Tokenize,
        decider: Decider,
        observer: Observer,
        metrics: Metrics,
        message: MessageSettings,
        emit: Callable[[list[Outgoing]], None],
        current: Current,
        max_buffered: int,
        cache: DecisionCache | None = None,
        embed: bool = False,
        log_text: bool = False,
        candidate: Candidate | None = None,
    ) -> None:
        self._buffer = buffer
        self._inference = inference
        self._tokenize = tokenize
        self.decider = decider  # swapped by a routing reload: later decisions follow the new rules
        self._observer = observer
        self._metrics = metrics
        self._message = message
        self._emit = emit
        self._current = current
        self._max_buffered = max_buffered
        self._max_size = inference.max_size
        self._cache = cache
        self._embed = embed
        self._log_text = log_text
        self.candidate = candidate  # FILTER_CANDIDATE__*: a second model compared in shadow, never acted on
        # Passes taken from the model and not yet routed. Kept here, not in a local variable: a
        # consumer call may run a revocation between taking them and routing them, and ``finish``
        # routes them first, so their records are published before the revocation commits.
        self._collected: deque[Result[Pending]] = deque()

    # -- what the loop asks before it waits -----------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def in_model(self) -> int:
        """Batches submitted to the model and not completely collected."""
        return self._inference.in_flight

    def empty(self) -> bool:
        """Nothing buffered, nothing in the model: every record taken in is decided."""
        return not len(self._buffer) and not self._inference.in_flight and not self._collected

    def dispatchable(self) -> bool:
        """The model can take a batch now, and one is ready for it (busy: every model thread has a pass)."""
        inference = self._inference
        return inference.has_capacity() and self._buffer.ready(model_busy=inference.in_flight >= inference.workers)

    def full(self) -> bool:
        return self._buffer.full()

    def room(self) -> int:
        """How many records one read may take: a batch, or less where the buffer is nearly full."""
        return min(self._max_size, self._max_buffered - len(self._buffer))

    def time_to_due(self) -> float | None:
        return self._buffer.time_to_due()

    def await_pass(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a pass to end (it is routed by the next ``poll``)."""
        self._collected += self._inference.completed(timeout_s)

    # -- the stage ------------------------------------------------------------------------------

    def submit(self, records: Sequence[tuple[InputRecord, int]]) -> None:
        """Consumed records (with their partition generation): dead letters and cache answers out, the rest buffered."""
        intake = take_in(records, self._message, self._embed, self._tokenize, self._cache)
        for record, generation, failure in intake.failed:
            self._dead_letter(record, generation, failure)
        self._answer(intake.answered)
        for pending in intake.pending:
            self._buffer.add(pending, len(pending.ids))

    def poll(self) -> None:
        """Take finished passes, hand the model its next batch before routing them, then route them."""
        self._collected += self._inference.completed()
        while self.dispatchable():
            self._inference.submit(self._buffer.take())
        self._route_collected()
        self._answer_buffered_repeats()

    def finish(
        self, partitions: set[TP] | None, deadline: float, clock: Callable[[], float], highest: HighestDecided
    ) -> bool:
        """Decide what ``partitions`` (all if ``None``) must not abandon, until ``deadline``; ``True`` if all was.

        That is the passes in the model and the buffered records below a decided one of their
        partition (batches cut by length decide a partition out of offset order): without them the
        commit stops below published records and the next owner publishes those again. Records above
        every decided one stay buffered, to be forgotten: dropping them repeats nothing. Buffered
        repeats are not answered from the cache here: answered, one would be published above records
        the stop abandons.
        """
        self._route_collected()
        holes = self._take_holes(partitions, highest)
        inference = self._inference
        while (holes or inference.in_flight) and clock() < deadline:
            while holes and inference.has_capacity():
                inference.submit(holes[: self._max_size])
                del holes[: self._max_size]
            self._collected += inference.completed(timeout_s=min(0.1, max(0.001, deadline - clock())))
            self._route_collected()
        for pending in holes:  # cut short: back to the buffer, forgotten with the rest
            self._buffer.add(pending, len(pending.ids))
        return not holes and not inference.in_flight

    def forget(self, partitions: set[TP]) -> int:
        """Drop the buffered records of partitions no longer owned; returns how many."""
        return self.discard(lambda record, _generation: (record.topic, record.partition) not in partitions)

    def discard(self, keep: Callable[[InputRecord, int], bool]) -> int:
        """Drop buffered records ``keep`` rejects (revoked, lost or rewound); passes in the model are
        dropped when they come back (``current``)."""
        return self._buffer.discard(lambda p: keep(p.record, p.generation))

    def close(self) -> None:
        self._inference.close()

    # -- inside ---------------------------------------------------------------------------------

    def _take_holes(self, partitions: set[TP] | None, highest: HighestDecided) -> list[Pending]:
        """Buffered records of ``partitions`` below a decided (or in-model) record of theirs, shortest first."""

        def chosen(pending: Pending) -> bool:
            return partitions is None or (pending.record.topic, pending.record.partition) in partitions

        items = self._buffer.extract(chosen)
        buffered: dict[TP, set[int]] = {}
        for pending in items:
            buffered.setdefault((pending.record.topic, pending.record.partition), set()).add(pending.record.offset)
        holes: list[Pending] = []
        for pending in items:
            tp = (pending.record.topic, pending.record.partition)
            decided = highest(tp, buffered[tp])
            if decided is not None and pending.record.offset < decided:
                holes.append(pending)
            else:
                self._buffer.add(pending, len(pending.ids))
        return sorted(holes, key=lambda p: len(p.ids))

    def _route_collected(self) -> None:
        """Route the finished passes, oldest first, decided together, emitted pass by pass.

        Passes collected in one turn are decided in one call (at small batch sizes the per-call costs,
        numpy routing and metrics, are shared by more records) and emitted pass by pass, each pass's
        dead letters before its outputs: a run of dead letters is counted as the records came out of
        the model, not joined across passes.
        """
        if not self._collected:
            return
        current = self._current
        decided: list[Pending] = []
        rows: list[np.ndarray] = []
        # Per pass: the records the model failed on (with the error), and how many were decided.
        passes: list[tuple[list[tuple[Pending, str | None]], int]] = []
        while self._collected:
            result = self._collected.popleft()
            failed: list[tuple[Pending, str | None]] = []
            picked: list[int] = []
            for i, pending in enumerate(result.items):
                record = pending.record
                if not current((record.topic, record.partition), pending.generation):
                    continue  # revoked or rewound since; read again
                if result.errors[i] is not None or result.probs is None:
                    failed.append((pending, result.errors[i]))
                    continue
                decided.append(pending)
                picked.append(i)
            if picked:
                assert result.probs is not None
                rows.append(result.probs if len(picked) == len(result.items) else result.probs[picked])
            passes.append((failed, len(picked)))
        outputs: list[Outgoing] = []
        if decided:
            probs = rows[0] if len(rows) == 1 else np.concatenate(rows)
            if self._cache is not None:
                for pending, row in zip(decided, probs, strict=True):
                    if pending.cache_key is not None:
                        self._cache.put(pending.cache_key, row, pending.truncated)
                self._metrics.cache_records.labels("miss").inc(len(decided))
            outputs = self._decide(decided, probs)
        start = 0
        for failed, count in passes:
            for pending, error in failed:
                failure = DecodeFailure("model_error", f"the model failed on this record: {error}")
                self._dead_letter(pending.record, pending.generation, failure)
            if count:
                self._emit(outputs[start : start + count])
                start += count

    def _answer(self, answered: list[Answered]) -> None:
        if answered:
            self._metrics.cache_records.labels("hit").inc(len(answered))
            self._emit(self._decide(answered, np.stack([item.probs for item in answered])))

    def _answer_buffered_repeats(self) -> None:
        """Decide buffered records whose text a finished batch just classified, instead of classifying it again.

        A campaign's copies arrive together, so many are already buffered when its first copy returns.
        """
        cache = self._cache
        if cache is None or not len(self._buffer):
            return
        answered = []
        for pending in self._buffer.extract(lambda p: p.cache_key is not None and p.cache_key in cache):
            hit = cache.get(pending.cache_key)  # type: ignore[arg-type]  # not None: extracted for it
            assert hit is not None
            answered.append(
                Answered(
                    pending.record, pending.generation, hit.probs, hit.truncated, pending.document, pending.embed_into
                )
            )
        self._answer(answered)

    def _decide(self, items: Sequence[Classified], probs: np.ndarray) -> list[Outgoing]:
        """Decide a batch under the current rules and count it."""
        decider = self.decider
        outputs, decisions = decider.classified(items, probs)
        self._observer.observe(probs, decisions, decider.router)
        if decider.shadow:
            for action, count in Counter(d.action for d in decisions).items():
                self._metrics.shadow_decisions.labels(action).inc(count)
        if self.candidate is not None:
            outputs = self._compare(self.candidate, items, decisions, outputs)
        return outputs

    def _compare(
        self, candidate: Candidate, items: Sequence[Classified], decisions: Sequence[Decision], outputs: list[Outgoing]
    ) -> list[Outgoing]:
        """The candidate decides the same records; counted, a sample of disagreements copied for review.

        A candidate that fails never holds up the live decisions: they are emitted as they are.
        """
        try:
            comparison = candidate.compare(items, decisions, outputs)
        except Exception as exc:  # noqa: BLE001 - the shadow model must not stop the live one
            self._metrics.candidate_failures.inc(len(items))
            log.warning("the candidate model failed on a batch; the live decisions stand", error=str(exc))
            return outputs
        metrics = self._metrics
        metrics.candidate_records.inc(len(items))
        metrics.candidate_seconds.inc(comparison.seconds)
        for action, count in Counter(comparison.actions).items():
            metrics.candidate_decisions.labels(action).inc(count)
        for pair, count in comparison.disagreements.items():
            metrics.candidate_disagreements.labels(pair).inc(count)
        metrics.candidate_review_copies.inc(comparison.drawn)
        return comparison.outputs

    def _dead_letter(self, record: InputRecord, generation: int, failure: DecodeFailure) -> None:
        fields: dict[str, Any] = {"error": failure.error, "reason": failure.reason}
        if self._log_text:  # message content is private unless the operator opts in
            fields["value"] = (record.value or b"")[:200].decode("utf-8", "replace")
        log.warning(
            "dead-lettering record", topic=record.topic, partition=record.partition, offset=record.offset, **fields
        )
        self._emit([self.decider.failed(record, generation, failure)])
