"""The OpenVINO engine: the loaded PyTorch module converted in memory and compiled for this CPU.

Measured on an Intel Xeon with AMX (docs/performance.md), OpenVINO's bfloat16 ran the default model's
shape 4.2-4.5x eager PyTorch float32 model-only where torch's own bfloat16 ran 3.2-3.5x, and the worker
end to end 1.4x faster than with torch bfloat16. It compiles fused kernels for the CPU's AMX and
AVX-512 units, and like ONNX Runtime it releases the GIL for a whole inference.

Nothing new is read from disk: the module comes from the model's safetensors weights, as for the torch
engine, and ``openvino.convert_model`` traces it in memory (seconds for the default model). The
converted weights are not shared with the torch module (``share_weights=False``), so dropping the
module after the conversion frees its memory and cannot leave the compiled model reading freed tensors.
"""

from __future__ import annotations

import queue
import sys
import warnings
from typing import Any

import numpy as np

from filter_worker.config import ConfigError

# The precisions the CPU plugin computes in, by OpenVINO's name for each (its INFERENCE_PRECISION_HINT).
_HINTS = {"float32": "f32", "bfloat16": "bf16"}
# Streams FILTER_MODEL__STREAMS=auto compiles, where the model has that many threads (resolve_streams).
AUTO_STREAMS = 2
_INPUTS = ("input_ids", "attention_mask")


def runtime() -> Any:
    """The ``openvino`` module, or one sentence saying how to install it.

    OpenVINO's converter sends usage telemetry (Google Analytics) from ``convert_model`` unless the
    user opted out in a file under ``~/intel``, and writes a client id there. A worker must not call
    out of the cluster nor write to its home directory, so the telemetry package is made unimportable
    before OpenVINO loads; the converter then takes its own no-op stub (``openvino.tools.ovc``
    falls back to ``telemetry_stub`` when ``openvino_telemetry`` cannot be imported).
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # None: ImportError on import
    try:
        import openvino  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "FILTER_MODEL__BACKEND=openvino needs OpenVINO, which is not installed: "
            "pip install 'filter-worker[openvino]'"
        ) from None
    return openvino


def available() -> bool:
    """Whether OpenVINO is installed: ``auto`` measures its engines only then."""
    try:
        runtime()
    except ConfigError:
        return False
    return True


def resolve_device(requested: str) -> str:
    """OpenVINO runs on the CPU here; its GPU plugin is Intel's GPUs, not CUDA."""
    if requested in ("auto", "cpu"):
        return "cpu"
    raise ConfigError(
        f"FILTER_MODEL__DEVICE={requested}: the openvino backend runs on cpu; "
        f"use FILTER_MODEL__BACKEND=torch on {requested}"
    )


def resolve_dtype(requested: str) -> str:
    """float32 (``auto`` too) or bfloat16: the precisions OpenVINO's CPU plugin computes in."""
    if requested == "auto":
        return "float32"
    if requested in _HINTS:
        return requested
    raise ConfigError(
        f"FILTER_MODEL__DTYPE={requested}: the openvino backend runs float32 and bfloat16; "
        f"use FILTER_MODEL__BACKEND=torch or onnx for {requested}"
    )


def resolve_streams(requested: int | str, threads: int) -> int:
    """FILTER_MODEL__STREAMS as the engine runs it: ``auto`` is two streams where there are two threads.

    Two streams moved 1.10-1.14x the records of one end to end on 2 vCPUs with AMX, in alternated
    rounds at 12f99d3 and at 586a259 (docs/performance.md): one pass on both threads stalls whenever
    the Kafka loop takes a core. More streams than two are not measured here, so auto does not go further.
    """
    if requested == "auto":
        return min(AUTO_STREAMS, threads)
    check_streams(int(requested), threads)
    return int(requested)


def check_streams(streams: int, threads: int) -> None:
    """Each stream needs a thread of its own; said before anything is loaded or measured."""
    if streams > threads:
        raise ConfigError(
            f"FILTER_MODEL__STREAMS={streams} is more than the {threads} threads the model runs on here "
            "(OMP_NUM_THREADS, else the CPUs): each stream needs one"
        )


class OpenVinoEngine:
    """One compiled model and one infer request per stream, returning logits in the config's label order.

    ``threads`` is the intra-op thread count (torch's, so every engine of a worker uses the same cores);
    ``streams`` is FILTER_MODEL__STREAMS (``resolve_streams``). With one stream, the latency hint: every
    thread works on each pass. With ``streams`` > 1, the throughput hint with that many streams sharing
    the threads: the worker then runs as many passes at once, one per model thread. A request runs one
    pass at a time, so a pass takes a free one from the pool and gives it back: callers beyond
    ``streams`` wait, and the requests (each holding buffers for the largest batch it ran) stay
    ``streams`` whatever threads call.
    """

    def __init__(self, module: Any, dtype: str, threads: int, streams: int | str = 1) -> None:
        import torch

        streams = resolve_streams(streams, threads)
        ov = runtime()

        class Logits(torch.nn.Module):  # the model's output object is not a tensor OpenVINO can return
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        example = {name: torch.ones((2, 8), dtype=torch.int64) for name in _INPUTS}
        dynamic = [(name, ov.PartialShape([-1, -1]), ov.Type.i64) for name in _INPUTS]
        with warnings.catch_warnings():  # tracing warnings about the model's own code: nothing to act on
            warnings.simplefilter("ignore")
            converted = ov.convert_model(
                Logits(module).eval(), example_input=example, input=dynamic, share_weights=False
            )
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[dtype],
            "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
            "NUM_STREAMS": str(streams),
            "INFERENCE_NUM_THREADS": str(threads),
        }
        self.streams = streams
        compiled = ov.Core().compile_model(converted, "CPU", config)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(streams):
            self._requests.put(compiled.create_infer_request())

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        request = self._requests.get()
        try:
            outputs = request.infer({"input_ids": ids, "attention_mask": mask})
        finally:
            self._requests.put(request)
        return np.asarray(outputs[0], dtype=np.float32)  # infer() copies its outputs (share_outputs=False)
