"""``filter-worker drift snapshot``: the reference score distributions ``FILTER_DRIFT__REFERENCE`` reads."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from filter_worker.cli.common import (
    checked_scope,
    model_argument,
    scope_argument,
    settings_with_model,
    subcommand,
    write,
)
from filter_worker.config import MIN_DRIFT_REFERENCE, ConfigError


def add_parser(commands: Any) -> None:
    parent = subcommand(commands, "drift", "score drift references")
    parent.set_defaults(handler=run)
    drift = parent.add_subparsers(dest="drift_command", required=True)
    snapshot = drift.add_parser(
        "snapshot",
        help="classify a sample of traffic and write each scope's rule score distributions (FILTER_DRIFT__REFERENCE)",
    )
    snapshot.add_argument("data", help="a sample of traffic, labeled or not: .csv with a header line, or .jsonl")
    snapshot.add_argument("--out", required=True, metavar="FILE", help="reference file to write (JSON)")
    snapshot.add_argument("--text-field", default="text", help="field holding the text (default text)")
    model_argument(snapshot)
    scope_argument(
        snapshot,
        "take every row as this scope's traffic; without it each row gets the scope its columns select "
        "(a header scope reads the column named like the header, a field scope the field)",
    )


def run(args: argparse.Namespace) -> int:
    from filter_worker.cli.common import load_classifier
    from filter_worker.moderation.drift import QUANTILES, expected_noise, reference_of
    from filter_worker.pipeline.routing import Router, ScopeMatcher
    from filter_worker.tools.evaluation import load_texts

    settings = settings_with_model(args)
    scope = checked_scope(settings, args.scope)
    rows = load_texts(args.data, args.text_field, ScopeMatcher(settings.routing.scopes))
    scopes = [scope or row_scope for _, row_scope in rows]
    classifier = load_classifier(settings.model)
    router = Router(settings.routing, classifier.head)
    probs, _ = classifier.classify([text for text, _ in rows], settings.batch.max_size, settings.batch.max_tokens)
    by_scope = {}
    for name in router.scopes:
        selected = probs[[i for i, s in enumerate(scopes) if s == name]]
        rules = router.rules(name)
        if len(selected) < MIN_DRIFT_REFERENCE or not rules:
            why = f"{len(selected)} records; an index needs {MIN_DRIFT_REFERENCE}" if rules else "it has no rules"
            sys.stdout.write(f"scope {name}: left out ({why}); it gets no drift index\n")
            continue
        scored = router.rule_scores(selected, name)
        by_scope[name] = {rule: (labels, scored[:, i]) for i, (rule, labels) in enumerate(rules.items())}
        noise = expected_noise(len(QUANTILES) - 1, len(selected), settings.drift.window)
        sys.stdout.write(
            f"scope {name}: {len(selected)} records, rules {list(rules)}; without drift the index averages about "
            f"{noise:.3f} with FILTER_DRIFT__WINDOW={settings.drift.window}\n"
        )
    if not by_scope:
        raise ConfigError(f"{args.data}: no scope with rules has {MIN_DRIFT_REFERENCE} rows or more; nothing to write")
    reference = reference_of(classifier.identity, args.data, by_scope)
    write("--out", args.out, orjson.dumps(reference.to_json(), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write(f"wrote {args.out}; use it with FILTER_DRIFT__REFERENCE={args.out}\n")
    return 0
