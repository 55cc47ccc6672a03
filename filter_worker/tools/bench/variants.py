"""Each backend and precision against eager PyTorch float32: changed actions and labels, model-only speed."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from filter_worker.config import ConfigError, Settings
from filter_worker.model.capabilities import device_capabilities
from filter_worker.model.classifier import Classifier, resolve_dtype
from filter_worker.model.onnx_export import ensure_graph
from filter_worker.model.precision import Precision, agreement
from filter_worker.pipeline.routing import Router
from filter_worker.tools.bench.harness import on_model_thread
from filter_worker.tools.bench.options import BenchOptions

# The reference every variant is compared with: what a user's first deployment runs.
REFERENCE = ("torch", "float32")


class Models:
    """Classifiers by (backend, dtype), each loaded once: the variants, the naive loop's reference."""

    def __init__(self, settings: Settings, first: Classifier) -> None:
        self._settings = settings
        self._loaded = {(first.backend, first.dtype): first}

    def get(self, backend: str, dtype: str) -> Classifier:
        if (backend, dtype) not in self._loaded:
            model = self._settings.model.model_copy(update={"backend": backend, "dtype": dtype})
            ensure_graph(model)
            self._loaded[backend, dtype] = Classifier.load(model)
        return self._loaded[backend, dtype]


def default_compare_dtypes(device: str) -> list[str]:
    """The lower precisions worth comparing on ``device``: the ones ``FILTER_MODEL__DTYPE`` accepts there."""
    return ["float16", "bfloat16"] if device.startswith("cuda") else ["bfloat16", "int8"]


def variant_name(backend: str, dtype: str) -> str:
    return f"{backend} {dtype}"


def variant_list(classifier: Classifier, requested: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(backend, dtype, reason it is skipped or None) for every variant compared with the reference.

    The backends are torch and the configured one; the precisions are float32 and the requested ones
    (default: those the device accepts). The configured variant is always among them. A requested
    combination the device or backend refuses is listed with the reason; a default one is left out.
    """
    backends = list(dict.fromkeys(["torch", classifier.backend]))
    dtypes = requested if requested is not None else default_compare_dtypes(classifier.device)
    if requested is not None and not requested:
        return []
    chosen = [(b, d) for b in backends for d in dict.fromkeys(["float32", *dtypes])]
    chosen += [(classifier.backend, classifier.dtype)]
    listed: list[tuple[str, str, str | None]] = []
    for backend, dtype in dict.fromkeys(chosen):
        if (backend, dtype) == REFERENCE:
            continue
        try:
            resolve_dtype(dtype, classifier.device, backend)
        except ConfigError as exc:
            if requested is not None:
                listed.append((backend, dtype, str(exc)))
            continue
        listed.append((backend, dtype, None))
    return listed


def variants(
    settings: Settings,
    models: Models,
    classifier: Classifier,
    router: Router,
    texts: Sequence[str],
    options: BenchOptions,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every variant against eager PyTorch float32 on ``texts``: changed actions and labels, speed.

    Speed is measured in ``options.compare_rounds`` rounds, each running every variant once in a
    rotated order; a variant's ratio is the median of its per-round ratios to the reference, so the
    machine's drift between rounds cancels out.
    """
    listed = variant_list(classifier, options.compare_dtypes)
    if not listed:
        return {}
    runnable = [(b, d) for b, d, reason in listed if reason is None]
    names = [variant_name(*REFERENCE)] + [variant_name(b, d) for b, d in runnable]
    rounds = options.compare_rounds
    say(f"variants: {', '.join(names[1:])} against {names[0]} on {len(texts)} texts, {rounds} rounds ...")
    classifiers = {variant_name(*REFERENCE): models.get(*REFERENCE)}
    classifiers |= {variant_name(b, d): models.get(b, d) for b, d in runnable}
    batch = settings.batch

    def timed(variant: Classifier, some: Sequence[str]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        probs, _ = variant.classify(some, batch.max_size, batch.max_tokens)
        return probs, time.perf_counter() - started

    probs: dict[str, np.ndarray] = {}
    speeds: dict[str, list[float]] = {name: [] for name in classifiers}
    for name, variant in classifiers.items():  # warm-up, and the probabilities compared
        on_model_thread(functools.partial(timed, variant, texts[: batch.max_size]))
        probs[name] = on_model_thread(functools.partial(timed, variant, texts))[0]
    for n in range(rounds):
        order = names[n % len(names) :] + names[: n % len(names)]
        for name in order:
            seconds = on_model_thread(functools.partial(timed, classifiers[name], texts))[1]
            speeds[name].append(len(texts) / seconds)
    reference = names[0]
    base_actions = [router.decide(row).action for row in probs[reference]]
    results: dict[str, Any] = {
        reference: {"messages": len(texts), "messages_per_s": statistics.median(speeds[reference]), "reference": True}
    }
    for backend, dtype, reason in listed:
        name = variant_name(backend, dtype)
        if reason is not None:
            results[name] = {"skipped": reason}
            continue
        actions = [router.decide(row).action for row in probs[name]]
        ratios = [a / b for a, b in zip(speeds[name], speeds[reference], strict=True)]
        results[name] = {
            "messages": len(texts),
            "messages_per_s": statistics.median(speeds[name]),
            "speed_ratio": statistics.median(ratios),
            "speed_ratios": ratios,
            "action_changed_share": float(np.mean([a != b for a, b in zip(actions, base_actions, strict=True)])),
            "top_label_changed_share": float(np.mean(probs[name].argmax(axis=1) != probs[reference].argmax(axis=1))),
            "max_abs_probability_difference": float(np.abs(probs[name] - probs[reference]).max()),
        }
    return results


def precision_report(
    loaded: Precision, float32: Classifier, router: Router, texts: Sequence[str], batch_size: int
) -> dict[str, Any]:
    """How the running precision was chosen (the start-up comparison) and its decisions against float32 on ``texts``.

    Printed beside every speed figure: a faster precision is only worth what it keeps of float32's decisions.
    """
    classifier = loaded.classifier
    reference = on_model_thread(functools.partial(float32.classify, texts, batch_size))[0]
    running = (
        reference
        if classifier is float32
        else on_model_thread(functools.partial(classifier.classify, texts, batch_size))[0]
    )
    checked = agreement(router, reference, running)
    choice = loaded.choice
    return {
        "engine": variant_name(classifier.backend, classifier.dtype),
        "source": loaded.source,
        "capabilities": sorted(device_capabilities(classifier.device)),
        "check_set": choice.summary() if choice is not None else [],
        "check_set_float32_records_per_s": choice.measurement.reference.records_per_s if choice is not None else None,
        "agreement": {
            "texts": len(texts),
            "records": checked.records,
            "same_action": checked.same_action,
            "allow_drop_moves": checked.allow_drop_moves,
            "max_score_difference": checked.max_score_difference,
        },
    }
