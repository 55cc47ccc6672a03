"""Workers as real processes for tests that signal or kill them; waiting on workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from filter_worker.config import Settings
from tests.integration.kafka_helpers import committed_offsets, read_outputs


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    topics = settings.topics
    return {
        **os.environ,
        "FILTER_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "FILTER_KAFKA__GROUP_ID": settings.kafka.group_id,
        "FILTER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "FILTER_KAFKA__COMMIT_INTERVAL_MS": "200",
        "FILTER_TOPICS__INPUT": ",".join(topics.input),
        "FILTER_TOPICS__ALLOW": topics.allow,
        "FILTER_TOPICS__QUARANTINE": topics.quarantine,
        "FILTER_TOPICS__DROP": topics.drop,
        "FILTER_TOPICS__DEAD_LETTER": topics.dead_letter,
        "FILTER_MODEL__NAME": settings.model.name,
        # auto's choice depends on the machine's CPU (tests/test_precision.py covers it): the outputs
        # these tests check are float32's on every machine.
        "FILTER_MODEL__DTYPE": "float32",
        "FILTER_BATCH__MAX_SIZE": "8",
        "FILTER_METRICS__PORT": "0",
        "FILTER_LOG__FORMAT": "json",
        **extra,
    }


def start_worker(env: dict[str, str], config: str | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "filter_worker", *(["--config", config] if config else []), "run"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until(condition: Callable[[], object], timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_outputs(settings: Settings, at_least: int, timeout_s: float = 60) -> None:
    """Returns once the output topics hold ``at_least`` records; fails after ``timeout_s``."""
    read_outputs(settings, expected=at_least, timeout_s=timeout_s, settle_s=0)


def wait_for_committed(settings: Settings, partitions: int, at_least: int, timeout_s: float = 120) -> int:
    """Block until the group committed ``at_least`` records in total; returns the total."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = sum(max(0, o) for o in committed_offsets(settings, partitions).values())
        if total >= at_least:
            return total
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} records committed after {timeout_s}s")
