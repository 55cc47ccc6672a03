"""``bench`` without ``--plumbing``: every phase in order, one report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from filter_worker.config import Settings
from filter_worker.model import precision
from filter_worker.model.onnx_export import ensure_graph
from filter_worker.pipeline.routing import Router
from filter_worker.tools.bench.harness import broker_for, environment
from filter_worker.tools.bench.naive import naive
from filter_worker.tools.bench.options import BenchOptions, load_texts
from filter_worker.tools.bench.plumbing import plumbing_capacity, run_plumbing
from filter_worker.tools.bench.report import GOAL_CPU, GOAL_GPU, format_table, targets
from filter_worker.tools.bench.throughput import end_to_end, latency, model_only, where_the_time_goes
from filter_worker.tools.bench.variants import REFERENCE, Models, precision_report, variants

# Cache size for the "with cache" run of --duplicate-ratio when FILTER_CACHE__SIZE is 0.
BENCH_CACHE_SIZE = 10_000


def run_bench(settings: Settings, options: BenchOptions) -> dict[str, Any]:
    """Run every phase (or only the plumbing measurement), print a table, write the JSON report."""
    options.validate()
    if options.plumbing:
        return run_plumbing(settings, options)
    began = time.monotonic()

    def say(line: str) -> None:
        options.progress(f"[{time.monotonic() - began:6.1f}s] {line}" if line.endswith("...") else line)

    texts = load_texts(options)
    model = settings.model
    batch = settings.batch
    say(f"loading {model.name} ({model.backend}, {model.dtype} on {model.device}) ...")
    ensure_graph(model)
    loaded = precision.load(model, settings.routing, batch.max_size)
    classifier = loaded.classifier
    models = Models(settings, classifier)
    router = Router(settings.routing, classifier.head)
    float32 = models.get(*REFERENCE)
    is_float32 = float32 is classifier
    ids = [t.ids for t in classifier.tokenize(texts)]
    lengths = [len(row) for row in ids]
    report: dict[str, Any] = {
        "environment": environment(classifier),
        "workload": {
            "messages": len(texts),
            "source": options.file or f"built-in mix, seed {options.seed}",
            "distinct_texts": len(set(texts)),
            "duplicate_ratio": options.duplicate_ratio,
            "tokens_p50": float(np.percentile(lengths, 50)),
            "tokens_p95": float(np.percentile(lengths, 95)),
            "tokens_max": max(lengths),
            "batch_max_size": batch.max_size,
            "batch_max_wait_ms": batch.max_wait_ms,
            "batch_max_tokens": batch.max_tokens,
        },
    }

    say(f"model only: {len(texts)} texts sorted by length, batches of {batch.max_size} ...")
    classifier.predict(ids[: batch.max_size])  # warm-up
    by_length = sorted(range(len(ids)), key=lambda i: lengths[i])
    ceilings = [model_only(classifier, ids, by_length, batch.max_size)]
    float32_ceilings = [ceilings[0]]
    if not is_float32:
        say("model only, torch float32 (the reference the chosen precision is judged against) ...")
        float32.predict(ids[: batch.max_size])  # warm-up
        float32_ceilings = [model_only(float32, ids, by_length, batch.max_size)]
    subset = list(range(min(options.arrival_count, len(ids))))
    say(f"model only: {len(subset)} texts in arrival order ...")
    arrival = model_only(classifier, ids, subset, batch.max_size)
    report["model_only"] = ceilings[0]
    report["model_only_arrival_order"] = arrival

    with broker_for(options, settings) as broker:
        cache_size = 0 if options.duplicate_ratio > 0 else settings.cache.size
        rounds = []
        for n in range(1, options.rounds + 1):
            say(f"end to end, round {n} of {options.rounds}: {len(texts)} records (cache size {cache_size}) ...")
            run = end_to_end(settings, classifier, texts, broker, options.partitions, cache_size, replay=True)
            say("model only again (brackets the round against machine drift) ...")
            ceilings.append(model_only(classifier, ids, by_length, batch.max_size))
            run["ceiling_messages_per_s"] = [c["messages_per_s"] for c in ceilings[-2:]]
            run["vs_model_only"] = run["messages_per_s"] / np.mean(run["ceiling_messages_per_s"])
            run["where_the_time_goes"] = where_the_time_goes(
                run["messages"],
                run["seconds"],
                float(np.mean(run["ceiling_messages_per_s"])),
                run["passes_inside_s"],
                run["passes_alone_s"],
            )
            rounds.append(run)
        # The median round (the lower one of an even count): one drift burst does not decide the ratio.
        report["end_to_end"] = last = sorted(rounds, key=lambda r: r["vs_model_only"])[(len(rounds) - 1) // 2]
        report["end_to_end_rounds"] = rounds
        report["model_only_after"] = ceilings[-1]
        if not is_float32:
            say("model only, torch float32 again ...")
            float32_ceilings.append(model_only(float32, ids, by_length, batch.max_size))
        goal = GOAL_GPU if classifier.device.startswith("cuda") else GOAL_CPU
        if last["vs_model_only"] < goal:
            say(f"end to end below {goal} of the ceiling: can this broker move records faster than the model? ...")
            report["plumbing_capacity"] = plumbing_capacity(settings, broker, texts, options)
        if options.duplicate_ratio > 0:
            cached = settings.cache.size or BENCH_CACHE_SIZE
            say(f"end to end with the decision cache: {len(texts)} records (cache size {cached}) ...")
            report["end_to_end_cached"] = last = end_to_end(
                settings, classifier, texts, broker, options.partitions, cached
            )
            report["cache_gain"] = last["messages_per_s"] / report["end_to_end"]["messages_per_s"]

        rate = options.rate or last["messages_per_s"] / 2
        seconds = options.scaled_latency_seconds(len(texts))
        say(f"latency: a steady {rate:.1f} msg/s for {seconds:.0f}s ...")
        # The rate comes from the last run, so the latency run uses that run's cache size.
        report["latency"] = latency(
            settings, classifier, texts, broker, options.partitions, rate, seconds, ceilings[0], last["cache_size"]
        )

        naive_texts = texts[: options.scaled_naive_count(len(texts))]
        say(f"naive loop: {len(naive_texts)} records, one at a time (torch float32) ...")
        report["naive"] = naive(models.get(*REFERENCE), naive_texts, broker, router)

    compare = texts[: options.compare_count]
    report["variants"] = variants(settings, models, classifier, router, compare, options, say)
    report["precision"] = precision_report(loaded, float32, router, compare, batch.max_size)
    report["model_only_float32"] = float32_ceilings
    e2e = report["end_to_end"]["messages_per_s"]
    float32_ceiling = float(np.mean([c["messages_per_s"] for c in float32_ceilings]))
    report["ratios"] = {
        # The bar of issue 27: the worker at the chosen precision against float32's own ceiling.
        "end_to_end_vs_float32_model_only": e2e / float32_ceiling,
        "model_only_vs_float32_model_only": float(np.mean([c["messages_per_s"] for c in ceilings])) / float32_ceiling,
        # The median round, against the mean of the ceilings measured just before and after it.
        "end_to_end_vs_model_only": report["end_to_end"]["vs_model_only"],
        "model_only_after_vs_before": ceilings[-1]["messages_per_s"] / ceilings[0]["messages_per_s"],
        "end_to_end_vs_naive": e2e / report["naive"]["messages_per_s"],
        "end_to_end_vs_naive_model_calls": e2e / report["naive"]["model_messages_per_s"],
        "arrival_order_vs_model_only": arrival["messages_per_s"] / ceilings[0]["messages_per_s"],
    }
    report["targets"] = targets(report, classifier)
    Path(options.json_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    say(format_table(report))
    say(f"wrote {options.json_path}")
    return report
