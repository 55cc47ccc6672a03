"""``filter-worker eval``: accuracy, macro-F1, precision/recall and action rates on labeled data."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from filter_worker.cli.common import data_arguments, labeled_data, scope_argument, subcommand, write


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "eval", "accuracy, macro-F1, precision/recall and action rates on labeled data")
    data_arguments(parser)
    scope_argument(
        parser,
        "route every row with this scope's rules (the data is that scope's traffic); without it, each row "
        "gets the scope its columns select and action rates are broken down by scope",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from filter_worker.cli.common import load_classifier
    from filter_worker.pipeline.routing import Router
    from filter_worker.tools.evaluation import check_labels, evaluate, evaluation_json
    from filter_worker.tools.report import evaluation_text, write_evaluation_html

    settings, examples = labeled_data(args)
    classifier = load_classifier(settings.model)
    check_labels(examples, classifier.labels, args.data)
    router = Router(settings.routing, classifier.head)
    probs, _ = classifier.classify([e.text for e in examples], settings.batch.max_size, settings.batch.max_tokens)
    result = evaluate(examples, probs, classifier.labels, router)
    sys.stdout.write(evaluation_text(result, classifier.identity, args.data))
    if args.out_json:
        document = evaluation_json(result, classifier.identity, args.data, settings.routing)
        write("--out-json", args.out_json, orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    if args.report:
        write_evaluation_html(args.report, result, classifier.identity, args.data)
    return 0
