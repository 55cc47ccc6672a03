"""Where a forward pass spends its time, per engine, and how each engine shares the GIL.

``python -m filter_worker.tools.engine_profile MODEL_DIR [--texts N]`` on a directory with exported
graphs (``filter-worker model export``) prints:

1. **Op time** of eager PyTorch float32 (``torch.profiler``) and of the ONNX Runtime float32 and int8
   graphs (ONNX Runtime's own profiler) over the bench's texts sorted by length in batches of 32:
   the share of the time in matrix multiplication says how much any engine can gain at a precision.
2. **GIL sharing**: the same passes on one intra-op thread, alone and beside a pure-Python busy
   thread (what the worker's Kafka thread is while it tokenizes and routes). Eager PyTorch takes the
   GIL for every op it dispatches; ONNX Runtime once per pass.

A development tool for the README's performance notes; it needs the ``onnx`` extra.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from filter_worker.config import ModelSettings
from filter_worker.model import onnx_engine
from filter_worker.model.classifier import Classifier, pad
from filter_worker.model.samples import message_mix

_GEMMS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")


def _batches(classifier: Classifier, texts: list[str], size: int = 32) -> list[list[list[int]]]:
    ids = [t.ids for t in classifier.tokenize(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [[ids[i] for i in order[k : k + size]] for k in range(0, len(order), size)]


def torch_op_time(directory: Path, texts: list[str]) -> str:
    from torch.profiler import ProfilerActivity, profile

    classifier = Classifier.load(ModelSettings(name=str(directory), dtype="float32"))
    batches = _batches(classifier, texts)
    classifier.predict(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for batch in batches:
            classifier.predict(batch)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in _GEMMS)
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key)
    calls = sum(e.count for e in events) / len(batches)
    return (
        f"torch float32: {wall:.2f} s for {len(texts)} texts; GEMMs (addmm/mm/bmm) {gemm / total:.0%} of op "
        f"self time, attention kernels {attention / total:.0%}, {calls:.0f} op calls per forward pass"
    )


def onnx_kernel_time(directory: Path, texts: list[str], dtype: str) -> str:
    ort = onnx_engine.runtime()
    classifier = Classifier.load(ModelSettings(name=str(directory), backend="onnx", dtype=dtype))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = onnx_engine.threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = f"ort-profile-{dtype}"
    session = ort.InferenceSession(str(directory / onnx_engine.GRAPH_FILES[dtype]), options)
    padded = [pad(batch, classifier.pad_id) for batch in _batches(classifier, texts)]
    started = time.perf_counter()
    for ids, mask in padded:
        session.run(None, {"input_ids": ids, "attention_mask": mask})
    wall = time.perf_counter() - started
    trace_path = Path(session.end_profiling())
    per_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace_path.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    trace_path.unlink()
    total = sum(per_op.values())
    top = ", ".join(f"{op} {us / total:.0%}" for op, us in per_op.most_common(5))
    return f"onnx {dtype}: {wall:.2f} s; kernel time by op: {top}"


def _beside_busy_thread(run: Callable[[], Any]) -> tuple[float, float]:
    """Seconds of ``run`` alone, then beside a thread that only runs Python bytecode."""
    run()
    started = time.perf_counter()
    run()
    alone = time.perf_counter() - started
    stop = threading.Event()

    def busy() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        started = time.perf_counter()
        run()
        beside = time.perf_counter() - started
    finally:
        stop.set()
        thread.join()
    return alone, beside


def gil_sharing(directory: Path, texts: list[str], repeats: int) -> list[str]:
    """One intra-op thread per engine, so the busy thread has a core of its own on a 2-core machine."""
    import torch

    torch.set_num_threads(1)
    with mock.patch.object(onnx_engine, "threads", lambda: 1):
        engines = {b: Classifier.load(ModelSettings(name=str(directory), backend=b)) for b in ("torch", "onnx")}
    rows = _batches(engines["torch"], texts, size=16)[len(texts) // 32]  # a mid-length batch of 16
    lines = []
    for n in range(repeats):
        for backend, classifier in engines.items():
            alone, beside = _beside_busy_thread(functools.partial(classifier.predict, rows))
            lines.append(
                f"GIL, run {n + 1}: {backend} float32, one thread, 16 rows: {alone * 1000:.0f} ms alone, "
                f"{beside * 1000:.0f} ms beside a busy Python thread ({beside / alone:.2f}x)"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m filter_worker.tools.engine_profile", description=__doc__)
    parser.add_argument("model", type=Path, help="model directory with exported graphs (filter-worker model export)")
    parser.add_argument("--texts", type=int, default=300, help="texts of the built-in mix (default 300)")
    parser.add_argument("--gil-repeats", type=int, default=3, help="runs of the GIL check (default 3)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from filter_worker.config import LogSettings
    from filter_worker.logs import configure

    configure(LogSettings(level="WARNING"))
    texts = message_mix(args.texts, seed=7)
    print(torch_op_time(args.model, texts), flush=True)
    for dtype in onnx_engine.DTYPES:
        print(onnx_kernel_time(args.model, texts, dtype), flush=True)
    for line in gil_sharing(args.model, texts, args.gil_repeats):
        print(line, flush=True)


if __name__ == "__main__":
    main()
