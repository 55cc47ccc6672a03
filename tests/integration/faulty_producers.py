"""Real producers with one broker answer replaced, for faults the embedded broker cannot be made to show.

Tansu enforces no topic-level ``max.message.bytes``, no ACLs, and accepts records for deleted topics, so
a refusal *after* a record was queued cannot be provoked on it. These subclasses of the real producer
stand in for that one answer only: every other record, transaction and offset goes to the real
broker. They behave as Kafka does: a refused record's delivery report carries the error, and a
transaction holding one cannot commit (``commit_transaction`` raises an abortable error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from confluent_kafka import KafkaError, KafkaException, Producer

# (topic, value) -> the error the "broker" answers, or None to let the record through.
Refusal = Callable[[str, bytes | None], KafkaError | None]


class RefusingProducer(Producer):
    refuse: ClassVar[Refusal] = staticmethod(lambda _topic, _value: None)
    refused: ClassVar[list[str]] = []  # topics of the refused records, in order

    def __init__(self, config: dict[str, object]) -> None:
        super().__init__(config)
        self._reports: list[tuple[Callable[..., None], KafkaError]] = []
        self._doomed: KafkaError | None = None

    def produce(self, topic: str, *args: Any, on_delivery: Callable[..., None] | None = None, **kwargs: Any) -> None:
        err = type(self).refuse(topic, kwargs.get("value"))
        if err is None:
            super().produce(topic, *args, on_delivery=on_delivery, **kwargs)
            return
        type(self).refused.append(topic)
        self._doomed = self._doomed or err
        if on_delivery is not None:
            self._reports.append((on_delivery, err))

    def _report(self) -> None:
        reports, self._reports = self._reports, []
        for callback, err in reports:
            callback(err, None)

    def poll(self, *args: Any) -> int:
        self._report()
        return super().poll(*args)

    def flush(self, *args: Any) -> int:
        self._report()
        return super().flush(*args)

    def __len__(self) -> int:
        return super().__len__() + len(self._reports)

    def begin_transaction(self) -> None:
        self._doomed = None
        super().begin_transaction()

    def commit_transaction(self, *args: Any) -> None:
        self._report()
        if self._doomed is not None:
            err = self._doomed
            raise KafkaException(KafkaError(err.code(), f"a record failed: {err.str()}", txn_requires_abort=True))
        super().commit_transaction(*args)

    def abort_transaction(self, *args: Any) -> None:
        self._reports.clear()
        self._doomed = None
        super().abort_transaction(*args)


class CommitFailsOnce(Producer):
    """A real transactional producer whose first commit raises ``error`` (abortable, or retriable)."""

    error: ClassVar[KafkaError] = KafkaError(
        KafkaError._MSG_TIMED_OUT, "injected: a record of this transaction timed out", txn_requires_abort=True
    )
    failed: ClassVar[list[int]] = []  # records produced in the transaction whose commit failed

    def __init__(self, config: dict[str, object]) -> None:
        super().__init__(config)
        self.in_transaction = 0

    def begin_transaction(self) -> None:
        self.in_transaction = 0
        super().begin_transaction()

    def produce(self, *args: Any, **kwargs: Any) -> None:
        super().produce(*args, **kwargs)
        self.in_transaction += 1

    def commit_transaction(self, *args: Any) -> None:
        if not type(self).failed:
            type(self).failed.append(self.in_transaction)
            raise KafkaException(type(self).error)
        super().commit_transaction(*args)


class NonIdempotentProducer(Producer):
    """The worker's producer with idempotence off, which the worker's settings refuse.

    For the one test that replaces the broker with an empty one: librdkafka's idempotent producer
    retries UNKNOWN_PRODUCER_ID forever against a cluster that forgot its producer ids, so that test
    can only show the rest of the worker (rejoining, routing the new broker's records) without it.
    """

    def __init__(self, config: dict[str, object]) -> None:
        super().__init__({**config, "enable.idempotence": False})
