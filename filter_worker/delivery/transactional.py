"""Exactly-once: outputs and consumed offsets commit atomically in Kafka transactions.

Outputs are held per partition and released into the open transaction in offset order, so the offsets
sent with it are an exact cut: every record below them has its output in this or an earlier
transaction, none above. A transaction is committed every ``FILTER_KAFKA__COMMIT_INTERVAL_MS`` (or at
once when the worker has caught up), following librdkafka's transactional rules:

- Committing freezes the transaction: nothing more is released into it. Its offsets are sent, then it
  is committed. A retriable error of either call is resumed by calling *that call* again on the next
  turn, and nothing else: after a commit timed out librdkafka refuses new records (``_STATE``), new
  offsets and an abort (``_CONFLICT``) until the commit finished. An abort wanted meanwhile waits for
  the resumed commit (which commits, or fails abortably and may then be aborted); an abort that timed
  out is resumed too.
- An abortable error (a record the broker refused, a timed-out request) aborts the transaction, and
  every owned partition is rewound to its first uncommitted record (its last committed offset, or the
  first offset consumed since it was assigned: never where ``auto.offset.reset`` points).
- Anything else (fenced by a newer incarnation, a fatal client error) stops the worker (exit 1).

A record refused for what it is comes back after the rewind and is replaced by its fallback (its dead
letter, cut to fit if need be: see ``publisher.py``) until its offset is committed. Such an abort
is progress (the record is not refused again), so it is neither counted nor backed off; other aborts in
a row are counted and backed off (fetching paused, not ready); past ``FILTER_KAFKA__MAX_ABORTS`` the
worker stops instead of looping. A copy for review that ``produce()`` refuses before queueing it never
entered the transaction: it is dropped, and nothing aborts. Outputs count as published when their
transaction commits, not when the broker acknowledges them inside it. Once the worker stops or closes,
no transaction begins.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from filter_worker.delivery.calls import TransactionalCalls
from filter_worker.delivery.committer import TP, Committer
from filter_worker.delivery.publisher import REVIEW, count_published
from filter_worker.exit_codes import FatalError
from filter_worker.logs import get_logger
from filter_worker.pipeline.records import InputRecord, Outgoing

log = get_logger(__name__)

# The timeout given to each transactional call (send offsets, commit, abort, init). librdkafka may
# outlive it (60 s measured for send_offsets_to_transaction with the broker gone), so the calls run on
# a helper thread (``calls.py``) and the loop waits on one at most ``_TURN_WAIT_S`` a turn. Not the
# transaction's own timeout (librdkafka's transaction.timeout.ms), and not the shutdown deadline.
CALL_TIMEOUT_S = 10.0
# How long the loop waits on a running transactional call per turn before serving everything else.
_TURN_WAIT_S = 0.5
# A call running this much longer than its timeout: the log says so, and the worker is not ready.
_OVERDUE_S = 1.0
# Sending offsets (or aborting) for this long: the producer is replaced. After a 20 s outage of every
# connection, librdkafka 2.16 was seen to block in send_offsets_to_transaction for good (over 3 minutes,
# with the broker back and the consumer's group rejoined). Neither call can have committed anything, so
# a new producer with the same transactional id (which fences the old one and has the broker abort its
# transaction) and a rewind to the last commit lose and repeat nothing. A commit whose outcome is
# unknown is never given up on this way: it may have committed.
_REPLACE_AFTER_S = 30.0
_REPLACEABLE_CALLS = frozenset({"send_offsets", "abort"})
# The abort on close: the broker aborts a transaction left open once transaction.timeout.ms passes anyway.
_CLOSE_ABORT_S = 1.0
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
# While a stop or revocation waits for deliveries, how long one poll of the producer may block.
_SETTLE_POLL_S = 0.05


class Phase(Enum):
    IDLE = "idle"  # no transaction
    OPEN = "open"  # begun; outputs are released into it
    SENDING = "sending"  # frozen: its offsets are being sent
    COMMITTING = "committing"  # frozen: offsets sent, commit_transaction called (and to be called again)
    ABORTING = "aborting"  # abort_transaction called and timed out (to be called again)


class Transactional(Committer):
    """``new_producer`` makes a producer like the first, for when a transactional call never returns."""

    def __init__(self, *args: Any, new_producer: Callable[[], Producer] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._new_producer = new_producer
        self._initialised = False  # init_transactions done on the current producer
        self.phase = Phase.IDLE
        self._held: dict[TP, dict[int, Outgoing]] = {}  # decided, waiting for their turn
        self._unreleased: dict[TP, deque[int]] = {}  # consumed offsets not yet released, in order
        self._released: dict[TP, int] = {}  # one past the last offset released into the open transaction
        self._delivered: list[Outgoing] = []  # acknowledged inside the open transaction: counted at commit
        # A delivery failed, so the open transaction must be aborted: the error and what failed.
        self._doomed: tuple[KafkaError, str] | None = None
        # An abort that must wait for its call to be resumed: why, and whether it counts as a failure in a row.
        self._pending_abort: tuple[KafkaError, str, bool] | None = None
        self._aborts = 0  # in a row, since the last successful commit
        # The open transaction holds a record refused for what it is, now replaced (or published without
        # its copy for review) when read again: its abort is progress, not a failure in a row.
        self._learned = False
        self._resume_at = 0.0
        self._ended = False  # stopped or closed: no transaction may begin
        self._calls = TransactionalCalls(self._clock)

    # -- records ----------------------------------------------------------------------------------

    def assign(self, tps: list[TP]) -> None:
        super().assign(tps)
        for tp in tps:
            self._held[tp], self._unreleased[tp] = {}, deque()

    def track(self, record: InputRecord) -> int | None:
        generation = super().track(record)
        if generation is not None:
            self._unreleased[(record.topic, record.partition)].append(record.offset)
        return generation

    def publish(self, item: Outgoing) -> None:
        source = item.source
        tp = (source.topic, source.partition)
        if self.tracker.is_current(tp, item.generation):
            self._held[tp][source.offset] = item

    def fetch_paused(self) -> bool:
        return self._clock() < self._resume_at

    # -- the loop ---------------------------------------------------------------------------------

    def poll(self, caught_up: bool) -> bool:
        self._publisher.poll(0)
        if self._failures.failure is not None:  # never commit past a record that could not be published
            return False
        if not self._initialised:  # a replaced producer registers its transactional id first
            self._initialise()
            return False
        if self.phase in (Phase.SENDING, Phase.COMMITTING, Phase.ABORTING):
            if self._new_producer is not None and self._stuck_for_good():
                return self._replace_producer()
            return self._resume(_TURN_WAIT_S)  # nothing else may be called meanwhile
        if self._doomed is not None:
            return self._abort(*self._doomed)
        if self.fetch_paused():
            return False
        self._release()
        settled = caught_up and not any(self._unreleased.values())
        if self.phase is Phase.OPEN and self.commit_due(settled):
            return self._commit(_TURN_WAIT_S)
        return False

    def _resume(self, wait_s: float) -> bool:
        """Wait on the transactional call still running, or call again the one that failed retriably;
        ``True`` when an abort rewound.

        A commit that must be resumed is resumed even when an abort is wanted meanwhile (a record's
        refusal reported after the commit timed out): librdkafka refuses the abort until the commit
        ends, and it ends in an abortable error if a record failed. Offsets still being sent when an
        abort is wanted (lost partitions) are not committed: the abort follows the send.
        """
        if self.phase is Phase.ABORTING or (self.phase is Phase.SENDING and self._pending_abort is not None):
            assert self._pending_abort is not None, "an abort waits only with its reason"
            return self._abort(*self._pending_abort, wait_s=wait_s)
        rewound = self._commit(wait_s)
        if self.phase is Phase.IDLE and self._pending_abort is not None and not rewound:
            self._pending_abort = None  # the commit succeeded: nothing is left to abort
        return rewound

    def _releasable(self) -> bool:
        """Some held output is next in its partition's offset order."""
        return any(order and order[0] in self._held[tp] for tp, order in self._unreleased.items())

    def _release(self) -> None:
        """Produce held outputs that are next in their partition's offset order, into the open transaction.

        Stops at a record that could not be published at all (the failure slot is set): nothing after it
        may go into a transaction that could still commit.
        """
        for tp, order in self._unreleased.items():
            held = self._held[tp]
            while order and order[0] in held and self._failures.failure is None:
                if self.phase is Phase.IDLE and not self._begin():
                    return
                offset = order.popleft()
                self._deliver(self._publisher.replacement(held.pop(offset)))
                self._released[tp] = offset + 1

    def _begin(self) -> bool:
        """Open a transaction; ``False`` when none may begin now (ended, or a retriable failure: next turn)."""
        if self._ended or not self._initialised:
            return False
        try:
            self._publisher.producer.begin_transaction()
        except KafkaException as exc:
            err = exc.args[0]
            if err.retriable() and not err.fatal():
                log.warning("could not begin a transaction; retrying", error=err.str())
            else:
                self._failures.set(FatalError(f"could not begin a transaction: {err.str()}"))
            return False
        self.phase = Phase.OPEN
        self._last_commit = self._clock()
        return True

    def _commit(self, wait_s: float) -> bool:
        """Freeze the open transaction, send its offsets and commit it, waiting at most ``wait_s`` on a call.

        Resumes where the last try stopped (a call still running is waited on again). ``True`` when an
        abort rewound the partitions.
        """
        producer = self._publisher.producer
        if self._failures.failure is not None:  # never commit past a record that could not be published
            return False
        if self.phase is Phase.OPEN:
            if self._publisher.backlog:  # not every released record is queued yet
                return False
            self._publisher.settle()  # refusals reported by produce itself doom the transaction now
            if self._doomed is not None:
                return self._abort(*self._doomed)
            self.phase = Phase.SENDING
        if self.phase is Phase.SENDING:
            if self._released:
                offsets = self._partitions(self._released)
                group = self._consumer.consumer_group_metadata()
                try:
                    sent = self._calls.run(
                        "send_offsets",
                        lambda: producer.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT_S),
                        wait_s,
                    )
                except KafkaException as exc:
                    return self._call_failed(exc.args[0], "sending the transaction's offsets")
                if not sent:
                    return self._still_running()
            self.phase = Phase.COMMITTING
        try:
            committed = self._calls.run("commit", lambda: producer.commit_transaction(CALL_TIMEOUT_S), wait_s)
        except KafkaException as exc:
            return self._call_failed(exc.args[0], "committing the transaction")
        if not committed:
            return self._still_running()
        self._committed_transaction()
        return False

    def _stuck_for_good(self) -> bool:
        """Offsets being sent (or an abort) for longer than librdkafka ever returns from them normally."""
        return self._calls.running in _REPLACEABLE_CALLS and self._calls.running_for() > _REPLACE_AFTER_S

    def _replace_producer(self) -> bool:
        """Give up a producer stuck in a call that cannot have committed: a new one takes its transactional
        id (the broker aborts the old one's transaction), every owned partition is re-read from its last
        commit. The stuck call's thread keeps the old producer until it returns, if ever. ``True``: rewound."""
        assert self._new_producer is not None
        log.warning(
            "a transactional call never returned; the producer is replaced and the partitions are re-read "
            "from the last commit",
            call=self._calls.running,
            waited_s=round(self._calls.running_for(), 1),
        )
        self._calls = TransactionalCalls(self._clock)
        self._publisher.replace_producer(self._new_producer())
        self._initialised = False
        self.phase = Phase.IDLE
        self._released.clear()
        self._delivered.clear()
        self._doomed = self._pending_abort = None
        self._learned = False
        self._metrics.transaction_aborts.inc()
        self._health.publishing = False
        self._rewind()
        return True

    def _still_running(self) -> bool:
        """A transactional call outlives this turn's wait: the loop goes on and waits on it next turn.

        Past its own timeout (librdkafka does not always keep it) nothing can commit until it returns:
        the worker says so once and is not ready meanwhile.
        """
        waited = self._calls.overdue(CALL_TIMEOUT_S + _OVERDUE_S)
        if waited is not None:
            self._health.publishing = False
            log.warning(
                "a transactional call outlived its timeout; the loop goes on and waits for it",
                call=self._calls.running,
                waited_s=round(waited, 1),
                timeout_s=CALL_TIMEOUT_S,
            )
        return False

    def init_transactions(self) -> bool:
        """One turn of registering the transactional id (it fences a previous incarnation and aborts its
        open transaction): ``True`` once done, ``False`` while it runs or after a retriable failure (call
        again); a failure that cannot be retried is a ``FatalError``."""
        producer = self._publisher.producer
        try:
            self._initialised = self._calls.run(
                "init", lambda: producer.init_transactions(CALL_TIMEOUT_S), _TURN_WAIT_S
            )
            return self._initialised
        except KafkaException as exc:
            err = exc.args[0]
            if not err.retriable():
                raise FatalError(f"could not initialise transactions: {err.str()}") from None
            log.warning("retrying transaction initialisation", error=err.str())
            return False

    def _initialise(self) -> None:
        """A turn of ``init_transactions`` for a replaced producer; a failure that cannot be retried stops
        the worker."""
        try:
            self.init_transactions()
        except FatalError as exc:
            self._failures.set(exc)

    def _committed_transaction(self) -> None:
        """The transaction committed: its offsets are committed, what was delivered in it is published."""
        self._publisher.settle()  # the reports its flush brought: counted with this transaction
        offsets = dict(self._released)
        delivered, self._delivered = self._delivered, []
        count_published(self._metrics, delivered)
        self.phase = Phase.IDLE
        self._released.clear()
        self._last_commit = self._clock()
        self.tracker.committed(offsets)
        self._publisher.forget_replacements(lambda key: key[2] >= offsets.get((key[0], key[1]), 0))
        self._metrics.commits.inc()
        self._aborts = 0
        self._learned = False
        self._health.publishing = True

    def _call_failed(self, err: KafkaError, what: str) -> bool:
        self._metrics.commit_failures.inc()
        if err.txn_requires_abort():
            self.phase = Phase.ABORTING  # the failed call ended: an abort is what librdkafka takes now
            return self._abort(err, f"{what} failed")
        if err.retriable() and not err.fatal():
            log.warning(f"{what} failed; the same call is resumed", error=err.str(), phase=self.phase.value)
            return False
        self._failures.set(FatalError(f"{what} failed and cannot be retried: {err.str()}"))
        return False

    # -- delivery reports -------------------------------------------------------------------------

    def acknowledged(self, items: list[Outgoing]) -> None:
        self._acknowledge(items, self._delivered)  # counted as published when their transaction commits

    def refused(self, item: Outgoing, err: KafkaError, queued: bool = True) -> None:
        """A queued output failed: its transaction is doomed; a record-level refusal is replaced when it comes back.

        A report can arrive after its transaction was aborted (inside ``commit_transaction``'s flush, say):
        the record still comes back, so its replacement is registered while the partition is owned; only
        a refusal of the current generation dooms the open transaction. A copy for review that produce()
        refused before queueing it never entered the transaction: it is dropped and nothing aborts (an
        abort would learn nothing, and the same copy would be refused again after the rewind).
        """
        source = item.source
        tp = (source.topic, source.partition)
        if self.tracker.generation(tp) is None:
            return  # revoked: the next owner reads the record and decides afresh
        if not queued and self._review_refused(item, err):
            self.tracker.ack(tp, source.offset, item.generation)  # the routed output alone settles its record
            return
        learned = False
        if item.action == REVIEW:
            if self._review_refused(item, err):
                self._publisher.refuse_review(item)
                learned = True
        else:
            fallback = self._publisher.fallback(item, err)
            if fallback is not None:
                self._publisher.replace_later(fallback)
                learned = True
        if self.tracker.is_current(tp, item.generation):
            self._learned = self._learned or learned
            if self._doomed is None:
                self._doomed = (err, f"{item.out.topic} refused {source.source}")

    def committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Never called: offsets are committed by the transaction, not by the consumer."""

    # -- aborts -----------------------------------------------------------------------------------

    def _abort(self, err: KafkaError, cause: str, counted: bool = True, wait_s: float = _TURN_WAIT_S) -> bool:
        """Abort the open transaction and re-read every owned partition from its first uncommitted record.

        ``counted``: a failure that may repeat (backed off, and bounded by FILTER_KAFKA__MAX_ABORTS),
        unlike an abort for revoked or lost partitions. ``True`` when the partitions were rewound;
        ``False`` when the abort waits for a call to be resumed (the next turns resume it), when the
        transaction committed after all (a resumed commit), or when the worker must stop. ``wait_s``: the
        longest it waits on a transactional call.
        """
        self._doomed = None
        ended = self._end_by_abort(wait_s)
        if ended != "aborted":
            self._pending_abort = (err, cause, counted) if ended == "pending" else None
            return False
        self._pending_abort = None
        self._metrics.transaction_aborts.inc()
        rewound = self._rewind()
        error = f"{cause}: {err.str()}"
        learned, self._learned = self._learned, False
        if not counted or learned:
            reason = "records refused for what they are are replaced when read again" if learned else cause
            log.warning("transaction aborted; re-reading from the last commit", error=error, why=reason)
            return True
        self._aborts += 1
        if self._aborts > self._settings.max_aborts:
            self._failures.set(
                FatalError(
                    f"{self._aborts} transactions in a row were aborted (FILTER_KAFKA__MAX_ABORTS="
                    f"{self._settings.max_aborts}); the last because {error}"
                )
            )
            return True
        backoff = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (self._aborts - 1))
        self._resume_at = self._clock() + backoff
        self._health.publishing = False
        log.warning(
            "transaction aborted; re-reading from the last commit after a backoff",
            error=error,
            aborts_in_a_row=self._aborts,
            backoff_s=backoff,
            rewound=[f"{t}/{p}@{o}" for (t, p), o in rewound],
        )
        return True

    def _end_by_abort(self, wait_s: float) -> str:
        """End the open transaction by aborting it: ``"aborted"`` (or none was open), ``"committed"``,
        ``"pending"`` (a call must be resumed first), or ``"failed"`` (the worker stops).

        librdkafka allows nothing but the resumed call after a retriable error: a commit that timed
        out is resumed (it commits, or fails abortably and then may be aborted), and an abort that
        timed out is called again. Offsets still being sent are waited for (their outcome does not
        matter: the transaction is aborted). A call still running after ``wait_s`` is ``"pending"``.
        Whatever the transaction held, the publisher's backlog included, is forgotten once it is aborted.
        """
        producer = self._publisher.producer
        if self.phase is Phase.IDLE:
            return "aborted"
        if self.phase is Phase.COMMITTING:
            try:
                if not self._calls.run("commit", lambda: producer.commit_transaction(CALL_TIMEOUT_S), wait_s):
                    self._still_running()
                    return "pending"
            except KafkaException as exc:
                err = exc.args[0]
                if not err.txn_requires_abort():
                    if err.retriable() and not err.fatal():
                        return "pending"
                    self._failures.set(FatalError(f"committing the transaction failed: {err.str()}"))
                    return "failed"
            else:
                self._committed_transaction()
                return "committed"
        elif self.phase is Phase.SENDING and not self._calls.wait_idle(wait_s):
            self._still_running()
            return "pending"
        self.phase = Phase.ABORTING
        try:
            if not self._calls.run("abort", lambda: producer.abort_transaction(CALL_TIMEOUT_S), wait_s):
                self._still_running()
                return "pending"
        except KafkaException as exc:
            err = exc.args[0]
            if err.retriable() and not err.fatal():
                log.warning("aborting the transaction failed; the abort is resumed", error=err.str())
                return "pending"
            self._failures.set(FatalError(f"could not abort the transaction: {err.str()}"))
            return "failed"
        self.phase = Phase.IDLE
        self._released.clear()
        self._delivered.clear()
        self._publisher.clear_backlog()
        return "aborted"

    def _rewind(self) -> list[tuple[TP, int]]:
        """Seek every owned partition back to its first uncommitted record; drop what was held."""
        rewound = []
        for tp in self.tracker.assigned():
            position = self.tracker.rewind(tp)
            self._held[tp], self._unreleased[tp] = {}, deque()
            if position is not None:
                self._consumer.seek(TopicPartition(tp[0], tp[1], position))
                rewound.append((tp, position))
        self._rewound(rewound)
        return rewound

    # -- revocation, stop, close ------------------------------------------------------------------

    def revoke(self, tps: list[TP], deadline: float) -> bool:
        """Commit everything released in order; what cannot be committed by ``deadline`` is aborted (read again).

        A transaction spans every owned partition: one is begun here if decided outputs wait and none
        is open, and none is left open; the partitions kept are rewound after an abort.
        """
        settled = self._failures.failure is None and self._settle(deadline)
        self.forget(tps)
        if not settled and self.phase is not Phase.IDLE and self._failures.failure is None:
            self._abort(KafkaError(KafkaError._TIMED_OUT, "revocation deadline"), "revoked", counted=False)
        return settled

    def lost(self, tps: list[TP]) -> bool:
        """Their outputs in the open transaction must not commit: abort it, rewind the partitions kept."""
        self.forget(tps)
        if self.phase is Phase.IDLE:
            return False
        return self._abort(KafkaError(KafkaError._STATE, "partitions lost"), "lost", counted=False)

    def finish(self, deadline: float) -> bool:
        """Graceful stop: commit what is released in order; past ``deadline`` abort and commit nothing.

        Records buffered above every decided one were never released: they are the next owner's, not a
        missed deadline. No transaction begins after this.
        """
        committed = self._failures.failure is None and self._settle(deadline)
        self._ended = True
        if not committed and self._failures.failure is None:
            committed = self._end_by_abort(_CLOSE_ABORT_S) == "committed" and not self._releasable()
        return committed

    def _settle(self, deadline: float) -> bool:
        """Release what is in order and commit it, resuming until ``deadline``; ``True`` once every
        output decided in order is committed."""
        while self._clock() < deadline and self._failures.failure is None:
            self._publisher.poll(0)
            wait_s = min(_TURN_WAIT_S, max(0.001, deadline - self._clock()))
            if self.phase in (Phase.SENDING, Phase.COMMITTING, Phase.ABORTING):
                if self._resume(wait_s) or self.phase is Phase.ABORTING:
                    return False  # aborted, or an abort waits for its call
                if self.phase is not Phase.IDLE:
                    self._publisher.poll(_SETTLE_POLL_S)
                continue  # committed: release what was decided meanwhile
            if self._doomed is not None:
                self._abort(*self._doomed)
                return False
            if not self._initialised:  # a replaced producer: nothing begins before it is registered
                if not self._releasable():
                    return True
                self._initialise()
                continue
            self._release()
            if self.phase is Phase.IDLE:
                if not self._releasable():
                    return True
                if self._ended:
                    return False
                self._publisher.poll(_SETTLE_POLL_S)  # a transaction could not begin: try again
                continue
            if self._commit(wait_s):
                return False  # aborted
            if self.phase is not Phase.IDLE:
                self._publisher.poll(_SETTLE_POLL_S)
        return False

    def close(self) -> None:
        """End a transaction still open (after a failure); none begins after this. Never raises."""
        self._ended = True
        if self.phase is Phase.IDLE:
            return
        try:
            ended = self._end_by_abort(_CLOSE_ABORT_S)
        except KafkaException as exc:
            ended = str(exc)
        if ended not in ("aborted", "committed"):
            log.warning("could not end the open transaction; the broker aborts it on timeout", outcome=ended)

    def forget(self, tps: list[TP]) -> None:
        super().forget(tps)
        for tp in tps:
            self._held.pop(tp, None)
            self._unreleased.pop(tp, None)
            self._released.pop(tp, None)
