from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from filter_worker.config import ModelSettings, Settings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.classifier import Classifier
from filter_worker.service.worker import Worker
from tests.integration.worker_thread import worker_thread


@pytest.fixture(scope="session")
def classifier(keyword_model: Path) -> Classifier:
    return Classifier.load(ModelSettings(name=str(keyword_model)))


@pytest.fixture
def running_worker(classifier: Classifier) -> Callable[[Settings], object]:
    """Context manager: a worker on a thread, stopped (and checked for a clean exit) on leaving."""

    @contextmanager
    def start(settings: Settings) -> Iterator[Worker]:
        with worker_thread(settings, classifier) as (worker, codes, _):
            yield worker
        assert codes == [ExitCode.OK]

    return start
