"""The ONNX Runtime backend: export a graph from the safetensors weights, check it, run it.

Eager PyTorch dispatches every small op of a forward pass from Python, taking the GIL between ops;
ONNX Runtime runs the whole graph in C++ (fused kernels, int8 kernels) and releases the GIL for the
whole pass, so the worker's Kafka thread is never stalled by the model.

The graph is exported from the same safetensors weights the torch backend loads (``torch.onnx``'s
``torch.export``-based exporter; the TorchScript one is deprecated), with the softmax inside, dynamic
batch and sequence axes, and written to ``<model dir>/onnx/``. An export is checked, not assumed: the
float32 graph's probabilities must match eager PyTorch's on sample texts within ``TOLERANCE`` or
nothing is written. The int8 graph is ONNX Runtime's dynamic quantization of the checked float32
graph; its difference from float32 is reported, as for the torch backend's int8.

Each graph records the sha256 of the weights it came from and the label order, and loading refuses a
graph exported from other weights. A locked directory lists the graphs in its lock file
(``filter-worker model export`` adds them), so they are verified like the weights.
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

from filter_worker import lockfile
from filter_worker.config import ConfigError, ModelSettings
from filter_worker.logs import get_logger
from filter_worker.model import Classifier, ModelLoadError

log = get_logger(__name__)

GRAPH_DIR = "onnx"
GRAPH_FILES: dict[str, str] = {"float32": f"{GRAPH_DIR}/model.onnx", "int8": f"{GRAPH_DIR}/model.int8.onnx"}
DTYPES: tuple[str, ...] = tuple(GRAPH_FILES)
# Largest absolute difference between the float32 graph's probabilities and eager PyTorch's that an
# export accepts. Both compute in float32; fused kernels only reorder the arithmetic (differences of
# about 1e-6 are typical), so anything near 1e-4 means the graph computes something else.
TOLERANCE = 1e-4
# protobuf cannot hold a single file above 2 GiB; larger models would need external data files.
_MAX_GRAPH_BYTES = 2_000_000_000
_WEIGHTS_KEY = "filter_worker.weights_sha256"
_LABELS_KEY = "filter_worker.labels"
_INPUTS = ("input_ids", "attention_mask")
_OUTPUT = "probabilities"


class ExportError(ModelLoadError):
    """An export failed or its graph does not match the PyTorch model; nothing was written."""


def runtime() -> Any:
    """The ``onnxruntime`` module, or one sentence saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "FILTER_MODEL__BACKEND=onnx needs ONNX Runtime, which is not installed: "
            "pip install 'filter-worker[onnx]' (or 'filter-worker[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def resolve_device(requested: str) -> str:
    """``FILTER_MODEL__DEVICE`` for ONNX Runtime: its CUDA provider (onnxruntime-gpu) or the CPU."""
    if requested == "mps":
        raise ConfigError(
            "FILTER_MODEL__DEVICE=mps: the onnx backend runs on cpu or cuda; use FILTER_MODEL__BACKEND=torch"
        )
    cuda = "CUDAExecutionProvider" in runtime().get_available_providers()
    if requested == "auto":
        return "cuda" if cuda else "cpu"
    if requested.startswith("cuda") and not cuda:
        raise ModelLoadError(
            f"FILTER_MODEL__DEVICE={requested} with FILTER_MODEL__BACKEND=onnx needs ONNX Runtime's CUDA provider: "
            "install 'filter-worker[gpu]' (onnxruntime-gpu) instead of 'filter-worker[onnx]'"
        )
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """The graph to run: float32 (``auto`` too, on every device) or int8 (CPU only)."""
    setting = f"FILTER_MODEL__DTYPE={requested}"
    if requested in ("auto", "float32"):
        return "float32"
    if requested == "int8":
        if device != "cpu":
            raise ConfigError(f"{setting}: the onnx backend's int8 graph runs on CPU only; use float32 on {device}")
        return "int8"
    raise ConfigError(
        f"{setting}: the onnx backend runs float32 and int8 graphs; use FILTER_MODEL__BACKEND=torch for {requested}"
    )


class OnnxEngine:
    """One ONNX Runtime session; ``run`` releases the GIL for the whole forward pass."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def probabilities(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out


def threads() -> int:
    """Intra-op threads: ``OMP_NUM_THREADS`` when set, as PyTorch does (the Kubernetes manifests set it
    to the container's CPU limit, which the CPU count does not show), else every CPU this process may
    run on."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session(path: Path, device: str) -> Any:
    """An ONNX Runtime session with every graph optimization (fusions, constant folding) on.

    Intra-op threads do not spin while waiting for work: spinning threads take CPU from the Kafka
    thread, the tokenizer and (on small machines) the broker, which the worker needs between passes.
    """
    ort = runtime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: node placement notes would fill every start-up log
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    try:
        created = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the ONNX graph {path}: {first}") from exc
    if device.startswith("cuda") and created.get_providers()[0] != "CUDAExecutionProvider":
        raise ModelLoadError(
            f"FILTER_MODEL__DEVICE={device}: ONNX Runtime could not start its CUDA provider "
            "(no GPU visible, or the CUDA and cuDNN libraries onnxruntime-gpu needs are missing)"
        )
    return created


def load_engine(
    directory: Path, dtype: str, device: str, weights_sha256: str, labels: list[str], locked: bool
) -> OnnxEngine:
    """The session for ``dtype``'s graph in ``directory``, exported first if it is missing and may be.

    A missing graph is exported at first load only into an unlocked, writable directory: the worker
    never adds files a lock file does not list, and a read-only directory (a mounted volume) needs
    ``filter-worker model export`` beforehand, where it is writable.
    """
    path = directory / GRAPH_FILES[dtype]
    if not path.is_file():
        if locked:
            raise ModelLoadError(
                f"model directory '{directory}' has no {GRAPH_FILES[dtype]} for FILTER_MODEL__BACKEND=onnx and is "
                f"locked, so it is not exported at start-up; run: filter-worker model export {directory} "
                "(it adds the graph to the lock file)"
            )
        log.info("exporting the ONNX graph at first load", directory=str(directory), dtype=dtype)
        export(directory, [dtype])
    created = session(path, device)
    meta = created.get_modelmeta().custom_metadata_map
    if meta.get(_WEIGHTS_KEY) != weights_sha256:
        raise ModelLoadError(
            f"{directory / GRAPH_FILES[dtype]} was exported from other weights (sha256 "
            f"{meta.get(_WEIGHTS_KEY) or 'not recorded'}, this directory's are {weights_sha256}); export it again: "
            f"filter-worker model export {directory}"
        )
    if json.loads(meta.get(_LABELS_KEY, "null")) != labels:
        raise ModelLoadError(
            f"{directory / GRAPH_FILES[dtype]} has other labels than config.json; export it again: "
            f"filter-worker model export {directory}"
        )
    return OnnxEngine(created)


# -- export -----------------------------------------------------------------------------------------


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
    from filter_worker.tools.samples import message_mix

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
    meta = {_WEIGHTS_KEY: reference.weights_sha256, _LABELS_KEY: json.dumps(reference.labels)}
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
                f"the exported graph does not match the PyTorch model: max probability difference {difference:.2e} "
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
                raise ExportError("the int8 graph returns invalid probabilities (NaN or infinite); nothing was written")
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

    from filter_worker.model import TorchEngine, pad

    engine = reference.engine
    assert isinstance(engine, TorchEngine), "the reference is loaded with the torch backend"

    class Probabilities(torch.nn.Module):
        """The classifier with its softmax: the graph returns what ``Classifier.predict`` returns."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return torch.softmax(logits.float(), dim=-1)

    # eval() on the wrapper too: a new Module is in training mode, and the exporter restores the mode
    # it found, which would turn dropout on in the reference model after the export.
    wrapper = Probabilities(engine.module).eval()
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
                output_names=[_OUTPUT],
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

    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def _compare(path: Path, reference: Classifier, texts: list[str], expected: np.ndarray) -> tuple[float, float]:
    """Largest probability difference from ``expected`` and the share of equal top labels.

    The graph runs in the reference classifier's place (same tokenizer, padding and batches), so the
    engine is the only difference.
    """
    graph = copy.copy(reference)
    graph.engine = OnnxEngine(session(path, "cpu"))
    got, _ = graph.classify(texts, max_size=16)
    difference = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    return difference, float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
