"""A worker on a thread in the test process, for tests that inspect it (health, metrics, exit code)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from filter_worker.config import Settings
from filter_worker.model.classifier import Classifier
from filter_worker.service.worker import Worker


@contextmanager
def worker_thread(
    settings: Settings, classifier: Classifier, candidate: Classifier | None = None
) -> Iterator[tuple[Worker, list[int], threading.Thread]]:
    """Yields the worker, the list its exit code lands in, and its thread; stops it on leaving."""
    worker = Worker(settings, classifier, candidate=candidate)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker, codes, thread
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive(), "worker did not stop"
