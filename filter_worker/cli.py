"""``filter-worker`` command line: run, classify, demo, eval, calibrate, model pull/verify/synth.

Exit codes (``exit_codes.ExitCode``) tell an orchestrator what happened; ``calibrate`` exits 1 when no
threshold reaches the target. Bad configuration, bad input data and model errors are one sentence,
not a traceback.
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
from filter_worker.config import ConfigError, Rule, Settings, load_settings
from filter_worker.exit_codes import ExitCode
from filter_worker.lockfile import LockError
from filter_worker.model import ModelLoadError


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

    evaluate = commands.add_parser("eval", help="accuracy, macro-F1, precision/recall and action rates on labeled data")
    _data_arguments(evaluate)

    calibrate = commands.add_parser("calibrate", help="the lowest min_score of a rule that reaches a target precision")
    _data_arguments(calibrate)
    calibrate.add_argument("--action", choices=["drop", "quarantine", "allow"], required=True, help="the rule's action")
    calibrate.add_argument(
        "--labels", required=True, help="the rule's labels, comma-separated: 'Very Negative,Negative'"
    )
    calibrate.add_argument("--target-precision", type=float, required=True, help="e.g. 0.95")
    calibrate.add_argument("--name", help="rule name (default ACTION-pNN from the target)")
    calibrate.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    calibrate.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
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
    bench.add_argument(
        "--rounds", type=int, default=3, help="end-to-end rounds, each between two ceiling runs (default 3)"
    )
    bench.add_argument("--partitions", type=int, default=3, help="input topic partitions (default 3)")
    bench.add_argument("--bootstrap-servers", help="use this Kafka cluster instead of the embedded broker")
    bench.add_argument("--json", default="bench-results.json", help="report file (default bench-results.json)")

    model = commands.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    pull = model.add_parser("pull", help="download a model (safetensors only) into DIR and write its lock file")
    pull.add_argument("name", help="hub model id, e.g. tabularisai/multilingual-sentiment-analysis")
    pull.add_argument("--revision", help="branch, tag or commit (default main); the lock records the commit")
    pull.add_argument("--to", required=True, metavar="DIR", help="new or empty directory to write the model to")
    verify = model.add_parser("verify", help="check a model directory against its lock file")
    verify.add_argument("path", metavar="DIR", help="directory written by model pull")
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


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="labeled examples: .csv with a header line, or .jsonl")
    parser.add_argument("--text-field", default="text", help="field holding the text (default text)")
    parser.add_argument("--label-field", default="label", help="field holding the gold label (default label)")
    parser.add_argument("--lang-field", help="field holding the language: adds metrics per language")
    parser.add_argument("--label-map", help='JSON object mapping data labels to model labels: \'{"spam": "toxic"}\'')
    parser.add_argument("--model", help="hub id or local directory (overrides FILTER_MODEL__NAME)")
    parser.add_argument("--out-json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--report", metavar="PATH", help="also write a self-contained HTML report (needs matplotlib)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(load_settings(args.config), args.config)
        if args.command == "classify":
            return _classify(args)
        if args.command == "demo":
            from filter_worker.demo import run_demo

            return run_demo(_settings_with_model(args), args.messages)
        if args.command == "eval":
            return _eval(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "model":
            if args.model_command == "synth":
                return _synth(args)
            return {"pull": _pull, "verify": _verify}[args.model_command](args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "produce":
            from filter_worker.loadgen import produce_samples

            settings = load_settings(args.config)
            return produce_samples(settings, args.topic or settings.topics.input[0], args.rate, args.count)
    except ConfigError as exc:
        print(f"filter-worker: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except (ModelLoadError, LockError) as exc:
        print(f"filter-worker: {exc}", file=sys.stderr)
        return ExitCode.MODEL
    raise AssertionError(f"unhandled command {args.command}")


def _settings_with_model(args: argparse.Namespace) -> Settings:
    from filter_worker.logs import configure

    settings = load_settings(args.config)
    if args.model:
        settings.model.name = args.model
    configure(settings.log)  # log lines (an unpinned model, say) go to stderr, never into the output
    return settings


def _run(settings: Settings, config_file: str | None) -> int:
    from filter_worker.logs import configure
    from filter_worker.model import Classifier
    from filter_worker.worker import Worker

    configure(settings.log)
    classifier = Classifier.load(settings.model)
    worker = Worker(settings, classifier, reload_routing=lambda: load_settings(config_file).routing)

    def request_stop(signum: int, _frame: Any) -> None:
        worker.stop()

    def request_reload(signum: int, _frame: Any) -> None:
        worker.request_reload()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
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
        rounds=args.rounds,
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


def _pull(args: argparse.Namespace) -> int:
    from filter_worker.lockfile import LOCK_NAME, pull
    from filter_worker.model import hub_reachable

    lock = pull(args.name, args.revision, args.to, local_files_only=not hub_reachable())
    print(
        f"pulled {lock.model_id} at commit {lock.revision} into {args.to}: {len(lock.files)} files, weights sha256 "
        f"{lock.weights_sha256}; lock file {Path(args.to) / LOCK_NAME}. Use it with FILTER_MODEL__NAME={args.to}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from filter_worker.lockfile import LOCK_NAME, read_lock, verify_directory

    lock = read_lock(args.path)
    problems = verify_directory(args.path, lock)
    if problems:
        lines = "".join(f"\n  {p}" for p in problems)
        print(f"filter-worker: {args.path} does not match its {LOCK_NAME}:{lines}", file=sys.stderr)
        return ExitCode.MODEL
    print(
        f"{args.path} matches its {LOCK_NAME}: {lock.model_id}@{lock.revision}, {len(lock.files)} files, "
        f"weights sha256 {lock.weights_sha256}"
    )
    return 0


def _write(option: str, path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror}") from None


def _labeled_data(args: argparse.Namespace) -> tuple[Settings, list[Any]]:
    """Settings and examples, validated before the (slow) model load."""
    from filter_worker.evaluation import load_examples, parse_label_map
    from filter_worker.report import require_matplotlib

    settings = _settings_with_model(args)
    if args.report:
        require_matplotlib()
    label_map = parse_label_map(args.label_map)
    examples = load_examples(args.data, args.text_field, args.label_field, args.lang_field, label_map)
    return settings, examples


def _eval(args: argparse.Namespace) -> int:
    from filter_worker.evaluation import check_labels, evaluate, evaluation_json
    from filter_worker.model import Classifier
    from filter_worker.report import evaluation_text, write_evaluation_html
    from filter_worker.routing import Router

    settings, examples = _labeled_data(args)
    classifier = Classifier.load(settings.model)
    check_labels(examples, classifier.labels, args.data)
    router = Router(settings.routing.rules, classifier.labels)
    probs, _ = classifier.classify([e.text for e in examples], settings.batch.max_size, settings.batch.max_tokens)
    result = evaluate(examples, probs, classifier.labels, router)
    sys.stdout.write(evaluation_text(result, classifier.identity, args.data))
    if args.out_json:
        document = evaluation_json(result, classifier.identity, args.data, settings.routing.rules)
        _write("--out-json", args.out_json, orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    if args.report:
        write_evaluation_html(args.report, result, classifier.identity, args.data)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from filter_worker.calibration import calibrate, calibration_json, rule_scores
    from filter_worker.model import Classifier
    from filter_worker.report import calibration_text, write_calibration_html

    if not 0.0 < args.target_precision <= 1.0:
        raise ConfigError("--target-precision must be above 0 and at most 1")
    if args.resamples < 0:
        raise ConfigError("--resamples must be 0 or more")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    settings, examples = _labeled_data(args)
    classifier = Classifier.load(settings.model)
    unknown = [label for label in labels if label not in classifier.labels]
    if unknown or not labels:
        raise ConfigError(f"--labels: unknown label(s) {unknown}; the model's labels are {classifier.labels}")
    positive = np.array([e.label in labels for e in examples])
    if not positive.any():
        raise ConfigError(f"{args.data}: no example's label is one of {labels}; map data labels with --label-map")
    probs, _ = classifier.classify([e.text for e in examples], settings.batch.max_size, settings.batch.max_tokens)
    result = calibrate(
        rule_scores(probs, classifier.labels, labels), positive, args.target_precision, args.resamples, seed=args.seed
    )
    rule = None
    if result.meets_target:
        name = args.name or f"{args.action}-p{round(100 * args.target_precision)}"
        rule = Rule(action=args.action, labels=labels, min_score=result.threshold, name=name).model_dump()
    text = calibration_text(result, args.action, labels)
    sys.stdout.write(text)
    if args.out_json:
        document = calibration_json(result, rule)
        _write("--out-json", args.out_json, orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    if args.report:
        write_calibration_html(args.report, result, rule, classifier.identity, args.data, text)
    if rule is None:
        return ExitCode.FAILED
    sys.stdout.write(orjson.dumps(rule).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
