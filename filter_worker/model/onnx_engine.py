"""The ONNX Runtime engine: run a graph exported from the model's safetensors weights.

Eager PyTorch dispatches every small op of a forward pass from Python, taking the GIL between ops;
ONNX Runtime runs the whole graph in C++ (fused kernels, int8 kernels) and releases the GIL for the
whole pass, so the worker's Kafka thread is never stalled by the model.

Each graph records the sha256 of the weights it came from, the label order and that it returns logits
(the head's score function runs after it, as after the torch engine), and loading refuses a graph
exported from other weights, or one of an older export with a softmax inside. The export itself
(``torch.onnx``, the equality check, the int8 quantization) is a tool, not part of the worker:
``filter_worker/model/onnx_export.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from filter_worker.config import ConfigError
from filter_worker.exit_codes import ModelLoadError

GRAPH_DIR = "onnx"
GRAPH_FILES: dict[str, str] = {"float32": f"{GRAPH_DIR}/model.onnx", "int8": f"{GRAPH_DIR}/model.int8.onnx"}
DTYPES: tuple[str, ...] = tuple(GRAPH_FILES)
# What an exported graph records in its metadata: checked at every load.
WEIGHTS_KEY = "filter_worker.weights_sha256"
LABELS_KEY = "filter_worker.labels"
OUTPUT_KEY = "filter_worker.output"
OUTPUT = "logits"


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
    """One ONNX Runtime session returning logits; ``run`` releases the GIL for the whole forward pass."""

    streams = 1  # concurrent runs on one session share its intra-op threads; not measured here

    def __init__(self, session: Any) -> None:
        self._session = session

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
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
    """The session for ``dtype``'s graph in ``directory``, checked against the weights and labels.

    A missing graph is refused with the command that exports it: loading never writes into the model
    directory (``filter-worker model export`` does, and the development commands export at first use
    into an unlocked directory: ``onnx_export.ensure_graph``).
    """
    path = directory / GRAPH_FILES[dtype]
    if not path.is_file():
        lock_note = " (it adds the graph to the lock file)" if locked else ""
        raise ModelLoadError(
            f"model directory '{directory}' has no {GRAPH_FILES[dtype]} for FILTER_MODEL__BACKEND=onnx; export it "
            f"where the directory is writable: filter-worker model export {directory}{lock_note}"
        )
    created = session(path, device)
    meta = created.get_modelmeta().custom_metadata_map
    if meta.get(WEIGHTS_KEY) != weights_sha256:
        raise ModelLoadError(
            f"{directory / GRAPH_FILES[dtype]} was exported from other weights (sha256 "
            f"{meta.get(WEIGHTS_KEY) or 'not recorded'}, this directory's are {weights_sha256}); export it again: "
            f"filter-worker model export {directory}"
        )
    if meta.get(OUTPUT_KEY) != OUTPUT:
        raise ModelLoadError(
            f"{directory / GRAPH_FILES[dtype]} is of an older export that puts a softmax inside the graph, which is "
            f"wrong for multi-label models; export it again: filter-worker model export {directory}"
        )
    if json.loads(meta.get(LABELS_KEY, "null")) != labels:
        raise ModelLoadError(
            f"{directory / GRAPH_FILES[dtype]} has other labels than config.json; export it again: "
            f"filter-worker model export {directory}"
        )
    return OnnxEngine(created)
