"""``filter-worker model``: pull, lock, verify, export, synthesize and train model directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import ConfigError
from filter_worker.exit_codes import ExitCode
from filter_worker.tools.synthetic import FAMILIES


def add_parser(commands: Any) -> None:
    parent = subcommand(commands, "model", "model utilities")
    parent.set_defaults(handler=run)
    model = parent.add_subparsers(dest="model_command", required=True)
    pull = model.add_parser("pull", help="download a model (safetensors only) into DIR and write its lock file")
    pull.add_argument("name", help="hub model id, e.g. tabularisai/multilingual-sentiment-analysis")
    pull.add_argument("--revision", help="branch, tag or commit (default main); the lock records the commit")
    pull.add_argument("--to", required=True, metavar="DIR", help="new or empty directory to write the model to")
    lock = model.add_parser(
        "lock",
        help="write a lock file for a model directory you trust (your own model, one copied in by other means)",
    )
    lock.add_argument("path", metavar="DIR", help="the model directory")
    lock.add_argument("--name", help="model id to record (default: the directory's name)")
    lock.add_argument("--revision", default="local", help="revision to record, e.g. a commit (default local)")
    lock.add_argument("--force", action="store_true", help="replace an existing lock file")
    verify = model.add_parser("verify", help="check a model directory against its lock file")
    verify.add_argument("path", metavar="DIR", help="directory written by model pull or locked by model lock")
    export = model.add_parser(
        "export",
        help="write the ONNX graphs that FILTER_MODEL__BACKEND=onnx runs, checked against PyTorch (and locked)",
    )
    export.add_argument("path", metavar="DIR", help="local model directory (safetensors weights)")
    export.add_argument(
        "--dtype",
        choices=["float32", "int8", "all"],
        default="all",
        help="which graphs (default all; int8 is quantized from the checked float32 graph, which is written too)",
    )
    synth = model.add_parser("synth", help="write an offline stand-in model (no hub access needed)")
    synth.add_argument("path", help="directory to write the model to")
    synth.add_argument(
        "--kind",
        choices=["keyword", "random-base", *FAMILIES],
        default="keyword",
        help="keyword: labels decided by built-in keywords, to try the demo offline; random-base: random "
        "weights in the shape of distilbert-base-multilingual-cased, for benchmarks; a family name: a tiny "
        "random-weight stand-in with a public model's labels and head (docs/choosing-a-model.md)",
    )

    _train_parser(model)


def _train_parser(model: Any) -> None:
    train = model.add_parser(
        "train",
        help="train a classification head for your labels (labeled data or reviewers' verdicts) into a new, locked "
        "model directory",
    )
    train.add_argument(
        "data", nargs="?", help="labeled examples, as eval reads them: .csv with a header line, or .jsonl"
    )
    train.add_argument("--to", required=True, metavar="DIR", help="new or empty directory to write the model to")
    train.add_argument(
        "--labels",
        help="the labels, comma-separated, in output order: 'ham,spam' (required with DATA; with --from-feedback "
        "the default is OK_LABEL,ABUSE_LABEL)",
    )
    train.add_argument(
        "--base", metavar="DIR", help="encoder (or model) directory to train on (default FILTER_MODEL__NAME)"
    )
    train.add_argument("--text-field", default="text", help="field holding the text (default text)")
    train.add_argument("--label-field", default="label", help="field holding the label (default label)")
    train.add_argument("--label-map", help='JSON object mapping data labels to --labels: \'{"1": "spam"}\'')
    train.add_argument(
        "--from-feedback",
        metavar="TOPIC|FILE",
        help="train on reviewers' verdicts (a verdict topic from its beginning, or a JSON-lines export of one) "
        "instead of DATA",
    )
    train.add_argument(
        "--texts",
        metavar="TOPIC|FILE",
        action="append",
        default=[],
        help="with --from-feedback: output or review topics (or their JSON-lines exports) holding the judged "
        "records, joined on filter.source; repeat for several",
    )
    train.add_argument("--abuse-label", default="abuse", help="label of an 'abuse' verdict (default abuse)")
    train.add_argument("--ok-label", default="ok", help="label of an 'ok' verdict (default ok)")
    train.add_argument("--feedback-model", metavar="ID", help="with --from-feedback: only verdicts on this model")
    train.add_argument(
        "--held-out", type=float, default=0.2, help="share of each label held out for evaluation (default 0.2)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    train.add_argument("--min-examples", type=int, default=10, help="fewest training examples per label (default 10)")
    train.add_argument(
        "--full",
        action="store_true",
        help="fine-tune every weight, not only the head (for a GPU; the time estimate is shown first)",
    )
    train.add_argument("--epochs", type=int, default=2, help="with --full: passes over the data (default 2)")
    train.add_argument("--learning-rate", type=float, default=3e-5, help="with --full (default 3e-5)")
    train.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    train.add_argument("--name", help="model id the lock file records (default: the directory's name)")
    train.add_argument("--report", action="store_true", help="also write the held-out HTML report (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    handlers = {
        "pull": _pull,
        "lock": _lock,
        "verify": _verify,
        "export": _export,
        "synth": _synth,
        "train": _train,
    }
    return handlers[args.model_command](args)


def _synth(args: argparse.Namespace) -> int:
    from filter_worker.tools.synthetic import DEMO_KEYWORDS, build_family, build_keyword_model, build_model

    if args.kind == "keyword":
        path = build_keyword_model(args.path, DEMO_KEYWORDS)
    elif args.kind == "random-base":
        path = build_model(args.path, size="base")
    else:
        path = build_family(args.path, args.kind)
    print(f"wrote a {args.kind} model to {path}; use it with --model {path} or FILTER_MODEL__NAME={path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from filter_worker.config import ConfigError, LogSettings
    from filter_worker.logs import configure
    from filter_worker.model.onnx_export import DTYPES, TOLERANCE, export

    if not Path(args.path).is_dir():
        raise ConfigError(f"model export {args.path}: not a directory; export a local model directory")
    configure(LogSettings(level="WARNING"))  # this command prints what it wrote itself
    graphs = export(args.path, DTYPES if args.dtype == "all" else [args.dtype])
    for graph in graphs:
        print(
            f"wrote {graph.path} ({graph.bytes / 1e6:.1f} MB): {graph.dtype}, probabilities within "
            f"{graph.max_abs_difference:.1e} of PyTorch float32 on the check texts"
            + (f" (tolerance {TOLERANCE:.0e})" if graph.dtype == "float32" else "")
            + f", same top label on {graph.top_label_agreement:.0%}"
        )
    print(f"use them with FILTER_MODEL__BACKEND=onnx FILTER_MODEL__NAME={args.path}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from filter_worker.model.classifier import hub_reachable
    from filter_worker.model.lockfile import LOCK_NAME, pull

    lock = pull(args.name, args.revision, args.to, local_files_only=not hub_reachable())
    print(
        f"pulled {lock.model_id} at commit {lock.revision} into {args.to}: {len(lock.files)} files, weights sha256 "
        f"{lock.weights_sha256}; lock file {Path(args.to) / LOCK_NAME}. Use it with FILTER_MODEL__NAME={args.to}"
    )
    return 0


def _existing_directory(path: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"model directory {path} {'is a file' if directory.exists() else 'does not exist'}")
    return directory


def _lock(args: argparse.Namespace) -> int:
    from filter_worker.model.lockfile import LOCK_NAME, LockError, lock_directory, missing_model_files

    directory = _existing_directory(args.path)
    missing = missing_model_files(directory)
    if missing:
        raise LockError(f"{args.path} is not a complete model directory: it has no {', no '.join(missing)}")
    if (directory / LOCK_NAME).exists() and not args.force:
        raise LockError(
            f"{args.path} already has a {LOCK_NAME}; check it with model verify, or pass --force to replace it"
        )
    lock = lock_directory(directory, args.name or directory.resolve().name, args.revision)
    print(
        f"locked {len(lock.files)} files of {args.path} as {lock.model_id}@{lock.revision}, weights sha256 "
        f"{lock.weights_sha256}; lock file {directory / LOCK_NAME}. Every load now verifies them"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from filter_worker.model.lockfile import LOCK_NAME, read_lock, verify_directory

    _existing_directory(args.path)
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


def _train(args: argparse.Namespace) -> int:
    from filter_worker.cli.train import train

    return train(args)
