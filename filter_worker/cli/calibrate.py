"""``filter-worker calibrate``: the lowest ``min_score`` of a rule that reaches a target precision.

Exits 1 when no threshold reaches the target (the best one is still reported).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from filter_worker.cli.common import data_arguments, labeled_data, subcommand, write
from filter_worker.config import ConfigError, Rule
from filter_worker.exit_codes import ExitCode


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "calibrate", "the lowest min_score of a rule that reaches a target precision")
    data_arguments(parser)
    parser.add_argument("--action", choices=["drop", "quarantine", "allow"], required=True, help="the rule's action")
    parser.add_argument("--labels", required=True, help="the rule's labels, comma-separated: 'Very Negative,Negative'")
    parser.add_argument("--target-precision", type=float, required=True, help="e.g. 0.95")
    parser.add_argument("--name", help="rule name (default ACTION-pNN from the target)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from filter_worker.model import Classifier
    from filter_worker.tools.calibration import calibrate, calibration_json, rule_scores
    from filter_worker.tools.report import calibration_text, write_calibration_html

    if not 0.0 < args.target_precision <= 1.0:
        raise ConfigError("--target-precision must be above 0 and at most 1")
    if args.resamples < 0:
        raise ConfigError("--resamples must be 0 or more")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    settings, examples = labeled_data(args)
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
        write("--out-json", args.out_json, orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    if args.report:
        write_calibration_html(args.report, result, rule, classifier.identity, args.data, text)
    if rule is None:
        return ExitCode.FAILED
    sys.stdout.write(orjson.dumps(rule).decode() + "\n")
    return 0
