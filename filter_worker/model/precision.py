"""``FILTER_MODEL__DTYPE=auto``: the fastest engine this machine runs natively, if it decides as float32 does.

Which precision is fastest depends on the processor (AMX and AVX-512 BF16 run bfloat16 natively, VNNI
runs int8 natively, an AVX2-only CPU emulates bfloat16 more slowly than float32; ``capabilities.py``),
so no fixed default is right everywhere. At start-up the candidates the machine runs natively are
measured against torch float32 on a small check set: speed (rounds in which every engine runs once, in
rotated order; each engine's fastest) and decisions under the rules in force (every scope's rules). A
candidate qualifies when at least 99.5 % of the check records take the same action and none moves
between allow and drop; the fastest qualifying one that beats float32 by a clear margin is chosen, else
float32.

The measurement (probabilities and speeds on the check set) is cached by what decides it
(``precision_cache.py``). The rules are re-applied to the cached probabilities at every start and
every reload (``Precision.recheck``), so a rule change never needs the model run again, and a rule
change that makes the chosen precision disagree falls back to float32 instead of routing differently
from what was checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filter_worker.config import ConfigError, ModelSettings, RoutingSettings
from filter_worker.logs import get_logger
from filter_worker.model import openvino_engine
from filter_worker.model.capabilities import (
    REFERENCE,
    Engine,
    device_capabilities,
    emulation_warning,
    native_candidates,
)
from filter_worker.model.classifier import Classifier
from filter_worker.model.precision_cache import Measured, Measurement, cache_key, read_cached, write_cached
from filter_worker.model.samples import message_mix
from filter_worker.pipeline.batching import plan_batches
from filter_worker.pipeline.routing import Router

log = get_logger(__name__)

MIN_SAME_ACTION = 0.995
# A candidate must beat float32 by this much: a precision that is only as fast is not worth its risk,
# and on a shared machine a few percent is noise.
MIN_SPEEDUP = 1.1
CHECK_TEXTS = 200  # the built-in check set's size: a few seconds of float32 on a 2-core CPU
CHECK_FILE_NAME = "check-texts.txt"  # a model directory's own check set, one text per line
SPEED_ROUNDS = 3
CHECK_BUDGET_S = 15.0  # the measurement's time at start-up, on the first float32 pass's estimate


@dataclass(frozen=True, slots=True)
class Agreement:
    """How a candidate's decisions compare with float32's on the check set, under one rule set."""

    records: int  # check texts x scopes: every scope's rules are checked
    same_action: float
    allow_drop_moves: int
    max_score_difference: float  # the largest difference of a rule score or a label probability

    @property
    def passes(self) -> bool:
        return self.same_action >= MIN_SAME_ACTION and self.allow_drop_moves == 0


def agreement(router: Router, reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Decisions of ``candidate``'s probabilities against ``reference``'s, under every scope's rules."""
    same, moves, records = 0, 0, 0
    difference = float(np.abs(candidate - reference).max()) if len(reference) else 0.0
    for scope in router.scopes:
        scopes = [scope] * len(reference)
        for ref, cand in zip(
            router.decide_batch(reference, scopes), router.decide_batch(candidate, scopes), strict=True
        ):
            same += ref.action == cand.action
            moves += {ref.action, cand.action} == {"allow", "drop"}
        rule_gap = np.abs(router.rule_scores(candidate, scope) - router.rule_scores(reference, scope))
        difference = max(difference, float(rule_gap.max()) if rule_gap.size else 0.0)
        records += len(reference)
    return Agreement(records, same / records if records else 1.0, moves, difference)


@dataclass(frozen=True, slots=True)
class Choice:
    """The engine to run under one rule set, with every candidate's agreement and speed."""

    engine: Engine
    agreements: dict[Engine, Agreement]
    measurement: Measurement

    def summary(self) -> list[dict[str, Any]]:
        """Per candidate: speed against float32 and agreement, as the log line and ``bench`` show them."""
        rows = []
        for m in self.measurement.candidates:
            a = self.agreements[m.engine]
            rows.append(
                {
                    "engine": m.engine.name,
                    "records_per_s": round(m.records_per_s, 1),
                    "vs_float32": round(m.speed_ratio, 2),
                    "same_action": round(a.same_action, 4),
                    "allow_drop_moves": a.allow_drop_moves,
                    "max_score_difference": round(a.max_score_difference, 4),
                    "agrees": a.passes,
                }
            )
        return rows


def choose(measurement: Measurement, router: Router) -> Choice:
    """The fastest candidate that agrees with float32 under ``router``'s rules and beats it clearly; else float32."""
    reference = measurement.reference.probabilities
    agreements = {m.engine: agreement(router, reference, m.probabilities) for m in measurement.candidates}
    qualified = [m for m in measurement.candidates if agreements[m.engine].passes and m.speed_ratio >= MIN_SPEEDUP]
    best = max(qualified, key=lambda m: m.speed_ratio, default=None)
    return Choice(best.engine if best else measurement.reference.engine, agreements, measurement)


# -- measuring ------------------------------------------------------------------------------------


def check_texts(model: ModelSettings) -> tuple[list[str], str]:
    """The check set and where it came from: the operator's file, the model directory's, or the built-in mix."""
    if model.precision_check_file:
        path = Path(model.precision_check_file)
        if not path.is_file():
            raise ConfigError(f"FILTER_MODEL__PRECISION_CHECK_FILE={model.precision_check_file}: no such file")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ConfigError(f"FILTER_MODEL__PRECISION_CHECK_FILE={model.precision_check_file}: no non-empty lines")
        return texts, str(path)
    shipped = Path(model.name) / CHECK_FILE_NAME
    if shipped.is_file():
        texts = [line for line in shipped.read_text(encoding="utf-8").splitlines() if line.strip()]
        if texts:
            return texts, str(shipped)
    return message_mix(CHECK_TEXTS, seed=0), "built-in multilingual mix"


def timed_passes(
    classifier: Classifier, rows: Sequence[Sequence[int]], groups: Sequence[Sequence[int]]
) -> tuple[np.ndarray, float]:
    """Probabilities of ``rows`` passed in ``groups`` (length-sorted batches), and the seconds it took.

    An engine with several streams runs that many passes at once, as the worker does: timed one at a
    time, each would run on its share of the threads only.
    """
    probs = np.zeros((len(rows), len(classifier.labels)), dtype=np.float32)
    started = time.perf_counter()
    scores = classifier.predict_many([[rows[i] for i in group] for group in groups])
    seconds = time.perf_counter() - started
    for group, group_scores in zip(groups, scores, strict=True):
        probs[list(group)] = group_scores
    return probs, seconds


def measure(
    reference: Classifier,
    load: Callable[[Engine], Classifier],
    candidates: Sequence[Engine],
    texts: Sequence[str],
    batch_size: int,
    key: str,
    capabilities: frozenset[str],
    budget_s: float = CHECK_BUDGET_S,
) -> Measurement:
    """Each candidate against ``reference`` (float32): decisions on every text, speed in ``SPEED_ROUNDS`` rounds.

    Every candidate is loaded first (one that cannot load is left out, with a warning), so peak memory
    is float32 and all candidates at once; the chosen one is derived or loaded again afterwards. Each
    engine's probabilities come from one pass over every check text, which is also its warm-up. Then
    every round runs every engine (float32 and each candidate) once over the timed set, round ``r``
    starting at engine ``r mod n``, so each engine's rounds are spread over the whole check: a burst of
    other load lasting a few seconds slows some of every engine's rounds instead of all of one
    candidate's, and cannot decide the choice alone (with one candidate at a time beside float32, such a
    burst on bfloat16's block made auto choose onnx int8 at 2.28x over bfloat16 at 3.08x). An engine's
    speed is its fastest round, and a candidate's ratio is against float32's fastest round: other
    processes only ever slow a pass down, so the fastest pass is the closest to what the machine runs
    unhindered (at load average 6-10 on 2 cores, the median of paired ratios chose int8 at 2.9x over
    bfloat16 at 2.2x where bench's interleaved rounds read 2.3x and 5.5x). When the first float32 pass
    shows that the rounds would take longer than ``budget_s``, they run on a thinned check set (every
    k-th text by length, so the length mix stays).
    """
    started = time.perf_counter()
    rows = [t.ids for t in reference.tokenize(texts)]
    groups = plan_batches([len(r) for r in rows], batch_size, 16_384)
    reference.predict(rows[:batch_size])  # warm-up
    reference_probs, first = timed_passes(reference, rows, groups)
    timed, timed_groups = rows, groups
    estimate = first * (1 + len(candidates)) * SPEED_ROUNDS  # float32 and every candidate in every round
    if estimate > budget_s:
        keep = max(batch_size, int(len(rows) * budget_s / estimate))
        by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        timed = [rows[i] for i in sorted(by_length[:: max(1, len(rows) // keep)])]
        timed_groups = plan_batches([len(r) for r in timed], batch_size, 16_384)
    loaded: dict[Engine, Classifier] = {}
    probabilities: dict[Engine, np.ndarray] = {}
    for engine in candidates:
        try:
            loaded[engine] = load(engine)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot load is left out, with the reason
            log.warning("precision candidate could not load; left out", engine=engine.name, error=str(exc))
            continue
        # Also the warm-up: kernels pick their paths on first use.
        probabilities[engine] = timed_passes(loaded[engine], rows, groups)[0]
    # Every engine once a round, round n starting at engine n mod len(engines): no candidate loaded, no rounds.
    engines: list[tuple[Engine, Classifier]] = [(REFERENCE, reference), *loaded.items()] if loaded else []
    round_seconds: dict[Engine, list[float]] = {engine: [] for engine, _ in engines}
    for n in range(SPEED_ROUNDS if engines else 0):
        first_engine = n % len(engines)
        for engine, classifier in engines[first_engine:] + engines[:first_engine]:
            round_seconds[engine].append(timed_passes(classifier, timed, timed_groups)[1])
    reference_seconds = round_seconds.pop(REFERENCE, [])
    fastest = {engine: (min(times), probabilities[engine]) for engine, times in round_seconds.items()}
    best_reference = min(reference_seconds, default=first * len(timed) / len(rows))
    measured = [
        Measured(engine, probs, len(timed) / seconds, best_reference / seconds)
        for engine, (seconds, probs) in fastest.items()
    ]
    ref = Measured(REFERENCE, reference_probs, len(timed) / best_reference, 1.0)
    return Measurement(key, capabilities, ref, measured, time.perf_counter() - started)


# -- loading ----------------------------------------------------------------------------------------


class Precision:
    """The loaded classifier, how its precision was decided, and the re-check a rule reload runs.

    ``source``: ``setting`` (FILTER_MODEL__DTYPE named it), ``auto`` (measured here or cached), or
    ``fallback`` (a reload's rules made the chosen precision disagree, so float32 runs now).
    """

    def __init__(self, classifier: Classifier, source: str, choice: Choice | None, model: ModelSettings) -> None:
        self.classifier = classifier
        self.source = source
        self.choice = choice
        self._model = model

    def recheck(self, router: Router) -> bool:
        """Under reloaded rules, keep the chosen precision only if it still agrees; else switch to float32.

        Re-routes the cached check-set probabilities (no model run). On disagreement float32 weights
        are loaded and swapped in as the classifier's engine; the next forward pass uses them. Returns
        whether it switched. A float32 load that fails raises ``ConfigError``: the reload is refused
        and the old rules stay, rather than route the new rules with an unchecked precision.
        """
        choice = self.choice
        if choice is None or self.source != "auto" or choice.engine == REFERENCE:
            return False
        measured = next(m for m in choice.measurement.candidates if m.engine == choice.engine)
        checked = agreement(router, choice.measurement.reference.probabilities, measured.probabilities)
        if checked.passes:
            log.info(
                "precision re-checked under the reloaded rules: it still agrees", **_fields(choice.engine, checked)
            )
            return False
        try:
            fallback = Classifier.load(self._model.model_copy(update={"backend": "torch", "dtype": "float32"}))
        except Exception as exc:  # noqa: BLE001 - any load failure refuses the reload, with its reason
            raise ConfigError(
                f"the reloaded rules make {choice.engine.name} disagree with float32 and float32 could not load ({exc})"
            ) from exc
        self.classifier.engine = fallback.engine
        self.classifier.dtype, self.classifier.backend = "float32", "torch"
        self.source = "fallback"
        log.warning(
            "precision falls back to float32: under the reloaded rules the chosen precision routes differently",
            **_fields(choice.engine, checked),
        )
        return True


def _fields(engine: Engine, checked: Agreement) -> dict[str, Any]:
    return {
        "engine": engine.name,
        "same_action": round(checked.same_action, 4),
        "allow_drop_moves": checked.allow_drop_moves,
        "max_score_difference": round(checked.max_score_difference, 4),
    }


def _release_freed_memory() -> None:
    """Hand the measured candidates' freed memory back to the system (glibc keeps freed heap otherwise).

    Measured on the default model's shape: a worker that had just measured kept 1428 MiB resident,
    against 846 MiB started from the cache; with the trim, 846 MiB right after measuring.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def onnx_graphs(model: ModelSettings) -> list[str]:
    """The ONNX graphs exported into the model directory, when ONNX Runtime is installed."""
    from filter_worker.model import onnx_engine

    try:
        onnx_engine.runtime()
    except ConfigError:
        return []
    directory = Path(model.name)
    return [dtype for dtype, file in onnx_engine.GRAPH_FILES.items() if (directory / file).is_file()]


def load(model: ModelSettings, routing: RoutingSettings, batch_size: int) -> Precision:
    """The classifier at the precision ``model`` names, or with ``FILTER_MODEL__DTYPE=auto`` the one measured best.

    An explicit dtype always wins (with a warning when the device only emulates it); an explicit
    backend limits the candidates to its own engines.
    """
    import torch

    # Too many streams is refused before any load or measurement; the number is also the cache key's:
    # auto and the number it stands for measure the same.
    streams = openvino_engine.resolve_streams(model.streams, torch.get_num_threads())
    if model.dtype != "auto":
        classifier = Classifier.load(model)
        warning = emulation_warning(classifier.dtype, classifier.device, device_capabilities(classifier.device))
        if warning:
            log.warning(warning)
        return Precision(classifier, "setting", None, model)
    if model.backend == "auto":
        backends: tuple[str, ...] = ("torch", "onnx", *(("openvino",) if openvino_engine.available() else ()))
    else:
        backends = (model.backend,)
    if model.backend == "openvino":
        openvino_engine.runtime()  # not installed: the sentence saying how, before anything is loaded
    reference = Classifier.load(model.model_copy(update={"backend": "torch", "dtype": "float32"}))
    capabilities = device_capabilities(reference.device)
    graphs = onnx_graphs(model) if "onnx" in backends and Path(model.name).is_dir() else []
    candidates = native_candidates(reference.device, capabilities, backends, graphs)
    explicit = Engine(model.backend, "float32") if model.backend in ("onnx", "openvino") else None
    if explicit is not None and explicit not in candidates:
        candidates.insert(0, explicit)  # what the operator asked for must at least run
    if not candidates:
        log.info(
            "precision chosen",
            engine=REFERENCE.name,
            capabilities=sorted(capabilities),
            candidates=[],
            reason="no precision runs natively faster than float32 here (no AMX, AVX-512 BF16 or VNNI)",
        )
        return Precision(reference, "auto", None, model)
    texts, origin = check_texts(model)
    key = cache_key(
        capabilities,
        reference.device,
        reference.weights_sha256,
        reference.head.function,
        candidates,
        texts,
        batch_size,
        streams,
    )

    def load_engine(engine: Engine) -> Classifier:
        if engine.backend in ("torch", "openvino"):  # no second read of the weights
            return reference.at_precision(engine.dtype, engine.backend, streams)
        return Classifier.load(model.model_copy(update={"backend": engine.backend, "dtype": engine.dtype}))

    measurement = read_cached(model, key)
    if measurement is None:
        measurement = measure(reference, load_engine, candidates, texts, batch_size, key, capabilities)
        write_cached(model, measurement)
        _release_freed_memory()
    choice = choose(measurement, Router(routing, reference.head))
    engine = choice.engine
    if explicit is not None and engine.backend != explicit.backend:
        engine = explicit  # the explicit backend wins; its float32 decides as torch float32 does
    classifier = reference if engine == REFERENCE else load_engine(engine)
    if classifier is not reference:
        # The float32 module is no longer needed (a reload's fallback loads it again): without this the
        # measured start kept it, 1726 MiB resident against 1127 MiB from the cache (openvino bfloat16).
        del load_engine, reference
        _release_freed_memory()
    log.info(
        "precision chosen",
        engine=engine.name,
        streams=classifier.streams,
        capabilities=sorted(capabilities),
        float32_records_per_s=round(measurement.reference.records_per_s, 1),
        candidates=choice.summary(),
        rule=f">= {MIN_SAME_ACTION:.1%} same action, no allow<->drop move, >= {MIN_SPEEDUP}x float32",
        check_texts=f"{len(texts)} from {origin}",
        cached=measurement.cached,
        seconds=round(measurement.seconds, 1),
    )
    return Precision(classifier, "auto", Choice(engine, choice.agreements, measurement), model)
