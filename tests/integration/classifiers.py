"""The real test classifier with a changed forward pass: slow, or failing on a chosen token."""

from __future__ import annotations

import threading
import time

from filter_worker.model.classifier import Classifier


class SlowClassifier:
    """The real classifier with a slow forward pass: the model is the bottleneck by far."""

    def __init__(self, inner: Classifier, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    def predict(self, batch):
        time.sleep(self._seconds)
        return self._inner.predict(batch)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class FailingClassifier(SlowClassifier):
    """Raises like a CUDA out-of-memory on any batch holding the ``poison_id`` token."""

    def __init__(self, inner: Classifier, poison_id: int) -> None:
        super().__init__(inner, seconds=0.0)
        self._poison_id = poison_id

    def predict(self, batch):
        if any(self._poison_id in row for row in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict(batch)


class GatedClassifier(SlowClassifier):
    """Each forward pass waits until the test lets it run: a model stuck for exactly as long as a test needs.

    ``release(n)`` lets ``n`` more passes run; ``open()`` lets every pass run from then on. ``waiting``
    counts passes that reached the gate, so a test knows which pass the worker is blocked on.
    """

    def __init__(self, inner: Classifier) -> None:
        super().__init__(inner, seconds=0.0)
        self._tokens = threading.Semaphore(0)
        self._open = threading.Event()
        self.waiting = 0

    def predict(self, batch):
        self.waiting += 1
        while not self._open.is_set() and not self._tokens.acquire(timeout=0.02):
            pass
        return self._inner.predict(batch)

    def release(self, passes: int = 1) -> None:
        self._tokens.release(passes)

    def open(self) -> None:
        self._open.set()
