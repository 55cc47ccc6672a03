"""``filter-worker classify``: decisions for texts given on the command line or in a file, without Kafka."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from filter_worker.cli.common import checked_scope, model_argument, scope_argument, settings_with_model, subcommand
from filter_worker.config import DEFAULT_SCOPE, ConfigError


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "classify", "print one JSON decision per text, without Kafka")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--file", metavar="PATH", help="one text per line; '-' reads standard input")
    model_argument(parser)
    scope_argument(parser, "decide with this scope's rules (default: FILTER_ROUTING__RULES, scope default)")
    parser.set_defaults(handler=run)


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


def run(args: argparse.Namespace) -> int:
    from filter_worker.model import Classifier
    from filter_worker.pipeline.routing import Router

    settings = settings_with_model(args)
    scope = checked_scope(settings, args.scope) or DEFAULT_SCOPE
    texts = _read_texts(args)
    classifier = Classifier.load(settings.model)
    router = Router(settings.routing, classifier.labels)
    probs, truncated = classifier.classify(texts, settings.batch.max_size, settings.batch.max_tokens)
    decisions = router.decide_batch(probs, [scope] * len(texts))
    for text, decision, cut in zip(texts, decisions, truncated, strict=True):
        line = {
            "text": text,
            "action": decision.action,
            "rule": decision.rule,
            "scope": decision.scope,
            "label": decision.label,
            "score": round(decision.score, 6),
            "rule_scores": {k: round(v, 6) for k, v in decision.rule_scores.items()},
            "scores": {k: round(v, 6) for k, v in decision.scores.items()},
            "truncated": cut,
            "model": classifier.identity,
        }
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
    return 0
