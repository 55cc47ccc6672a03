"""``filter-worker bench`` runs every phase on a tiny model and writes a complete JSON report (no timings asserted)."""

from __future__ import annotations

import orjson
import pytest

from tests.test_cli import cli


@pytest.mark.integration
def test_bench_runs_every_phase_and_writes_the_report(tiny_model, bootstrap_servers, tmp_path):
    report_path = tmp_path / "bench.json"
    result = cli(
        "bench",
        "--model", str(tiny_model),
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

    latency = report["latency"]
    assert latency["messages"] == 20 and latency["offered_rate"] == 20
    assert 0 <= latency["p50_s"] <= latency["p95_s"] <= latency["p99_s"] <= latency["max_s"]

    int8 = report["precision"]["int8"]
    assert int8["messages"] == 10 and 0 <= int8["action_changed_share"] <= 1
    assert set(report["ratios"]) >= {"end_to_end_vs_model_only", "end_to_end_vs_naive"}
    assert report["targets"]["end_to_end_vs_model_only"]["goal"] == 0.9
