"""The start-up measurement kept between starts: its file format and where it is looked for and written.

A measurement holds every engine's probabilities on the check set and its speed, so the rules in
force can be re-applied to it without running the model. Its key is the sha256 of what decides it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from filter_worker.config import ModelSettings
from filter_worker.logs import get_logger
from filter_worker.model.capabilities import Engine

log = get_logger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Measured:
    """One engine on the check set: its probabilities and its speed against float32 in the same rounds."""

    engine: Engine
    probabilities: np.ndarray
    records_per_s: float
    speed_ratio: float


@dataclass
class Measurement:
    """Every candidate measured against float32 on one check set (what the cache keeps)."""

    key: str
    capabilities: frozenset[str]
    reference: Measured
    candidates: list[Measured]
    seconds: float
    cached: bool = False

    def to_json(self) -> bytes:
        def one(m: Measured) -> dict[str, Any]:
            return {
                "backend": m.engine.backend,
                "dtype": m.engine.dtype,
                "records_per_s": m.records_per_s,
                "speed_ratio": m.speed_ratio,
                "probabilities": m.probabilities.tolist(),
            }

        document = {
            "version": CACHE_VERSION,
            "key": self.key,
            "capabilities": sorted(self.capabilities),
            "seconds": self.seconds,
            "reference": one(self.reference),
            "candidates": [one(m) for m in self.candidates],
        }
        return orjson.dumps(document)

    @classmethod
    def from_json(cls, data: bytes) -> Measurement:
        document = orjson.loads(data)

        def one(item: dict[str, Any]) -> Measured:
            engine = Engine(item["backend"], item["dtype"])
            probs = np.asarray(item["probabilities"], dtype=np.float32)
            return Measured(engine, probs, float(item["records_per_s"]), float(item["speed_ratio"]))

        return cls(
            key=document["key"],
            capabilities=frozenset(document["capabilities"]),
            reference=one(document["reference"]),
            candidates=[one(item) for item in document["candidates"]],
            seconds=float(document["seconds"]),
            cached=True,
        )


def cache_key(
    capabilities: frozenset[str],
    device: str,
    weights_sha256: str,
    score_function: str,
    candidates: Sequence[Engine],
    texts: Sequence[str],
    batch_size: int,
    streams: int = 1,
) -> str:
    """What decides a measurement: the CPU (or GPU), the weights and the function that makes their scores
    (FILTER_MODEL__SCORE_FUNCTION can change it), the candidates and their streams, the check set, the
    libraries."""
    import torch
    import transformers

    material = {
        "version": CACHE_VERSION,
        "capabilities": sorted(capabilities),
        "device": device,
        "weights": weights_sha256,
        "score_function": score_function,
        "candidates": [c.name for c in candidates],
        "texts": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest(),
        "batch_size": batch_size,
        "streams": streams,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _version(package: str) -> str | None:
    """An installed engine's version (its kernels decide the speed), or None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_dirs(model: ModelSettings) -> list[Path]:
    """Where a measurement may be found, in order: the model directory's ``precision/`` (a read-only
    volume can ship one), then the writable cache directory."""
    dirs = [Path(model.name) / "precision"] if Path(model.name).is_dir() else []
    return [*dirs, writable_cache_dir(model)]


def writable_cache_dir(model: ModelSettings) -> Path:
    if model.precision_cache_dir:
        return Path(model.precision_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "filter-worker" / "precision"


def read_cached(model: ModelSettings, key: str) -> Measurement | None:
    for directory in cache_dirs(model):
        path = directory / f"{key}.json"
        try:
            measurement = Measurement.from_json(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("precision cache entry unreadable; measuring again", path=str(path), error=str(exc))
            continue
        if measurement.key == key:
            return measurement
    return None


def write_cached(model: ModelSettings, measurement: Measurement) -> Path | None:
    """Keep the measurement for the next start; a cache that cannot be written only costs the next start its seconds."""
    directory = writable_cache_dir(model)
    path = directory / f"{measurement.key}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(measurement.to_json())
        partial.replace(path)  # atomic: a scale-out's workers never read half a file
    except OSError as exc:
        log.warning(
            "precision measurement not cached; set FILTER_MODEL__PRECISION_CACHE_DIR to a writable directory",
            path=str(path),
            error=str(exc),
        )
        return None
    return path
