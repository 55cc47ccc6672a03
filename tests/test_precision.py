"""FILTER_MODEL__DTYPE=auto: native precisions, agreement with float32, the cache, the choice, the reload re-check."""

from __future__ import annotations

import numpy as np
import pytest
from structlog.testing import capture_logs

from filter_worker.config import ConfigError, ModelSettings, RoutingSettings, Rule
from filter_worker.model import capabilities, precision, precision_cache
from filter_worker.model.capabilities import Engine
from filter_worker.model.classifier import Classifier, Tokenized
from filter_worker.model.head import Head
from filter_worker.model.precision_cache import Measured, Measurement
from filter_worker.pipeline.routing import Router
from tests.clock import ManualClock

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]
HEAD = Head(tuple(LABELS), "softmax")
AMX = frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2"})
VNNI = frozenset({"avx512_vnni", "avx512f", "avx2"})
AVX2 = frozenset({"avx2"})

CPUINFO_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"


def test_cpu_capabilities_are_read_from_cpuinfo():
    assert capabilities.cpu_capabilities(CPUINFO_AMX) == AMX
    assert capabilities.cpu_capabilities(CPUINFO_AVX2) == AVX2


@pytest.mark.parametrize(
    ("device", "flags", "backends", "graphs", "expected"),
    [
        (
            "cpu",
            AMX,
            ("torch", "onnx"),
            ["float32", "int8"],
            ["torch bfloat16", "torch int8", "onnx float32", "onnx int8"],
        ),
        ("cpu", AMX, ("torch", "onnx"), [], ["torch bfloat16", "torch int8"]),  # no graph exported: no onnx
        ("cpu", AMX, ("torch", "onnx", "openvino"), [], ["torch bfloat16", "torch int8", "openvino bfloat16"]),
        ("cpu", VNNI, ("torch", "openvino"), [], ["torch int8"]),  # openvino's bfloat16 needs AMX or AVX-512 BF16
        ("cpu", AMX, ("torch",), ["float32", "int8"], ["torch bfloat16", "torch int8"]),  # explicit backend
        ("cpu", VNNI, ("torch", "onnx"), ["float32", "int8"], ["torch int8", "onnx float32", "onnx int8"]),
        ("cpu", AVX2, ("torch",), [], []),  # bfloat16 emulated, no VNNI: float32 it is
        ("cuda", frozenset({capabilities.CUDA_BF16}), ("torch", "onnx"), [], ["torch float16", "torch bfloat16"]),
        ("cuda:1", frozenset(), ("torch",), [], ["torch float16"]),
    ],
)
def test_candidates_are_what_the_device_runs_natively(device, flags, backends, graphs, expected):
    found = capabilities.native_candidates(device, flags, backends, graphs)
    assert [engine.name for engine in found] == expected


def test_an_explicit_precision_the_cpu_only_emulates_is_warned_about_naming_the_native_one():
    avx2 = capabilities.emulation_warning("bfloat16", "cpu", AVX2)
    assert avx2 is not None and "emulated" in avx2 and "float32 runs natively" in avx2
    vnni = capabilities.emulation_warning("bfloat16", "cpu", VNNI)
    assert vnni is not None and "int8 (VNNI) runs natively" in vnni
    assert capabilities.emulation_warning("bfloat16", "cpu", AMX) is None
    assert capabilities.emulation_warning("float32", "cpu", AVX2) is None
    assert "float16 runs natively" in (capabilities.emulation_warning("bfloat16", "cuda", frozenset()) or "")


def _router(drop: float = 0.9, quarantine: float = 0.75, scopes: list[dict] | None = None) -> Router:
    rules = [
        Rule(action="drop", labels=["Very Negative"], min_score=drop, name="very-negative"),
        Rule(action="quarantine", labels=["Very Negative", "Negative"], min_score=quarantine, name="negative"),
    ]
    return Router(RoutingSettings(rules=rules, scopes=scopes or []), HEAD)


def _rows(very_negative: list[float]) -> np.ndarray:
    """Probability rows with the given Very Negative share, the rest on Neutral."""
    p = np.zeros((len(very_negative), len(LABELS)), dtype=np.float32)
    p[:, 0] = very_negative
    p[:, 2] = 1.0 - p[:, 0]
    return p


def test_agreement_counts_changed_actions_and_allow_drop_moves_against_known_truth():
    rng = np.random.default_rng(3)
    reference = _rows(list(rng.uniform(0.0, 0.6, 1000)))  # all allow: far from both thresholds
    same = precision.agreement(_router(), reference, reference.copy())
    assert (same.records, same.same_action, same.allow_drop_moves, same.max_score_difference) == (1000, 1.0, 0, 0.0)
    assert same.passes

    moved = reference.copy()
    moved[:4] = _rows([0.8] * 4)  # four records allow -> quarantine: 99.6 % the same
    four = precision.agreement(_router(), reference, moved)
    assert four.same_action == pytest.approx(0.996) and four.allow_drop_moves == 0 and four.passes
    assert four.max_score_difference == pytest.approx(0.8 - reference[:4, 0].min(), abs=1e-6)

    moved[:6] = _rows([0.8] * 6)  # six: 99.4 %, below the bound
    assert not precision.agreement(_router(), reference, moved).passes

    dropped = reference.copy()
    dropped[0] = _rows([0.95])[0]  # one record allow -> drop: refused however rare
    one = precision.agreement(_router(), reference, dropped)
    assert one.same_action == pytest.approx(0.999) and one.allow_drop_moves == 1 and not one.passes


def test_agreement_checks_every_scopes_rules():
    reference = _rows([0.5] * 100)
    candidate = _rows([0.5] * 99 + [0.7])  # moves only under the strict scope's quarantine at 0.6
    strict = [
        {
            "name": "kids",
            "match": {"topics": ["kids"]},
            "rules": [{"action": "quarantine", "labels": ["Very Negative"], "min_score": 0.6}],
        }
    ]
    checked = precision.agreement(_router(scopes=strict), reference, candidate)
    assert checked.records == 200 and checked.same_action == pytest.approx(199 / 200)


def _measurement(candidates: dict[Engine, tuple[float, np.ndarray]], reference: np.ndarray) -> Measurement:
    ref = Measured(precision.REFERENCE, reference, 100.0, 1.0)
    measured = [Measured(e, probs, 100.0 * ratio, ratio) for e, (ratio, probs) in candidates.items()]
    return Measurement("k" * 64, AMX, ref, measured, 1.5)


BF16, INT8, ONNX_INT8 = Engine("torch", "bfloat16"), Engine("torch", "int8"), Engine("onnx", "int8")


def test_the_fastest_candidate_that_agrees_is_chosen_else_float32():
    reference = _rows(list(np.linspace(0.0, 0.6, 500)))
    disagreeing = reference.copy()
    disagreeing[:10] = _rows([0.8] * 10)
    chosen = precision.choose(
        _measurement({BF16: (3.0, reference), INT8: (1.8, reference), ONNX_INT8: (3.5, disagreeing)}, reference),
        _router(),
    )
    assert chosen.engine == BF16, "onnx int8 is faster but changes 2 % of the actions"
    rows = {row["engine"]: row for row in chosen.summary()}
    assert rows["onnx int8"]["agrees"] is False and rows["onnx int8"]["same_action"] == 0.98
    assert rows["torch bfloat16"]["vs_float32"] == 3.0

    slow = precision.choose(_measurement({BF16: (1.05, reference)}, reference), _router())
    assert slow.engine == precision.REFERENCE, "a few percent is noise, not a reason to change precision"
    assert precision.choose(_measurement({}, reference), _router()).engine == precision.REFERENCE


def test_a_measurement_survives_the_cache_and_unwritable_caches_only_warn(tmp_path):
    reference = _rows([0.1, 0.2, 0.3])
    measurement = _measurement({BF16: (2.9, reference + 0.001)}, reference)
    model = ModelSettings(name="acme/model", precision_cache_dir=str(tmp_path / "cache"))
    assert precision_cache.read_cached(model, measurement.key) is None
    assert precision_cache.write_cached(model, measurement) == tmp_path / "cache" / f"{measurement.key}.json"
    again = precision_cache.read_cached(model, measurement.key)
    assert again is not None and again.cached and again.candidates[0].speed_ratio == 2.9
    np.testing.assert_array_equal(again.candidates[0].probabilities, reference + 0.001)
    assert precision_cache.read_cached(model, "0" * 64) is None

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    unwritable = ModelSettings(name="acme/model", precision_cache_dir=str(blocked / "cache"))
    with capture_logs() as logs:
        assert precision_cache.write_cached(unwritable, measurement) is None
    assert any("FILTER_MODEL__PRECISION_CACHE_DIR" in entry["event"] for entry in logs)


def test_a_read_only_model_volume_can_ship_the_measurement(tiny_model, tmp_path):
    reference = _rows([0.1, 0.2])
    measurement = _measurement({BF16: (2.0, reference)}, reference)
    shipped = tiny_model / "precision"
    shipped.mkdir(exist_ok=True)
    (shipped / f"{measurement.key}.json").write_bytes(measurement.to_json())
    model = ModelSettings(name=str(tiny_model), precision_cache_dir=str(tmp_path / "empty"))
    found = precision_cache.read_cached(model, measurement.key)
    assert found is not None and found.candidates[0].engine == BF16
    (shipped / f"{measurement.key}.json").unlink()


# -- the speed rounds under a burst of other load, on a fake clock ----------------------------------------------

ONNX_FLOAT32 = Engine("onnx", "float32")
BURST_SLOWDOWN = 3.0
# Other load on the machine from 0.7 s to 8.6 s of the check: float32's first pass (0.6 s after a 0.12 s
# warm-up) has ended, and under the old blocked scheme bfloat16's whole block (its pass and 3 paired rounds
# beside float32, 7.8 s when slowed) falls inside it.
BURST = (0.7, 8.6)


class _TimedEngine:
    """Classifier-like: each batch advances the fake clock by ``per_text`` a text, ``BURST_SLOWDOWN`` times
    that when the batch starts during the burst (whatever runs then is slowed, whichever engine it is)."""

    labels = LABELS

    def __init__(self, engine: Engine, per_text: float, clock: ManualClock, burst: tuple[float, float]) -> None:
        self.engine, self.per_text, self._clock, self._burst = engine, per_text, clock, burst

    def tokenize(self, texts):
        return [Tokenized([101, 7, 8, 9, 102], False) for _ in texts]

    def predict(self, rows):
        slowed = self._burst[0] <= self._clock.now < self._burst[1]
        self._clock.now += self.per_text * len(rows) * (BURST_SLOWDOWN if slowed else 1.0)
        return _rows([0.1] * len(rows))

    def predict_many(self, batches):  # one stream: one pass after the other, as Classifier.predict_many
        return [self.predict(rows) for rows in batches]


def _timed_check(monkeypatch, burst: tuple[float, float]):
    """float32 at 0.03 s a text, bfloat16 3x as fast, onnx int8 2x; onnx float32 cannot load.

    Returns the clock, the engines and a log of every timed pass (engine name, texts) in the order run.
    """
    clock = ManualClock(0.0)
    monkeypatch.setattr(precision, "time", type("FakeTime", (), {"perf_counter": staticmethod(clock)}))
    engines = {
        precision.REFERENCE: _TimedEngine(precision.REFERENCE, 0.03, clock, burst),
        BF16: _TimedEngine(BF16, 0.01, clock, burst),
        ONNX_INT8: _TimedEngine(ONNX_INT8, 0.015, clock, burst),
    }
    passes: list[tuple[str, int]] = []
    timed_passes = precision.timed_passes

    def recorded(classifier, rows, groups):
        passes.append((classifier.engine.name, len(rows)))
        return timed_passes(classifier, rows, groups)

    monkeypatch.setattr(precision, "timed_passes", recorded)
    return clock, engines, passes


def _load(engines):
    def load(engine: Engine):
        if engine not in engines:
            raise RuntimeError(f"no graph for {engine.name}")
        return engines[engine]

    return load


def _blocked_ratios(reference, candidates, rows, groups, batch_size):
    """The old scheme, replayed: each candidate in its own block of paired rounds beside float32."""
    reference.predict(rows[:batch_size])
    precision.timed_passes(reference, rows, groups)
    reference_seconds: list[float] = []
    fastest = {}
    for engine, model in candidates.items():
        precision.timed_passes(model, rows, groups)
        seconds: list[float] = []
        for n in range(precision.SPEED_ROUNDS):
            for classifier in [reference, model] if n % 2 == 0 else [model, reference]:
                (seconds if classifier is model else reference_seconds).append(
                    precision.timed_passes(classifier, rows, groups)[1]
                )
        fastest[engine] = min(seconds)
    return {engine: min(reference_seconds) / seconds for engine, seconds in fastest.items()}


def test_a_burst_of_load_cannot_decide_the_choice_every_engine_runs_in_every_round_in_rotated_order(monkeypatch):
    texts, batch_size = [f"text {i}" for i in range(20)], 4
    clock, engines, passes = _timed_check(monkeypatch, BURST)
    reference = engines[precision.REFERENCE]
    rows = [t.ids for t in reference.tokenize(texts)]
    groups = precision.plan_batches([len(r) for r in rows], batch_size, 16_384)
    blocked = _blocked_ratios(reference, {BF16: engines[BF16], ONNX_INT8: engines[ONNX_INT8]}, rows, groups, batch_size)
    assert blocked[BF16] < precision.MIN_SPEEDUP < blocked[ONNX_INT8], "the burst covers bfloat16's block"

    clock.now, passes[:] = 0.0, []
    with capture_logs() as logs:
        measurement = precision.measure(
            reference, _load(engines), [BF16, ONNX_FLOAT32, ONNX_INT8], texts, batch_size, "k" * 64, AMX
        )
    assert any(e["event"].endswith("left out") and e["engine"] == "onnx float32" for e in logs)
    ratios = {m.engine: m.speed_ratio for m in measurement.candidates}
    assert list(ratios) == [BF16, ONNX_INT8]
    assert ratios[BF16] == pytest.approx(3.0) and ratios[ONNX_INT8] == pytest.approx(2.0)
    assert measurement.reference.records_per_s == pytest.approx(20 / 0.6)
    assert precision.choose(measurement, _router()).engine == BF16

    f32, bf16, int8 = precision.REFERENCE.name, BF16.name, ONNX_INT8.name
    assert [name for name, _ in passes] == [
        f32,  # the decisions: every candidate loaded, one pass each over every check text
        bf16,
        int8,
        f32,  # round 0 starts at engine 0
        bf16,
        int8,
        bf16,  # round 1 at engine 1
        int8,
        f32,
        int8,  # round 2 at engine 2
        f32,
        bf16,
    ]


def test_the_speed_rounds_are_thinned_to_the_budget_counting_every_engine_in_every_round(monkeypatch):
    texts, batch_size = [f"text {i}" for i in range(20)], 4
    _clock, engines, passes = _timed_check(monkeypatch, (0.0, 0.0))
    # First float32 pass 0.6 s; (1 + 3 candidates) x 3 rounds = 7.2 s of passes against a 3.6 s budget:
    # every 2nd text by length (the old count, 2 x 3 rounds x 3 candidates = 10.8 s, kept every 3rd).
    measurement = precision.measure(
        engines[precision.REFERENCE],
        _load(engines),
        [BF16, ONNX_FLOAT32, ONNX_INT8],
        texts,
        batch_size,
        "k" * 64,
        AMX,
        budget_s=3.6,
    )
    assert [n for _, n in passes] == [20, 20, 20] + [10] * 9
    assert measurement.reference.records_per_s == pytest.approx(10 / 0.3)
    assert {m.engine: m.speed_ratio for m in measurement.candidates} == pytest.approx({BF16: 3.0, ONNX_INT8: 2.0})


def test_check_texts_come_from_the_operators_file_then_the_model_directory_then_the_built_in_mix(tiny_model, tmp_path):
    texts, origin = precision.check_texts(ModelSettings(name=str(tiny_model)))
    assert len(texts) == precision.CHECK_TEXTS and origin == "built-in multilingual mix"
    own = tmp_path / "mine.txt"
    own.write_text("one\n\ntwo\n")
    assert precision.check_texts(ModelSettings(name=str(tiny_model), precision_check_file=str(own)))[0] == [
        "one",
        "two",
    ]
    with pytest.raises(ConfigError, match="FILTER_MODEL__PRECISION_CHECK_FILE=.*: no such file"):
        precision.check_texts(ModelSettings(name=str(tiny_model), precision_check_file=str(tmp_path / "missing")))


def test_auto_on_an_avx2_cpu_runs_float32_without_measuring(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "device_capabilities", lambda device: AVX2)
    model = ModelSettings(name=str(tiny_model), precision_cache_dir=str(tmp_path / "cache"))
    with capture_logs() as logs:
        loaded = precision.load(model, RoutingSettings(), 32)
    assert (loaded.classifier.backend, loaded.classifier.dtype, loaded.source) == ("torch", "float32", "auto")
    assert not (tmp_path / "cache").exists(), "nothing measured, nothing cached"
    chosen = [entry for entry in logs if entry["event"] == "precision chosen"]
    assert chosen and chosen[0]["engine"] == "torch float32" and chosen[0]["candidates"] == []


def test_an_explicit_precision_wins_and_an_emulated_one_is_warned_about(tiny_model, monkeypatch):
    monkeypatch.setattr(precision, "device_capabilities", lambda device: AVX2)
    with capture_logs() as logs:
        loaded = precision.load(ModelSettings(name=str(tiny_model), dtype="bfloat16"), RoutingSettings(), 32)
    assert (loaded.classifier.dtype, loaded.source, loaded.choice) == ("bfloat16", "setting", None)
    assert any("bfloat16 is emulated" in entry["event"] for entry in logs)


def test_auto_measures_once_logs_the_comparison_and_restarts_from_the_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "device_capabilities", lambda device: AMX)
    # The tiny model is too small for any precision to win clearly; what is checked is the flow.
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    model = ModelSettings(name=str(tiny_model), backend="torch", precision_cache_dir=str(tmp_path / "cache"))
    with capture_logs() as logs:
        first = precision.load(model, RoutingSettings(), 32)
    chosen = next(entry for entry in logs if entry["event"] == "precision chosen")
    assert {row["engine"] for row in chosen["candidates"]} == {"torch bfloat16", "torch int8"}
    assert chosen["cached"] is False and chosen["engine"] == f"torch {first.classifier.dtype}"
    assert all(row["agrees"] for row in chosen["candidates"]), "random weights: scores far from every threshold"
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(precision, "measure", no_measuring)
    with capture_logs() as logs:
        second = precision.load(model, RoutingSettings(), 32)
    assert next(e for e in logs if e["event"] == "precision chosen")["cached"] is True
    assert second.classifier.dtype == first.classifier.dtype


def test_a_reload_whose_rules_make_the_choice_disagree_falls_back_to_float32(tiny_model):
    settings = ModelSettings(name=str(tiny_model))
    classifier = Classifier.load(settings.model_copy(update={"dtype": "bfloat16"}))
    reference = _rows([0.5] * 200)
    candidate = _rows([0.5] * 190 + [0.8] * 10)  # above 0.75 where float32 is below it
    measurement = _measurement({BF16: (3.0, candidate)}, reference)
    loose = Router(RoutingSettings(rules=[Rule(action="quarantine", labels=["Very Negative"], min_score=0.9)]), HEAD)
    choice = precision.choose(measurement, loose)
    assert choice.engine == BF16
    loaded = precision.Precision(classifier, "auto", choice, settings)

    with capture_logs() as logs:
        assert loaded.recheck(loose) is False  # still agrees: nothing changes
    assert classifier.dtype == "bfloat16"
    assert any("still agrees" in entry["event"] for entry in logs)

    with capture_logs() as logs:
        assert loaded.recheck(_router()) is True  # quarantine at 0.75: 5 % of the actions change
    assert (classifier.dtype, classifier.backend, loaded.source) == ("float32", "torch", "fallback")
    warning = next(entry for entry in logs if "falls back to float32" in entry["event"])
    assert warning["same_action"] == 0.95 and warning["engine"] == "torch bfloat16"
    float32 = Classifier.load(settings.model_copy(update={"dtype": "float32"}))
    ids = [t.ids for t in classifier.tokenize(["you idiot", "hello there"])]
    np.testing.assert_array_equal(classifier.predict(ids), float32.predict(ids))
    assert loaded.recheck(loose) is False, "after the fallback nothing is re-checked: float32 is the reference"


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_precision_derived_from_the_loaded_float32_model_is_the_one_a_load_gives(tiny_model, dtype):
    float32 = Classifier.load(ModelSettings(name=str(tiny_model), dtype="float32"))
    derived, loaded = float32.at_precision(dtype), Classifier.load(ModelSettings(name=str(tiny_model), dtype=dtype))
    assert (derived.dtype, derived.backend, derived.identity) == (dtype, "torch", loaded.identity)
    ids = [t.ids for t in float32.tokenize(["you idiot", "a wonderful day, thanks", "hello"])]
    np.testing.assert_array_equal(derived.predict(ids), loaded.predict(ids))
    assert float32.dtype == "float32" and not np.array_equal(float32.predict(ids), derived.predict(ids))


def test_exported_onnx_graphs_are_candidates_and_an_explicit_onnx_backend_keeps_to_them(
    tiny_model, tmp_path, monkeypatch
):
    import shutil

    from filter_worker.model import onnx_export

    directory = tmp_path / "model"
    shutil.copytree(tiny_model, directory)
    onnx_export.export(directory)
    monkeypatch.setattr(precision, "device_capabilities", lambda device: AMX)
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)
    with capture_logs() as logs:
        loaded = precision.load(
            ModelSettings(name=str(directory), precision_cache_dir=str(tmp_path / "cache")), RoutingSettings(), 32
        )
    chosen = next(entry for entry in logs if entry["event"] == "precision chosen")
    names = [row["engine"] for row in chosen["candidates"]]
    assert names == ["torch bfloat16", "torch int8", "onnx float32", "onnx int8", "openvino bfloat16"]
    assert chosen["engine"] == f"{loaded.classifier.backend} {loaded.classifier.dtype}"
    onnx_float32 = next(row for row in chosen["candidates"] if row["engine"] == "onnx float32")
    assert onnx_float32["max_score_difference"] <= 1e-4 and onnx_float32["agrees"]

    with capture_logs() as logs:
        onnx_only = precision.load(
            ModelSettings(name=str(directory), backend="onnx", precision_cache_dir=str(tmp_path / "cache")),
            RoutingSettings(),
            32,
        )
    chosen = next(entry for entry in logs if entry["event"] == "precision chosen")
    assert [row["engine"] for row in chosen["candidates"]] == ["onnx float32", "onnx int8"]
    assert onnx_only.classifier.backend == "onnx"
