"""Session fixtures: offline models built once, and one embedded broker for the whole run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from filter_worker.synthetic import build_keyword_model, build_model

# Words the test model maps to labels; everything else is "Neutral" (probability ~0.9).
KEYWORDS = {
    "Very Negative": ["idiot", "loser"],
    "Negative": ["annoying", "broken"],
    "Very Positive": ["wonderful"],
}


@pytest.fixture(scope="session")
def keyword_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_keyword_model(tmp_path_factory.mktemp("keyword-model"), KEYWORDS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights in a tiny DistilBERT shape: fast, for tests that need a model but no right answers."""
    return build_model(tmp_path_factory.mktemp("tiny-model"), size="tiny")


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    """A real Kafka-compatible broker: the embedded Tansu, or FILTER_TEST_BOOTSTRAP_SERVERS if set."""
    external = os.environ.get("FILTER_TEST_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    from filter_worker.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers
