"""Forward passes on their own threads, with failures isolated to the records that cause them.

The Kafka loop must keep polling while the model computes (heartbeats, delivery reports, the next
batch's decoding and tokenization), so forward passes run on background threads fed by a queue:
one, or one per stream of an engine that runs several passes at once (FILTER_MODEL__STREAMS). torch
releases the GIL inside its kernels, and ONNX Runtime and OpenVINO for a whole pass, so the loop and
the passes really overlap.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from filter_worker.pipeline.batching import padded_tokens, plan_batches

T = TypeVar("T")

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). Eager
# PyTorch releases the GIL inside each kernel and takes it back between ops, hundreds of times a
# pass; with the default, every take-back can wait up to 5 ms behind the Kafka thread's Python work,
# which at bfloat16 (kernels of a few hundred microseconds) costs more than the kernels. Measured
# beside a busy Python thread (one intra-op thread, 16 rows, bfloat16 on AMX): 4.4x the pass time
# alone at 5 ms, 1.7x at 0.2 ms (docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.0002
# How long ``close`` waits for the model threads to finish their passes, all of them together.
_CLOSE_WAIT_S = 5.0
# The model thread's name: what profiles and the bench tell it by.
INFERENCE_THREAD = "inference"
Predict = Callable[[Sequence[Sequence[int]]], np.ndarray]
# Called after every forward pass with (rows, padded tokens, real tokens, seconds): metrics.
Observe = Callable[[int, int, int, float], None]


def infer_resilient(predict: Predict, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray | None, list[str | None]]:
    """Run ``predict`` on ``rows``; on an exception, halve and retry down to single rows.

    Returns probabilities (a row of NaN where a record failed on its own) and per-row error texts.
    A CUDA out-of-memory on a big batch thus costs a few smaller passes instead of the whole batch.
    The halves wait on a stack rather than in a recursive closure: a closure that calls itself is a
    reference cycle, and one per pass kept every pass's token rows alive until the garbage collector
    found them (a tenth of a second's collections per 50 000 records on the loop's thread).
    """
    errors: list[str | None] = [None] * len(rows)
    probs: np.ndarray | None = None
    todo = [list(range(len(rows)))]
    while todo:
        indices = todo.pop()
        try:
            out = predict([rows[i] for i in indices])
        except Exception as exc:  # noqa: BLE001 - any model failure is contained here
            if len(indices) == 1:
                errors[indices[0]] = f"{type(exc).__name__}: {exc}"
                _release_cached_memory()
                continue
            half = len(indices) // 2
            todo += [indices[half:], indices[:half]]  # the first half runs first
            continue
        if len(indices) == len(rows):
            return np.asarray(out, dtype=np.float32), errors  # the whole batch in one pass: the common case
        if probs is None:
            probs = np.full((len(rows), out.shape[1]), np.nan, dtype=np.float32)
        probs[indices] = out
    return probs, errors


def _release_cached_memory() -> None:
    """After an out-of-memory error, give cached CUDA blocks back so smaller batches can fit."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@dataclass(slots=True)
class Result(Generic[T]):
    """One forward pass: probabilities for ``items`` in their order; ``errors[i]`` set where item i failed.

    ``last`` marks the final pass of a submitted batch.
    """

    items: list[T]
    probs: np.ndarray | None
    errors: list[str | None]
    last: bool


class InferenceThread(Generic[T]):
    """Runs submitted batches through the model: ``workers`` at a time, each batch on one thread.

    A submitted batch may take several forward passes (cut by length, see ``plan_batches``); each
    pass's result is handed back as soon as it ends, so short records are published while the long
    ones of the same batch are still in the model. With one worker, batches run in submission order;
    with several, a batch's passes stay in order but batches may finish out of order, as records of a
    batch cut by length already do: offsets are tracked per record.
    """

    def __init__(
        self,
        predict: Predict,
        ids_of: Callable[[T], Sequence[int]],
        max_size: int,
        max_tokens: int,
        capacity: int = 2,
        observe: Observe | None = None,
        workers: int = 1,
    ) -> None:
        """``capacity``: batches in flight with one worker, the running one included; each further worker
        adds one. Not ``capacity`` each: a pass on one stream of several takes that many times as long,
        and what is queued must be finished when partitions are revoked or the worker stops."""
        self._predict = predict
        self._observe = observe
        self._ids_of = ids_of
        self._max_size = max_size
        self._max_tokens = max_tokens
        self._capacity = capacity + workers - 1
        self.workers = workers
        self._inbox: queue.Queue[list[T] | None] = queue.Queue()
        self._outbox: queue.Queue[Result[T] | BaseException] = queue.Queue()
        self._in_flight = 0  # batches submitted minus those whose last pass was collected; submitting thread only
        # Process-wide, set where the thread that needs it starts.
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self._threads = [
            threading.Thread(target=self._serve, name=INFERENCE_THREAD, daemon=True) for _ in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_size(self) -> int:
        """The most records one forward pass takes."""
        return self._max_size

    def has_capacity(self) -> bool:
        return self._in_flight < self._capacity

    def submit(self, items: list[T]) -> None:
        self._in_flight += 1
        self._inbox.put(items)

    def completed(self, timeout_s: float = 0.0) -> list[Result[T]]:
        """Finished passes, oldest first; waits up to ``timeout_s`` for the first one. Re-raises a thread crash."""
        finished: list[Result[T]] = []
        block = timeout_s > 0
        while self._in_flight:
            try:
                result = self._outbox.get(block=block, timeout=timeout_s if block else None)
            except queue.Empty:
                break
            block = False
            if isinstance(result, BaseException):
                self._in_flight -= 1
                raise result
            if result.last:
                self._in_flight -= 1
            finished.append(result)
        return finished

    def close(self) -> None:
        """Stop every worker thread after its current pass; waits at most ``_CLOSE_WAIT_S`` in all."""
        for _ in self._threads:
            self._inbox.put(None)
        deadline = time.monotonic() + _CLOSE_WAIT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        while (items := self._inbox.get()) is not None:
            try:
                for result in self._run(items):
                    self._outbox.put(result)
            except BaseException as exc:  # noqa: BLE001 - handed to the Kafka loop, which stops the worker
                self._outbox.put(exc)

    def _run(self, items: list[T]) -> Iterator[Result[T]]:
        rows = [self._ids_of(item) for item in items]
        lengths = [len(r) for r in rows]
        groups = plan_batches(lengths, self._max_size, self._max_tokens)
        for n, group in enumerate(groups, start=1):
            group = sorted(group)  # arrival order within the pass
            started = time.perf_counter()
            probs, errors = infer_resilient(self._predict, [rows[i] for i in group])
            if self._observe is not None:
                real = sum(lengths[i] for i in group)
                self._observe(len(group), padded_tokens(lengths, [group]), real, time.perf_counter() - started)
            yield Result([items[i] for i in group], probs, errors, last=n == len(groups))
