"""``filter-worker bench``: every phase on a tiny model writes a complete JSON report (no timings asserted);
options that cannot work are refused before any phase; the rules that judge a run."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import orjson
import pytest

from filter_worker.tools.bench import BenchOptions
from filter_worker.tools.bench.report import judge_end_to_end
from filter_worker.tools.bench.throughput import where_the_time_goes
from filter_worker.tools.bench.variants import variant_list
from tests.test_cli import cli


@pytest.mark.integration
def test_bench_runs_every_phase_and_writes_the_report(tiny_model, bootstrap_servers, tmp_path):
    report_path = tmp_path / "bench.json"
    result = cli(
        "bench",
        "--model", str(tiny_model),
        "--dtype", "float32",  # auto's choice depends on the machine: test_bench_with_auto_precision covers it
        "--bootstrap-servers", bootstrap_servers,
        "--messages", "40",
        "--duplicate-ratio", "0.25",
        "--rounds", "2",
        "--batch-size", "8",
        "--naive-count", "5",
        "--arrival-count", "16",
        "--compare-count", "10",
        "--compare-dtypes", "int8",
        "--rate", "20",
        "--latency-seconds", "1",
        "--json", str(report_path),
        # The embedded broker joins groups and answers fetches faster with these (what bench sets for it).
        FILTER_KAFKA__SESSION_TIMEOUT_MS="6000",
        FILTER_KAFKA__CONSUMER_PROPERTIES='{"fetch.wait.max.ms": "10"}',
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "end to end / ceiling" in result.stdout
    report = orjson.loads(report_path.read_bytes())

    env = report["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["torch_threads"] >= 1
    assert report["workload"]["messages"] == 40 and report["workload"]["batch_max_size"] == 8
    for phase in ("model_only", "model_only_arrival_order", "end_to_end", "end_to_end_cached", "naive"):
        assert report[phase]["messages_per_s"] > 0, phase
    assert report["model_only"]["messages"] == 40 and report["model_only_arrival_order"]["messages"] == 16
    assert 0 < report["model_only"]["padding_efficiency"] <= 1
    for run in ("end_to_end", "end_to_end_cached"):
        assert report[run]["published"] == 40
        assert 0 < report[run]["padding_efficiency"] <= 1
    assert report["end_to_end"]["cache_hits"] == 0 and report["end_to_end_cached"]["cache_hits"] > 0
    assert report["naive"]["messages"] == 5
    rounds = report["end_to_end_rounds"]
    assert len(rounds) == 2 and all(len(r["ceiling_messages_per_s"]) == 2 for r in rounds)
    # The reported run is the lower-median round, and the ratio is that round's.
    assert report["end_to_end"] == min(rounds, key=lambda r: r["vs_model_only"])
    assert report["ratios"]["end_to_end_vs_model_only"] == report["end_to_end"]["vs_model_only"]
    for r in rounds:  # every pass of the worker was recorded and replayed; the shares multiply to the round's ratio
        assert r["recorded_passes"] == r["forward_passes"] > 0 and r["passes_alone_s"] > 0
        shares = r["where_the_time_goes"]
        assert shares["keep_up"] == pytest.approx(r["vs_model_only"])
        assert shares["model_busy"] == pytest.approx(r["passes_inside_s"] / r["seconds"])
    assert "where the time goes (median round)" in result.stdout

    latency = report["latency"]
    assert latency["messages"] == 20 and latency["offered_rate"] == 20
    assert 0 <= latency["p50_s"] <= latency["p95_s"] <= latency["p99_s"] <= latency["max_s"]

    assert set(report["variants"]) == {"torch float32", "torch int8"}, "torch only: no other backend configured"
    int8 = report["variants"]["torch int8"]
    assert int8["messages"] == 10 and 0 <= int8["action_changed_share"] <= 1
    assert len(int8["speed_ratios"]) == 3 and int8["speed_ratio"] == sorted(int8["speed_ratios"])[1]
    assert set(report["ratios"]) >= {"end_to_end_vs_model_only", "end_to_end_vs_naive"}
    assert report["targets"]["end_to_end_vs_model_only"]["goal"] == 0.9
    assert "model_only_vs_torch_float32" not in report["targets"]
    chosen = report["precision"]
    assert (chosen["engine"], chosen["source"], chosen["check_set"]) == ("torch float32", "setting", [])
    assert chosen["agreement"]["same_action"] == 1.0 and chosen["agreement"]["max_score_difference"] == 0.0
    assert report["ratios"]["end_to_end_vs_float32_model_only"] > 0
    assert "end_to_end_vs_float32_model_only" not in report["targets"], "judged only when auto chose"


@pytest.mark.integration
def test_bench_with_auto_precision_prints_float32_beside_the_choice(
    tiny_model, bootstrap_servers, tmp_path, monkeypatch
):
    from filter_worker.config import load_settings
    from filter_worker.model import precision
    from filter_worker.tools.bench import run_bench

    monkeypatch.setattr(precision, "device_capabilities", lambda device: frozenset({"amx_bf16", "amx_int8", "avx2"}))
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 0.0)  # a tiny model wins nothing clearly: force a choice
    settings = load_settings(
        None,
        model={"name": str(tiny_model), "backend": "torch", "precision_cache_dir": str(tmp_path / "cache")},
        batch={"max_size": 8},
        kafka={"session_timeout_ms": 6000, "consumer_properties": {"fetch.wait.max.ms": "10"}},
    )
    printed: list[str] = []
    options = BenchOptions(
        messages=24,
        rounds=1,
        naive_count=5,
        arrival_count=8,
        compare_count=12,
        compare_rounds=1,
        latency_seconds=1,
        rate=20,
        plumbing_messages=200,
        bootstrap_servers=bootstrap_servers,
        json_path=str(tmp_path / "bench.json"),
        progress=printed.append,
    )
    report = run_bench(settings, options)
    chosen = report["precision"]
    assert chosen["source"] == "auto" and chosen["engine"] in ("torch bfloat16", "torch int8")
    assert {row["engine"] for row in chosen["check_set"]} == {"torch bfloat16", "torch int8"}
    assert chosen["agreement"]["texts"] == 12 and chosen["agreement"]["same_action"] == 1.0
    assert report["environment"]["dtype"] == chosen["engine"].split()[1]
    assert len(report["model_only_float32"]) == 2, "float32's ceiling before the first round and after the last"
    ratios = report["ratios"]
    float32 = sum(c["messages_per_s"] for c in report["model_only_float32"]) / 2
    assert ratios["end_to_end_vs_float32_model_only"] == pytest.approx(report["end_to_end"]["messages_per_s"] / float32)
    target = report["targets"]["end_to_end_vs_float32_model_only"]
    assert target["goal"] == 2.7 and target["measured"] == ratios["end_to_end_vs_float32_model_only"]
    table = "\n".join(printed)
    assert "end to end / torch float32 ceiling" in table and "start-up check set" in table
    assert "model only, torch float32, sorted (reference)" in table


@pytest.mark.integration
def test_bench_with_the_onnx_backend_compares_it_with_torch_float32(tiny_model, bootstrap_servers, tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model, model)  # the graph is exported into the model directory at first load
    report_path = tmp_path / "bench.json"
    result = cli(
        "bench",
        "--model", str(model),
        "--backend", "onnx",
        "--dtype", "int8",
        "--bootstrap-servers", bootstrap_servers,
        "--messages", "24",
        "--rounds", "1",
        "--batch-size", "8",
        "--compare-count", "12",
        "--compare-rounds", "2",
        "--plumbing-messages", "400",
        "--json", str(report_path),
        FILTER_KAFKA__SESSION_TIMEOUT_MS="6000",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads(report_path.read_bytes())
    env = report["environment"]
    assert (env["backend"], env["dtype"]) == ("onnx", "int8") and env["onnxruntime_threads"] >= 1
    assert report["end_to_end"]["published"] == 24
    assert report["naive"]["messages"] == 5 and report["latency"]["seconds"] == 2.0, "scaled down to 24 messages"
    assert set(report["variants"]) == {"torch float32", "torch bfloat16", "torch int8", "onnx float32", "onnx int8"}
    onnx_int8 = report["variants"]["onnx int8"]
    assert len(onnx_int8["speed_ratios"]) == 2 and 0 <= onnx_int8["action_changed_share"] <= 1
    assert report["variants"]["onnx float32"]["max_abs_probability_difference"] <= 1e-4
    target = report["targets"]["model_only_vs_torch_float32"]
    assert target["goal"] == 2.0 and target["measured"] == onnx_int8["speed_ratio"]
    e2e = report["targets"]["end_to_end_vs_model_only"]
    if e2e["measured"] < 0.9:  # a tiny model outruns one-by-one runs of 24 records: the check ran
        assert report["plumbing_capacity"]["messages"] == 400 and report["plumbing_capacity"]["messages_per_s"] > 0
    assert "onnx int8" in result.stdout and "speed" in result.stdout


@pytest.mark.integration
def test_plumbing_measures_the_worker_against_the_minimal_loop(bootstrap_servers, tmp_path):
    report_path = tmp_path / "plumbing.json"
    result = cli(
        "bench",
        "--plumbing",
        "--plumbing-messages", "600",
        "--rounds", "2",
        "--bootstrap-servers", bootstrap_servers,
        "--json", str(report_path),
        FILTER_KAFKA__SESSION_TIMEOUT_MS="6000",
        FILTER_KAFKA__CONSUMER_PROPERTIES='{"fetch.wait.max.ms": "10"}',
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads(report_path.read_bytes())
    assert report["workload"]["messages"] == 600 and len(report["rounds"]) == 2
    for one in report["rounds"]:
        assert one["worker"]["published"] == 600
        assert one["loop"]["messages"] == one["loop_tokenized"]["messages"] == 600
        worker = one["worker"]["messages"] / one["worker"]["seconds_to_last_ack"]
        assert one["worker_vs_loop"] == pytest.approx(worker / one["loop"]["messages_per_s"])
        assert one["worker_vs_loop_tokenized"] == pytest.approx(worker / one["loop_tokenized"]["messages_per_s"])
        # Without a forward pass every record still goes the whole way, and the rate is its own.
        assert one["worker_no_model"]["published"] == 600
        no_model = one["worker_no_model"]["messages"] / one["worker_no_model"]["seconds_to_last_ack"]
        assert one["worker_no_model_vs_loop_tokenized"] == pytest.approx(
            no_model / one["loop_tokenized"]["messages_per_s"]
        )
    # The reported round is the lower median by the ratio the target is judged on (no forward pass).
    lower_median = min(report["rounds"], key=lambda r: r["worker_no_model_vs_loop_tokenized"])
    assert report["worker_vs_loop_tokenized"] == lower_median["worker_vs_loop_tokenized"]
    assert report["near_free_model"]["model_only"]["messages_per_s"] > 0
    assert "worker / minimal loop with tokenizer" in result.stdout
    assert "worker without a forward pass / minimal loop with tokenizer" in result.stdout
    assert report["worker_no_model_vs_loop_tokenized"] == lower_median["worker_no_model_vs_loop_tokenized"]
    # CPU per record, by thread: the worker's model runs on a thread of its own, the loop's on the caller's.
    worker_cpu = lower_median["worker"]["cpu_us_per_record"]
    assert worker_cpu["loop_thread"] > 0 and worker_cpu["inference_thread"] > 0
    assert worker_cpu["process"] >= worker_cpu["loop_thread"] + worker_cpu["inference_thread"] - 1  # read in turn
    loop_cpu = lower_median["loop_tokenized"]["cpu_us_per_record"]
    assert set(loop_cpu) == {"process", "loop_thread", "other_threads"} and loop_cpu["loop_thread"] > 0
    assert report["cpu_us_per_record"]["worker"] == worker_cpu
    # No forward pass: the model thread still pads and hands over, at a fraction of the micro model's cost.
    no_model_cpu = lower_median["worker_no_model"]["cpu_us_per_record"]
    assert 0 < no_model_cpu["inference_thread"] < worker_cpu["inference_thread"]
    assert "CPU per record" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--messages", "0"], "--messages must be at least 1, not 0"),
        (["--naive-count", "0"], "--naive-count must be at least 1, not 0"),
        (["--rounds", "-1"], "--rounds must be at least 1, not -1"),
        (["--compare-rounds", "0"], "--compare-rounds must be at least 1"),
        (["--partitions", "0"], "--partitions must be at least 1"),
        (["--plumbing", "--plumbing-messages", "0"], "--plumbing-messages must be at least 1"),
        (["--compare-dtypes", "int8,fp8"], "--compare-dtypes: unknown precision 'fp8'"),
        (["--latency-seconds", "0"], "--latency-seconds must be above 0"),
        (["--rate", "-5"], "--rate must be above 0"),
        (["--duplicate-ratio", "1"], "--duplicate-ratio must be at least 0 and below 1"),
        (["--json", "/no/such/folder/bench.json"], "--json /no/such/folder/bench.json: the directory"),
        (["--backend", "tensorrt"], "FILTER_MODEL__BACKEND"),
    ],
)
def test_options_that_cannot_work_are_refused_before_any_phase(arguments, message):
    # A model that does not exist: had any phase started, loading it would be the error.
    result = cli("bench", "--model", "nobody/no-such-model", *arguments)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and result.stderr.count("\n") <= 2
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_latency_and_naive_phases_scale_down_with_the_messages():
    options = BenchOptions()
    assert (options.scaled_naive_count(1000), options.scaled_latency_seconds(1000)) == (100, 20.0)
    assert (options.scaled_naive_count(5000), options.scaled_latency_seconds(5000)) == (100, 20.0)
    assert (options.scaled_naive_count(300), options.scaled_latency_seconds(300)) == (30, 6.0)
    assert (options.scaled_naive_count(20), options.scaled_latency_seconds(20)) == (5, 2.0)
    given = BenchOptions(naive_count=7, latency_seconds=1.5)
    assert (given.scaled_naive_count(20), given.scaled_latency_seconds(20)) == (7, 1.5)


def test_where_the_time_goes_splits_a_known_gap_into_its_three_shares():
    # 100 records; sorted batches would take 1.0 s (ceiling 100 msg/s). The worker's batches take 1.25 s
    # alone, 1.5 s inside the worker, and the run 2.0 s to its last commit: 50 msg/s, half the ceiling.
    shares = where_the_time_goes(messages=100, seconds=2.0, ceiling=100.0, passes_inside_s=1.5, passes_alone_s=1.25)
    assert shares["batches"] == pytest.approx(0.8)
    assert shares["passes"] == pytest.approx(1.25 / 1.5)
    assert shares["model_busy"] == pytest.approx(0.75)
    assert shares["keep_up"] == pytest.approx(0.5)
    # Nothing lost anywhere: the worker's batches are the sorted ones, unslowed, and the model never waits.
    assert where_the_time_goes(100, 1.0, 100.0, 1.0, 1.0) == pytest.approx(
        {"batches": 1.0, "passes": 1.0, "model_busy": 1.0, "keep_up": 1.0}
    )


def test_end_to_end_target_is_not_judged_when_the_broker_sets_the_pace():
    assert judge_end_to_end(0.95, 0.9, 100.0, None) == {"goal": 0.9, "measured": 0.95, "met": True}
    assert judge_end_to_end(0.5, 0.9, 100.0, 5000.0)["met"] is False, "the broker could have kept up"
    assert judge_end_to_end(0.5, 0.9, 100.0, None)["met"] is False
    bound = judge_end_to_end(0.3, 0.9, 20_000.0, 7_000.0)
    assert bound["met"] is None and "not judged" in bound["reason"] and "7000 msg/s" in bound["reason"]
    assert judge_end_to_end(0.3, 0.9, 7_000.0, 6_400.0)["met"] is False, "6400 >= 0.9 x 7000: judged"


def test_variants_are_torch_and_the_configured_backend_at_every_precision_the_device_takes():
    torch_cpu = SimpleNamespace(backend="torch", dtype="float32", device="cpu")
    assert variant_list(torch_cpu, None) == [("torch", "bfloat16", None), ("torch", "int8", None)]  # type: ignore[arg-type]
    assert variant_list(torch_cpu, []) == []  # type: ignore[arg-type]
    onnx_cpu = SimpleNamespace(backend="onnx", dtype="int8", device="cpu")
    assert [v[:2] for v in variant_list(onnx_cpu, None)] == [  # type: ignore[arg-type]
        ("torch", "bfloat16"),
        ("torch", "int8"),
        ("onnx", "float32"),
        ("onnx", "int8"),
    ]
    asked = variant_list(onnx_cpu, ["bfloat16"])  # type: ignore[arg-type]
    expected = [("torch", "bfloat16"), ("onnx", "float32"), ("onnx", "bfloat16"), ("onnx", "int8")]
    assert [v[:2] for v in asked] == expected
    assert "the onnx backend runs float32 and int8 graphs" in (asked[2][2] or "")
    assert asked[3][2] is None, "the configured variant is always compared"
