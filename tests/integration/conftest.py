from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from filter_worker.config import ModelSettings, Settings
from filter_worker.exit_codes import ExitCode
from filter_worker.model import Classifier
from filter_worker.worker import Worker


@pytest.fixture(scope="session")
def classifier(keyword_model: Path) -> Classifier:
    return Classifier.load(ModelSettings(name=str(keyword_model)))


@pytest.fixture
def running_worker(classifier: Classifier) -> Callable[[Settings], object]:
    """Context manager: a worker on a thread, stopped (and checked for a clean exit) on leaving."""

    @contextmanager
    def start(settings: Settings) -> Iterator[Worker]:
        worker = Worker(settings, classifier)
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
        thread.start()
        try:
            yield worker
        finally:
            worker.stop()
            thread.join(timeout=60)
        assert not thread.is_alive(), "worker did not stop"
        assert codes == [ExitCode.OK]

    return start
