"""``filter-worker bench``: model-only ceiling vs the worker end to end vs a naive loop, on the same texts."""

from __future__ import annotations

import argparse
from typing import Any

from filter_worker.cli.common import model_argument, subcommand
from filter_worker.config import load_settings


def add_parser(commands: Any) -> None:
    parser = subcommand(
        commands, "bench", "model-only ceiling vs the worker end to end vs a naive loop, on the same texts"
    )
    model_argument(parser)
    parser.add_argument("--dtype", help="overrides FILTER_MODEL__DTYPE: auto, float32, bfloat16, float16, int8")
    parser.add_argument("--backend", help="overrides FILTER_MODEL__BACKEND: torch, onnx or openvino")
    parser.add_argument("--device", help="overrides FILTER_MODEL__DEVICE: auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, help="overrides FILTER_BATCH__MAX_SIZE")
    parser.add_argument("--messages", type=int, default=1000, help="size of the built-in message mix (default 1000)")
    parser.add_argument("--file", metavar="PATH", help="one message per line instead of the built-in mix")
    parser.add_argument("--seed", type=int, default=7, help="seed of the built-in mix (default 7)")
    parser.add_argument(
        "--duplicate-ratio", type=float, default=0.0, help="share of campaign repeats; adds a run with the cache"
    )
    parser.add_argument(
        "--naive-count", type=int, help="records for the naive loop (default 100 at 1000 messages, scaled down below)"
    )
    parser.add_argument("--arrival-count", type=int, default=256, help="texts for arrival-order batches (default 256)")
    parser.add_argument("--compare-count", type=int, default=300, help="texts for precision comparisons (default 300)")
    parser.add_argument(
        "--compare-dtypes",
        help="comma list of precisions to compare, on torch and the configured backend, with torch float32 "
        "('none' skips; default by device)",
    )
    parser.add_argument(
        "--compare-rounds", type=int, default=3, help="interleaved speed rounds of the comparison (default 3)"
    )
    parser.add_argument("--rate", type=float, help="offered msg/s for latency (default: half the measured throughput)")
    parser.add_argument(
        "--latency-seconds", type=float, help="seconds of the latency run (default 20 at 1000 messages, fewer below)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="end-to-end rounds, each between two ceiling runs (default 3)"
    )
    parser.add_argument("--partitions", type=int, default=3, help="input topic partitions (default 3)")
    parser.add_argument(
        "--plumbing",
        action="store_true",
        help="only the plumbing measurement: the worker with a near-free model against a minimal loop",
    )
    parser.add_argument(
        "--plumbing-messages",
        type=int,
        default=50_000,
        help="records for the plumbing measurement and the near-free-model check (default 50000)",
    )
    parser.add_argument("--bootstrap-servers", help="use this Kafka cluster instead of the embedded broker")
    parser.add_argument("--json", default="bench-results.json", help="report file (default bench-results.json)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from filter_worker.kafka.client_check import check_clients
    from filter_worker.logs import configure
    from filter_worker.tools.bench import BenchOptions, run_bench

    # Options override their settings and are validated with them (merged over environment and file),
    # so a bad value is reported under the setting's name.
    options = {"name": args.model, "dtype": args.dtype, "device": args.device, "backend": args.backend}
    model = {k: v for k, v in options.items() if v is not None}
    overrides: dict[str, Any] = {"model": model} if model else {}
    if args.batch_size is not None:
        overrides["batch"] = {"max_size": args.batch_size}
    settings = load_settings(args.config, **overrides)
    check_clients(settings.kafka)
    settings.log.level = "WARNING" if settings.log.level == "INFO" else settings.log.level
    configure(settings.log)
    compare = None
    if args.compare_dtypes is not None:
        compare = [] if args.compare_dtypes == "none" else [d.strip() for d in args.compare_dtypes.split(",") if d]
    bench = BenchOptions(
        messages=args.messages,
        file=args.file,
        seed=args.seed,
        naive_count=args.naive_count,
        arrival_count=args.arrival_count,
        compare_count=args.compare_count,
        compare_dtypes=compare,
        compare_rounds=args.compare_rounds,
        rate=args.rate,
        latency_seconds=args.latency_seconds,
        duplicate_ratio=args.duplicate_ratio,
        rounds=args.rounds,
        partitions=args.partitions,
        plumbing=args.plumbing,
        plumbing_messages=args.plumbing_messages,
        bootstrap_servers=args.bootstrap_servers,
        json_path=args.json,
    )
    run_bench(settings, bench)
    return 0
