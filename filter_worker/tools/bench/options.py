"""What ``bench`` is asked to measure: its options, checked before any phase runs, and its texts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filter_worker.config import ConfigError
from filter_worker.model.samples import message_mix

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")


# At --messages 1000 (the default) the latency run lasts 20 s and the naive loop takes 100 records;
# smaller runs scale both down so a small run finishes quickly.
_LATENCY_SECONDS, _NAIVE_COUNT, _FULL_SIZE = 20.0, 100, 1000


_MIN_LATENCY_SECONDS, _MIN_NAIVE_COUNT = 2.0, 5


@dataclass
class BenchOptions:
    """Command-line options of ``bench`` (the model, backend, device, precision and batch come from settings).

    ``None`` for ``naive_count`` and ``latency_seconds`` means scaled to ``messages`` (full size at
    1000 messages), so a small run finishes quickly.
    """

    messages: int = 1000
    file: str | None = None
    seed: int = 7
    naive_count: int | None = None
    arrival_count: int = 256
    compare_count: int = 300
    compare_dtypes: list[str] | None = None  # None: the lower precisions that suit the device
    compare_rounds: int = 3
    rate: float | None = None  # None: half the measured end-to-end throughput
    latency_seconds: float | None = None
    duplicate_ratio: float = 0.0
    rounds: int = 3
    partitions: int = 3
    plumbing: bool = False  # only the plumbing measurement
    plumbing_messages: int = 50_000
    bootstrap_servers: str | None = None
    json_path: str = "bench-results.json"
    progress: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    def validate(self) -> None:
        """Refuse what cannot work, naming the option, before any phase runs (``ConfigError``: exit 2)."""
        at_least_one = {
            "--messages": self.messages,
            "--arrival-count": self.arrival_count,
            "--compare-count": self.compare_count,
            "--compare-rounds": self.compare_rounds,
            "--rounds": self.rounds,
            "--partitions": self.partitions,
            "--plumbing-messages": self.plumbing_messages,
        }
        if self.naive_count is not None:
            at_least_one["--naive-count"] = self.naive_count
        for option, value in at_least_one.items():
            if value < 1:
                raise ConfigError(f"{option} must be at least 1, not {value}")
        for option, number in (("--rate", self.rate), ("--latency-seconds", self.latency_seconds)):
            if number is not None and not number > 0:
                raise ConfigError(f"{option} must be above 0, not {number}")
        if not 0.0 <= self.duplicate_ratio < 1.0:
            raise ConfigError("--duplicate-ratio must be at least 0 and below 1")
        unknown = [d for d in self.compare_dtypes or [] if d not in PRECISIONS]
        if unknown:
            raise ConfigError(
                f"--compare-dtypes: unknown precision {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(PRECISIONS)}, or none"
            )
        if self.bootstrap_servers is not None and not self.bootstrap_servers.strip():
            raise ConfigError("--bootstrap-servers is empty; leave it out to use the embedded broker")
        folder = Path(self.json_path).parent
        if not folder.is_dir():
            raise ConfigError(f"--json {self.json_path}: the directory {folder} does not exist")

    def scaled_naive_count(self, messages: int) -> int:
        if self.naive_count is not None:
            return self.naive_count
        return max(_MIN_NAIVE_COUNT, min(_NAIVE_COUNT, _NAIVE_COUNT * messages // _FULL_SIZE))

    def scaled_latency_seconds(self, messages: int) -> float:
        if self.latency_seconds is not None:
            return self.latency_seconds
        return max(_MIN_LATENCY_SECONDS, min(_LATENCY_SECONDS, _LATENCY_SECONDS * messages / _FULL_SIZE))


def load_texts(options: BenchOptions) -> list[str]:
    if options.file is None:
        return message_mix(options.messages, seed=options.seed, duplicate_ratio=options.duplicate_ratio)
    path = Path(options.file)
    if not path.is_file():
        raise ConfigError(f"--file {options.file}: no such file")
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"--file {options.file}: no non-empty lines")
    return texts
