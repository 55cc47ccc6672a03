"""``filter-worker classify``: decisions for texts given on the command line or in a file, without Kafka.

A text the worker could not classify (empty, or only whitespace) gets the answer the worker would give
it: a ``dead_letter`` line with the error class and reason the dead-letter topic would carry.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from filter_worker.cli.common import checked_scope, model_argument, scope_argument, settings_with_model, subcommand
from filter_worker.config import DEFAULT_SCOPE, ConfigError

if TYPE_CHECKING:
    from filter_worker.pipeline.routing import Decision

# The worker's class for a text field that is empty or only whitespace (pipeline/decode.py).
_EMPTY = {"action": "dead_letter", "error": "empty_text", "reason": "the text is empty or only whitespace"}


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "classify", "print one JSON decision per text, without Kafka")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument(
        "--file", metavar="PATH", help="one text per line, blank lines skipped; '-' reads standard input"
    )
    model_argument(parser)
    scope_argument(parser, "decide with this scope's rules (default: FILTER_ROUTING__RULES, scope default)")
    parser.set_defaults(handler=run)


def _lines(data: bytes, source: str) -> list[str]:
    """Non-blank lines of UTF-8 ``data``; anything else is refused naming ``source`` and the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source} line {line}: not valid UTF-8 (byte {exc.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file == "-":
        # Bytes, decoded strictly: the text layer would let invalid bytes through as surrogates.
        texts += _lines(sys.stdin.buffer.read(), "--file - (standard input)")
    elif args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ConfigError(f"--file {args.file}: no such file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--file {args.file}: {exc.strerror}") from None
        texts += _lines(data, f"--file {args.file}")
    if not texts:
        raise ConfigError("classify needs texts as arguments or --file PATH ('-' for standard input)")
    return texts


def run(args: argparse.Namespace) -> int:
    from filter_worker.cli.common import load_classifier
    from filter_worker.pipeline.routing import Router

    settings = settings_with_model(args)
    scope = checked_scope(settings, args.scope) or DEFAULT_SCOPE
    texts = _read_texts(args)
    classifier = load_classifier(settings.model)
    router = Router(settings.routing, classifier.head)
    classifiable = [text for text in texts if text.strip()]
    decided: Iterator[tuple[Decision, bool]] = iter(())
    if classifiable:  # the tokenizer refuses an empty batch
        probs, truncated = classifier.classify(classifiable, settings.batch.max_size, settings.batch.max_tokens)
        decisions = router.decide_batch(probs, [scope] * len(classifiable))
        decided = iter(zip(decisions, truncated, strict=True))
    for text in texts:
        line: dict[str, Any]
        if not text.strip():
            line = {"text": text, **_EMPTY, "model": classifier.identity}
        else:
            decision, cut = next(decided)
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
