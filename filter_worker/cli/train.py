"""``filter-worker model train``: labeled data or verdicts in, a verified model directory out.

The steps, in the order an operator reads them on stderr: the data checked (one sentence and exit 2
for data that cannot train a classifier, before the slow model load), the base encoder loaded, its
features computed once with a progress line and a time estimate (or, with ``--full``, the estimate
of the whole fine-tuning first), the head fitted, the directory written and locked, loaded back the
way ``run`` loads a model (lock verified), and the held-out part evaluated with ``eval``'s report.
The card and the report are locked along with the weights.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

import numpy as np
import orjson

from filter_worker.cli.common import settings_with_model, with_model_name
from filter_worker.config import ConfigError, RoutingSettings, Settings
from filter_worker.exit_codes import ModelLoadError

# Progress lines on a non-terminal (a CI log) at most this often.
_LOG_EVERY_S = 10.0


class ProgressLine:
    """A progress bar on stderr: rewritten in place on a terminal, a line every few seconds elsewhere."""

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self._what = what
        self._stream = stream or sys.stderr  # looked up now: a test's captured stream is swapped per test
        self._tty = self._stream.isatty()
        self._last = -math.inf

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        from filter_worker.model.training import eta

        if not self._tty and done < total and elapsed - self._last < _LOG_EVERY_S and done > 1:
            return
        self._last = elapsed
        width = 30
        filled = round(width * done / total) if total else width
        line = f"{self._what} [{'#' * filled}{'.' * (width - filled)}] {eta(done, total, elapsed)}"
        self._stream.write(("\r" + line + ("\n" if done >= total else "")) if self._tty else line + "\n")
        self._stream.flush()


def _checked(args: argparse.Namespace) -> list[str]:
    """The labels, after every option is checked (nothing slow has started yet)."""
    if (args.data is None) == (args.from_feedback is None):
        raise ConfigError("model train needs either DATA (labeled examples) or --from-feedback TOPIC|FILE")
    if args.from_feedback is not None and not args.texts:
        raise ConfigError("--from-feedback needs --texts TOPIC|FILE: the output or review records the verdicts judged")
    if args.data is not None and (args.texts or args.feedback_model):
        raise ConfigError("--texts and --feedback-model go with --from-feedback, not with DATA")
    if not 0.0 < args.held_out < 1.0:
        raise ConfigError("--held-out must be above 0 and below 1, e.g. 0.2")
    for option, value in (("--min-examples", args.min_examples), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(f"{option} must be 1 or more")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be 1 or more")
    if not args.learning_rate > 0.0:
        raise ConfigError("--learning-rate must be above 0")
    if args.labels is None:
        if args.data is not None:
            raise ConfigError("model train DATA needs --labels, the labels in output order: e.g. --labels ham,spam")
        return [args.ok_label, args.abuse_label]
    return [label.strip() for label in args.labels.split(",") if label.strip()]


def _target(path: str) -> Path:
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--to {path}: not an empty directory; train into a new one")
    return target


def _base(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """The base directory and its identity (``name@revision#sha256:...``), its lock verified if it has one."""
    from filter_worker.model import lockfile

    base = args.base or settings.model.name
    option = "--base" if args.base else "FILTER_MODEL__NAME"
    if not Path(base).is_dir():
        raise ConfigError(
            f"{option} {base}: not a local directory; train on a local encoder or model directory (pull one "
            "first: filter-worker model pull NAME --to DIR)"
        )
    if not (Path(base) / lockfile.LOCK_NAME).is_file():
        return base, f"{Path(base).resolve().name}@local#sha256:{lockfile.directory_weights_sha256(base)[:16]}"
    lock = lockfile.read_lock(base)
    problems = lockfile.verify_directory(base, lock)
    if problems:
        raise ModelLoadError(f"{option} {base} does not match its {lockfile.LOCK_NAME}: {problems[0]}")
    return base, f"{lock.model_id}@{lock.revision}#sha256:{lock.weights_sha256[:16]}"


def train(args: argparse.Namespace) -> int:
    from filter_worker.model.classifier import resolve_device
    from filter_worker.model.training import Base, fit_head
    from filter_worker.tools import learning
    from filter_worker.tools.evaluation import parse_label_map

    labels = _checked(args)
    settings = settings_with_model(args)
    target = _target(args.to)
    base, base_identity = _base(args, settings)
    if args.data is not None:
        data = learning.from_labeled(
            args.data, args.text_field, args.label_field, parse_label_map(args.label_map), args.held_out, args.seed
        )
    else:
        data = learning.from_verdicts(
            args.from_feedback,
            args.texts,
            settings.kafka,
            settings.message,
            args.abuse_label,
            args.ok_label,
            args.feedback_model,
            args.held_out,
            args.seed,
        )
    learning.check(data, labels, args.min_examples)
    if args.report:
        from filter_worker.tools.report import require_matplotlib

        require_matplotlib()
    for reason, count in data.skipped.items():
        print(f"skipped {count} record(s): {reason.replace('_', ' ')}", file=sys.stderr)
    index = {label: i for i, label in enumerate(labels)}
    train_rows = [e for e, held in zip(data.examples, data.held_out, strict=True) if not held]
    texts = [e.text for e in train_rows]
    targets = np.array([index[e.label] for e in train_rows], dtype=np.int64)
    device = resolve_device(settings.model.device)
    started = time.monotonic()
    model = Base.load(base, labels, device, settings.model.max_length)
    seconds = {"load": time.monotonic() - started}
    if args.full:
        steps = args.epochs * math.ceil(len(texts) / args.batch_size)
        step_s = model.seconds_per_step(texts, args.batch_size)
        print(
            f"full fine-tuning of every weight on {device}: {steps} steps of {args.batch_size} texts, about "
            f"{steps * step_s / 60:.1f} min (one step measured at {step_s:.2f} s on the longest texts)",
            file=sys.stderr,
        )
        started = time.monotonic()
        model.fine_tune(
            texts, targets, args.epochs, args.learning_rate, args.batch_size, args.seed, ProgressLine("fine-tuning")
        )
        seconds["fine_tune"] = time.monotonic() - started
        mode = f"full fine-tuning, {args.epochs} epochs, learning rate {args.learning_rate:g}"
    else:
        print(
            f"computing the encoder's features for {len(texts)} texts once, on {device}; then fitting the head",
            file=sys.stderr,
        )
        started = time.monotonic()
        features = model.features(texts, args.batch_size, ProgressLine("features"))
        seconds["features"] = time.monotonic() - started
        started = time.monotonic()
        model.set_head(fit_head(features, targets, len(labels)))
        seconds["head"] = time.monotonic() - started
        mode = "head only: class-weighted logistic regression on the encoder's features"
    name = args.name or target.resolve().name
    _write(model, target, name, data.digest)
    evaluation = _evaluate(settings, target, data, labels, args.report)
    facts = learning.card(
        name=name,
        base=base_identity,
        labels=labels,
        data=data,
        mode=mode,
        max_length=model.max_length,
        held_out_fraction=args.held_out,
        seed=args.seed,
        evaluation=evaluation,
        seconds=seconds,
    )
    _add_card(target, facts, args.report)
    print(
        f"wrote {target}: labels {labels}, {len(texts)} trained on, {int(data.held_out.sum())} held out "
        f"({data.held_out_note}); card {target / 'model-card.md'}, report {target / 'evaluation.json'}. "
        f"Try it in shadow with FILTER_CANDIDATE__NAME={target}, or use it with FILTER_MODEL__NAME={target}"
    )
    return 0


def _write(model: object, target: Path, name: str, digest: str) -> None:
    """Weights, tokenizer and lock into a hidden sibling first, renamed into place when complete: an
    interrupted run leaves no directory that looks like a model."""
    from filter_worker.model.lockfile import lock_directory
    from filter_worker.model.training import Base

    assert isinstance(model, Base)
    partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        model.save(partial)
        lock_directory(partial, name, f"trained-{digest[:12]}")
        if target.exists():
            target.rmdir()  # empty, checked before training
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _evaluate(settings: Settings, target: Path, data: object, labels: list[str], report: bool) -> dict[str, object]:
    """The held-out report of ``eval``, on the model loaded back as ``run`` loads it (lock verified)."""
    from filter_worker.cli.common import load_classifier
    from filter_worker.pipeline.routing import Router
    from filter_worker.tools.evaluation import evaluate, evaluation_json
    from filter_worker.tools.learning import TrainingData
    from filter_worker.tools.report import evaluation_text, write_evaluation_html

    assert isinstance(data, TrainingData)
    model_settings = with_model_name(settings.model, str(target)).model_copy(update={"verify": True})
    classifier = load_classifier(model_settings)
    held = [e for e, h in zip(data.examples, data.held_out, strict=True) if h]
    # The routing in force, when its rules speak of these labels; else no rules (action rates: all allow).
    rule_labels = {label for rule in settings.routing.rules for label in rule.labels}
    for scope in settings.routing.scopes:
        rule_labels |= {label for rule in scope.rules for label in rule.labels}
    routing = settings.routing if rule_labels <= set(labels) else RoutingSettings(rules=[], scopes=[])
    probs, _ = classifier.classify([e.text for e in held], settings.batch.max_size, settings.batch.max_tokens)
    result = evaluate(held, probs, classifier.labels, Router(routing, classifier.head))
    where = f"held-out part of {data.source}"
    sys.stdout.write(evaluation_text(result, classifier.identity, where))
    document = evaluation_json(result, classifier.identity, where, routing)
    document["held_out"] = data.held_out_note
    (target / "evaluation.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    if report:
        write_evaluation_html(str(target / "evaluation.html"), result, classifier.identity, where)
    return document


def _add_card(target: Path, facts: dict[str, object], report: bool) -> None:
    from filter_worker.model.lockfile import add_files
    from filter_worker.tools.learning import card_markdown

    (target / "training.json").write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2))
    (target / "model-card.md").write_text(card_markdown(facts), encoding="utf-8")
    files = ["evaluation.json", "training.json", "model-card.md", *(["evaluation.html"] if report else [])]
    add_files(target, files)
