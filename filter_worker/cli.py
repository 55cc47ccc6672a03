"""``filter-worker`` command line: run, classify, demo.

Exit codes tell an orchestrator what happened: 0 stopped cleanly, 1 stopped on a runtime failure
(offsets stay at the last acknowledged record, so a restart resumes safely), 2 bad configuration,
3 the model could not be loaded. Bad configuration and model errors are one sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from filter_worker import __version__
from filter_worker.config import ConfigError, Settings, load_settings
from filter_worker.model import ModelLoadError

EXIT_CONFIG = 2
EXIT_MODEL = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filter-worker", description="Streaming spam/abuse filter for Kafka.")
    parser.add_argument("--version", action="version", version=f"filter-worker {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (environment variables override it)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="consume, classify and route until SIGTERM/SIGINT")

    classify = commands.add_parser("classify", help="print one JSON decision per text, without Kafka")
    classify.add_argument("texts", nargs="*", help="texts to classify")
    classify.add_argument("--file", metavar="PATH", help="one text per line; '-' reads standard input")
    classify.add_argument("--model", help="hub id or local directory (overrides FILTER_MODEL__NAME)")

    demo = commands.add_parser("demo", help="embedded broker + sample traffic + worker, then a summary")
    demo.add_argument("--model", help="hub id or local directory (overrides FILTER_MODEL__NAME)")
    demo.add_argument("--messages", type=int, default=400, help="sample messages to produce (default 400)")

    produce = commands.add_parser("produce", help="load generator: sample messages to the input topic at a rate")
    produce.add_argument("--rate", type=float, default=50.0, help="messages per second (default 50)")
    produce.add_argument("--count", type=int, default=1000, help="messages to send; 0 sends until stopped")
    produce.add_argument("--topic", help="target topic (default: the first FILTER_TOPICS__INPUT)")

    bench = commands.add_parser(
        "bench", help="model-only ceiling vs the worker end to end vs a naive loop, on the same texts"
    )
    bench.add_argument("--model", help="hub id or local directory (overrides FILTER_MODEL__NAME)")
    bench.add_argument("--dtype", help="overrides FILTER_MODEL__DTYPE: auto, float32, bfloat16, float16, int8")
    bench.add_argument("--device", help="overrides FILTER_MODEL__DEVICE: auto, cpu, cuda, cuda:N")
    bench.add_argument("--batch-size", type=int, help="overrides FILTER_BATCH__MAX_SIZE")
    bench.add_argument("--messages", type=int, default=1000, help="size of the built-in message mix (default 1000)")
    bench.add_argument("--file", metavar="PATH", help="one message per line instead of the built-in mix")
    bench.add_argument("--seed", type=int, default=7, help="seed of the built-in mix (default 7)")
    bench.add_argument(
        "--duplicate-ratio", type=float, default=0.0, help="share of campaign repeats; adds a run with the cache"
    )
    bench.add_argument("--naive-count", type=int, default=100, help="records for the naive loop (default 100)")
    bench.add_argument("--arrival-count", type=int, default=256, help="texts for arrival-order batches (default 256)")
    bench.add_argument("--compare-count", type=int, default=300, help="texts for precision comparisons (default 300)")
    bench.add_argument(
        "--compare-dtypes", help="comma list of precisions to compare with float32 ('none' skips; default by device)"
    )
    bench.add_argument("--rate", type=float, help="offered msg/s for latency (default: half the measured throughput)")
    bench.add_argument("--latency-seconds", type=float, default=20.0, help="length of the latency run (default 20)")
    bench.add_argument("--partitions", type=int, default=3, help="input topic partitions (default 3)")
    bench.add_argument("--bootstrap-servers", help="use this Kafka cluster instead of the embedded broker")
    bench.add_argument("--json", default="bench-results.json", help="report file (default bench-results.json)")

    model = commands.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    synth = model.add_parser("synth", help="write an offline stand-in model (no hub access needed)")
    synth.add_argument("path", help="directory to write the model to")
    synth.add_argument(
        "--kind",
        choices=["keyword", "random-base"],
        default="keyword",
        help="keyword: labels decided by built-in keywords, to try the demo offline; random-base: random "
        "weights in the shape of distilbert-base-multilingual-cased, for benchmarks",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(load_settings(args.config))
        if args.command == "classify":
            return _classify(args)
        if args.command == "demo":
            from filter_worker.demo import run_demo

            return run_demo(_settings_with_model(args), args.messages)
        if args.command == "model":
            return _synth(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "produce":
            from filter_worker.loadgen import produce_samples

            settings = load_settings(args.config)
            return produce_samples(settings, args.topic or settings.topics.input[0], args.rate, args.count)
    except ConfigError as exc:
        print(f"filter-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as exc:
        print(f"filter-worker: {exc}", file=sys.stderr)
        return EXIT_MODEL
    raise AssertionError(f"unhandled command {args.command}")


def _settings_with_model(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if args.model:
        settings.model.name = args.model
    return settings


def _run(settings: Settings) -> int:
    from filter_worker.logs import configure
    from filter_worker.model import Classifier
    from filter_worker.worker import Worker

    configure(settings.log)
    classifier = Classifier.load(settings.model)
    worker = Worker(settings, classifier)

    def request_stop(signum: int, _frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return worker.run()


def _bench(args: argparse.Namespace) -> int:
    from filter_worker.bench import BenchOptions, run_bench
    from filter_worker.logs import configure

    # Options override their settings and are validated with them (merged over environment and file),
    # so a bad value is reported under the setting's name.
    model = {k: v for k, v in {"name": args.model, "dtype": args.dtype, "device": args.device}.items() if v}
    overrides: dict[str, Any] = {"model": model} if model else {}
    if args.batch_size is not None:
        overrides["batch"] = {"max_size": args.batch_size}
    settings = load_settings(args.config, **overrides)
    settings.log.level = "WARNING" if settings.log.level == "INFO" else settings.log.level
    configure(settings.log)
    compare = None
    if args.compare_dtypes is not None:
        compare = [] if args.compare_dtypes == "none" else [d.strip() for d in args.compare_dtypes.split(",") if d]
    options = BenchOptions(
        messages=args.messages,
        file=args.file,
        seed=args.seed,
        naive_count=args.naive_count,
        arrival_count=args.arrival_count,
        compare_count=args.compare_count,
        compare_dtypes=compare,
        rate=args.rate,
        latency_seconds=args.latency_seconds,
        duplicate_ratio=args.duplicate_ratio,
        partitions=args.partitions,
        bootstrap_servers=args.bootstrap_servers,
        json_path=args.json,
    )
    run_bench(settings, options)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from filter_worker.synthetic import DEMO_KEYWORDS, build_keyword_model, build_model

    if args.kind == "keyword":
        path = build_keyword_model(args.path, DEMO_KEYWORDS)
    else:
        path = build_model(args.path, size="base")
    print(f"wrote a {args.kind} model to {path}; use it with --model {path} or FILTER_MODEL__NAME={path}")
    return 0


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file == "-":
        texts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    elif args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ConfigError(f"--file {args.file}: no such file")
        texts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConfigError("classify needs texts as arguments or --file PATH ('-' for standard input)")
    return texts


def _classify(args: argparse.Namespace) -> int:
    from filter_worker.model import Classifier
    from filter_worker.routing import Router

    settings = _settings_with_model(args)
    texts = _read_texts(args)
    classifier = Classifier.load(settings.model)
    router = Router(settings.routing.rules, classifier.labels)
    probs, truncated = classifier.classify(texts, settings.batch.max_size, settings.batch.max_tokens)
    for text, row, cut in zip(texts, probs, truncated, strict=True):
        decision = router.decide(row)
        line = {
            "text": text,
            "action": decision.action,
            "rule": decision.rule,
            "label": decision.label,
            "score": round(decision.score, 6),
            "scores": {k: round(v, 6) for k, v in decision.scores.items()},
            "truncated": cut,
            "model": classifier.identity,
        }
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
