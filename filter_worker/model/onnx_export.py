"""``filter-worker model export``: an ONNX graph from the safetensors weights, checked before it is written.

The graph is exported from the same safetensors weights the torch backend loads (``torch.onnx``'s
``torch.export``-based exporter; the TorchScript one is deprecated), returning logits as the torch
engine does (the head's score function runs after either engine, so the float32 and int8 graphs follow
the model's function and ``FILTER_MODEL__SCORE_FUNCTION`` without a new export), with dynamic batch and
sequence axes, and written to ``<model dir>/onnx/``. An export is checked, not assumed: the float32
graph's scores must match eager PyTorch's on sample texts within ``TOLERANCE`` or nothing is written.
The int8 graph is ONNX Runtime's dynamic quantization of the checked float32 graph; its difference
from float32 is reported, as for the torch backend's int8.

A locked directory lists the graphs in its lock file (the export adds them), so they are verified like
the weights. The worker only loads graphs (``onnx_engine.py``); the development commands export a
missing one at first use into an unlocked directory (``ensure_graph``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filter_worker.config import ConfigError, ModelSettings
from filter_worker.exit_codes import ModelLoadError
from filter_worker.logs import get_logger
from filter_worker.model import lockfile
from filter_worker.model.classifier import Classifier
from filter_worker.model.onnx_engine import (
    DTYPES,
    GRAPH_DIR,
    GRAPH_FILES,
    LABELS_KEY,
    OUTPUT,
    OUTPUT_KEY,
    WEIGHTS_KEY,
    OnnxEngine,
    resolve_device,
    resolve_dtype,
    runtime,
    session,
)

log = get_logger(__name__)

# Largest absolute difference between the float32 graph's probabilities and eager PyTorch's that an
# export accepts. Both compute in float32; fused kernels only reorder the arithmetic (differences of
# about 1e-6 are typical), so anything near 1e-4 means the graph computes something else.
TOLERANCE = 1e-4
# protobuf cannot hold a single file above 2 GiB; larger models would need external data files.
_MAX_GRAPH_BYTES = 2_000_000_000
_INPUTS = ("input_ids", "attention_mask")
__all__ = ["DTYPES", "TOLERANCE", "ExportError", "ExportedGraph", "ensure_graph", "export"]


class ExportError(ModelLoadError):
    """An export failed or its graph does not match the PyTorch model; nothing was written."""


def ensure_graph(model: ModelSettings) -> None:
    """For the development commands: export the onnx backend's graph where it is missing and may be.

    Only into an unlocked, writable directory: nothing is added that a lock file does not list, and a
    read-only directory (a mounted volume) needs ``filter-worker model export`` where it is writable.
    The worker (``run``) never exports; it refuses a missing graph with that command.
    """
    directory = Path(model.name)
    if model.backend != "onnx" or not directory.is_dir() or (directory / lockfile.LOCK_NAME).is_file():
        return
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    if (directory / GRAPH_FILES[dtype]).is_file():
        return
    log.info("exporting the ONNX graph at first use", directory=str(directory), dtype=dtype)
    export(directory, [dtype])


@dataclass(frozen=True, slots=True)
class ExportedGraph:
    """One graph written by ``export`` and how far its probabilities are from eager PyTorch float32."""

    dtype: str
    path: Path
    bytes: int
    max_abs_difference: float
    top_label_agreement: float


def check_texts() -> list[str]:
    """Sample texts for the equality check: multilingual, short and long, so batches carry padding."""
    from filter_worker.model.samples import message_mix

    return ["", *message_mix(47, seed=11, long_ratio=0.1)]


def export(directory: str | Path, dtypes: Sequence[str] = DTYPES) -> list[ExportedGraph]:
    """Export, check and write the graphs for ``dtypes`` (int8 needs float32, which is written too).

    A locked directory is verified first (only the graphs being replaced may differ from the lock),
    so an export never blesses changed weights, and the new graphs are added to its lock file.
    """
    root = Path(directory)
    unknown = [d for d in dtypes if d not in GRAPH_FILES]
    if unknown:
        raise ConfigError(f"--dtype {','.join(unknown)}: the onnx backend exports {', '.join(DTYPES)}")
    runtime()
    try:
        import onnx  # noqa: F401 - the quantizer's dependency
        import onnxscript  # noqa: F401 - torch.onnx's exporter's dependency
    except ImportError as exc:
        raise ConfigError(
            f"exporting needs the onnx extra ({exc.name} is not installed): pip install 'filter-worker[onnx]'"
        ) from None
    lock = _verified_for_export(root, dtypes)
    if sum(p.stat().st_size for p in root.glob("*.safetensors")) > _MAX_GRAPH_BYTES:
        raise ExportError(
            f"the weights in '{root}' are above 2 GB, more than a single ONNX file can hold (protobuf's limit); "
            "use FILTER_MODEL__BACKEND=torch"
        )
    reference = Classifier.load(ModelSettings(name=str(root), dtype="float32", device="cpu", verify=False))
    texts = check_texts()
    expected, _ = reference.classify(texts, max_size=16)
    meta = {WEIGHTS_KEY: reference.weights_sha256, LABELS_KEY: json.dumps(reference.labels), OUTPUT_KEY: OUTPUT}
    try:
        (root / GRAPH_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"cannot write the ONNX graph into '{root}' ({exc.strerror}); export it where the directory is writable "
            f"(filter-worker model export {root}) before mounting it read-only"
        ) from None
    written: list[ExportedGraph] = []
    float32 = root / GRAPH_FILES["float32"]
    with _temporary(root / GRAPH_DIR / f".model.onnx.{os.getpid()}.tmp") as tmp:
        _export_float32(reference, tmp, meta)
        difference, agreement = _compare(tmp, reference, texts, expected)
        if difference > TOLERANCE:
            raise ExportError(
                f"the exported graph does not match the PyTorch model: max score difference {difference:.2e} "
                f"on {len(texts)} sample texts (tolerance {TOLERANCE:.0e}); nothing was written"
            )
        os.replace(tmp, float32)
    written.append(ExportedGraph("float32", float32, float32.stat().st_size, difference, agreement))
    if "int8" in dtypes:
        int8 = root / GRAPH_FILES["int8"]
        with _temporary(root / GRAPH_DIR / f".model.int8.onnx.{os.getpid()}.tmp") as tmp:
            _quantize(float32, tmp)
            difference, agreement = _compare(tmp, reference, texts, expected)
            if not np.isfinite(difference):
                raise ExportError("the int8 graph returns invalid scores (NaN or infinite); nothing was written")
            os.replace(tmp, int8)
        written.append(ExportedGraph("int8", int8, int8.stat().st_size, difference, agreement))
    if lock is not None:
        lockfile.add_files(root, [g.path.relative_to(root).as_posix() for g in written])
    for graph in written:
        log.info(
            "ONNX graph written",
            path=str(graph.path),
            dtype=graph.dtype,
            max_abs_difference=graph.max_abs_difference,
            top_label_agreement=graph.top_label_agreement,
            locked=lock is not None,
        )
    return written


def _verified_for_export(root: Path, dtypes: Sequence[str]) -> lockfile.Lock | None:
    if not (root / lockfile.LOCK_NAME).is_file():
        return None
    lock = lockfile.read_lock(root)
    replaced = {GRAPH_FILES[d] for d in dtypes} | {GRAPH_FILES["float32"]}
    problems = [p for p in lockfile.verify_directory(root, lock) if p.path not in replaced]
    if problems:
        raise ExportError(
            f"model directory '{root}' does not match its {lockfile.LOCK_NAME}: "
            + "; ".join(str(p) for p in problems)
            + "; an export would lock a graph of unverified weights. Pull it again"
        )
    return lock


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A hidden file name (lock files ignore hidden paths), one per process so that two workers exporting
    into one directory at once do not write into each other's file; removed unless renamed away."""
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and quantizer print progress, deprecation notes and advice on every call."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _export_float32(reference: Classifier, path: Path, meta: dict[str, str]) -> None:
    import torch

    from filter_worker.model.classifier import TorchEngine, pad

    engine = reference.engine
    assert isinstance(engine, TorchEngine), "the reference is loaded with the torch backend"

    class Logits(torch.nn.Module):
        """The classifier's logits in float32: the graph returns what ``TorchEngine.logits`` returns."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()

    # eval() on the wrapper too: a new Module is in training mode, and the exporter restores the mode
    # it found, which would turn dropout on in the reference model after the export.
    wrapper = Logits(engine.module).eval()
    # Two rows of different lengths (so the example carries padding), neither axis of size 0 or 1,
    # which torch.export would treat as constants.
    rows = [t.ids for t in reference.tokenize(["an example message to trace", "a shorter one"])]
    ids, mask = (torch.from_numpy(a) for a in pad(rows, reference.pad_id))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=reference.max_length)
    axes = {0: batch, 1: sequence}
    try:
        with _quiet():
            program = torch.onnx.export(
                wrapper,
                (ids, mask),
                None,
                input_names=list(_INPUTS),
                output_names=[OUTPUT],
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one sentence for the operator
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx could not export the model: {first}") from exc
    assert program is not None
    program.model.metadata_props.update(meta)
    program.save(str(path))


def _quantize(source: Path, target: Path) -> None:
    """int8 weights for every MatMul/Gemm, activations quantized per batch at run time (like torch's int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet():
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; one sentence for the operator
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"ONNX Runtime could not quantize this model's graph to int8 ({first}); the float32 graph is written "
            "and runs with FILTER_MODEL__DTYPE=float32"
        ) from exc


def _compare(path: Path, reference: Classifier, texts: list[str], expected: np.ndarray) -> tuple[float, float]:
    """Largest score difference from ``expected`` and the share of equal top labels.

    The graph runs in the reference classifier's place (same tokenizer, padding and batches), so the
    engine is the only difference.
    """
    graph = copy.copy(reference)
    graph.engine = OnnxEngine(session(path, "cpu"))
    got, _ = graph.classify(texts, max_size=16)
    difference = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    return difference, float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
