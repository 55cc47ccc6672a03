"""Session fixtures: offline models built once, and one embedded broker for the whole run."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from filter_worker.tools.synthetic import build_keyword_model, build_model

# Words the test model maps to labels; everything else is "Neutral" (probability ~0.9).
KEYWORDS = {
    "Very Negative": ["idiot", "loser"],
    "Negative": ["annoying", "broken"],
    "Very Positive": ["wonderful"],
}


@pytest.fixture(scope="session")
def keyword_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_keyword_model(tmp_path_factory.mktemp("keyword-model"), KEYWORDS)


HUB_REPO = "acme/keyword-classifier"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def hub_cache(keyword_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding ``HUB_REPO`` at ``HUB_COMMIT`` (``refs/main`` points at it).

    The layout the hub client writes (blobs named by content hash, snapshot entries symlinked to them),
    so pulls and hub loads run their real code path offline. The snapshot also holds a pickle and a
    README, which a pull must not copy.
    """
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    storage = cache / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot, blobs = storage / "snapshots" / HUB_COMMIT, storage / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    files = {p.name: p.read_bytes() for p in keyword_model.iterdir() if p.is_file()}
    files |= {"pytorch_model.bin": b"pickle bytes", "README.md": b"# model card"}
    for name, data in files.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(HUB_COMMIT)
    return cache


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
    from filter_worker.tools.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ needs the broker: ``-m "not integration"`` is the fast suite."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
