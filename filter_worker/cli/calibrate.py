"""``filter-worker calibrate``: the lowest ``min_score`` of a rule that reaches a target precision.

From labeled data (``DATA``), or from reviewers' verdicts (``--from-feedback``): the verdicts' scores
and their abuse/ok judgements stand in for scores and gold labels. Exits 1 when no threshold reaches
the target (the best one is still reported).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import orjson

from filter_worker.cli.common import (
    checked_scope,
    data_arguments,
    labeled_data,
    scope_argument,
    settings_with_model,
    subcommand,
    write,
)
from filter_worker.config import DEFAULT_SCOPE, ConfigError, Rule, Settings, rule_names
from filter_worker.exit_codes import ExitCode

if TYPE_CHECKING:
    from filter_worker.tools.calibration import Calibration

FEEDBACK_NOTE = (
    "Verdicts exist only for records this rule took (score >= the min_score in force when they were decided), so "
    "they can justify raising min_score, never lowering it: what a lower threshold would add was never reviewed.\n"
)


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "calibrate", "the lowest min_score of a rule that reaches a target precision")
    data_arguments(parser, optional=True)
    parser.add_argument("--action", choices=["drop", "quarantine", "allow"], help="the rule's action (with DATA)")
    parser.add_argument("--labels", help="the rule's labels, comma-separated: 'Very Negative,Negative' (with DATA)")
    parser.add_argument("--target-precision", type=float, required=True, help="e.g. 0.95")
    parser.add_argument("--name", help="rule name (default ACTION-pNN from the target; with DATA)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    scope_argument(
        parser,
        "the scope the rule is for: with DATA every row is taken as its traffic; with --from-feedback only "
        "verdicts on decisions of that scope count (default: default)",
    )
    parser.add_argument(
        "--from-feedback",
        metavar="TOPIC|FILE",
        help="propose a new min_score for --rule from reviewers' verdicts: a verdict topic read from its beginning "
        "(FILTER_KAFKA__* settings), or a JSON-lines export of one (an existing file)",
    )
    parser.add_argument("--rule", metavar="NAME", help="with --from-feedback: the rule (its filter.rule name)")
    parser.add_argument(
        "--feedback-model",
        metavar="ID",
        help="with --from-feedback: only verdicts on this model's decisions (its filter.model value); needed when "
        "the verdicts span several models",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.target_precision <= 1.0:
        raise ConfigError("--target-precision must be above 0 and at most 1")
    if args.resamples < 0:
        raise ConfigError("--resamples must be 0 or more")
    if (args.data is None) == (args.from_feedback is None):
        raise ConfigError("calibrate needs either DATA (labeled examples) or --from-feedback TOPIC|FILE")
    return _from_data(args) if args.data is not None else _from_feedback(args)


def _from_data(args: argparse.Namespace) -> int:
    import numpy as np

    from filter_worker.model import Classifier
    from filter_worker.tools.calibration import calibrate, rule_scores
    from filter_worker.tools.report import calibration_text

    if args.action is None or args.labels is None:
        raise ConfigError("calibrate DATA needs --action and --labels")
    if args.rule or args.feedback_model:
        raise ConfigError("--rule and --feedback-model go with --from-feedback, not with DATA")
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
    text = calibration_text(result, args.action, labels, "examples")
    name = args.name or f"{args.action}-p{round(100 * args.target_precision)}"
    rule = Rule(action=args.action, labels=labels, min_score=result.threshold, name=name)
    if result.meets_target and args.scope not in (None, DEFAULT_SCOPE):
        text += f"Add the rule below to the rules of scope {args.scope} in FILTER_ROUTING__SCOPES.\n"
    return _report(args, result, rule if result.meets_target else None, text, classifier.identity, args.data)


def _from_feedback(args: argparse.Namespace) -> int:
    import numpy as np

    from filter_worker.feedback import read_verdicts
    from filter_worker.tools.calibration import calibrate
    from filter_worker.tools.report import calibration_text, require_matplotlib

    if args.action or args.labels or args.name:
        raise ConfigError("--action, --labels and --name go with DATA; --from-feedback calibrates a configured --rule")
    if not args.rule:
        raise ConfigError("--from-feedback needs --rule NAME (the filter.rule of the verdicts to use)")
    settings = settings_with_model(args)
    if args.report:
        require_matplotlib()
    scope = checked_scope(settings, args.scope) or DEFAULT_SCOPE
    current = _configured_rule(settings, scope, args.rule)
    verdicts, skipped = read_verdicts(args.from_feedback, settings.kafka)
    chosen = [v for v in verdicts if v.scope == scope and v.rule == args.rule]
    models = sorted({v.model for v in chosen})
    if args.feedback_model:
        chosen = [v for v in chosen if v.model == args.feedback_model]
    elif len(models) > 1:
        raise ConfigError(
            f"--from-feedback {args.from_feedback}: the verdicts on rule {args.rule} come from {len(models)} models "
            f"{models}; choose one with --feedback-model"
        )
    source = f"--from-feedback {args.from_feedback}"
    if not chosen:
        raise ConfigError(
            f"{source}: no verdict on rule {args.rule} in scope {scope}"
            + (f" for model {args.feedback_model}" if args.feedback_model else "")
            + f" ({len(verdicts)} valid verdicts in all; records skipped: {dict(skipped) or 'none'})"
        )
    positive = np.array([v.abuse for v in chosen])
    if not positive.any():
        raise ConfigError(f"{source}: every verdict on rule {args.rule} is 'ok'; no threshold keeps any abuse")
    score = np.array([v.score for v in chosen], dtype=np.float64)
    result = calibrate(score, positive, args.target_precision, args.resamples, seed=args.seed)
    text = (
        f"{len(chosen)} verdicts on rule {args.rule} (scope {scope}, model {chosen[0].model}; 'abuse' is positive); "
        f"verdict records skipped: {dict(skipped) or 'none'}\n"
        + calibration_text(result, current.action, current.labels, "verdicts")
        + FEEDBACK_NOTE
    )
    rule = None
    below = score < result.threshold
    if result.meets_target and not below.any():
        # Every reviewed record already clears the target together: nothing supports a higher threshold.
        text += (
            f"All {len(chosen)} verdicts together reach precision {args.target_precision}: keep the current "
            f"min_score {current.min_score}.\n"
        )
        rule = current
    elif result.meets_target:
        where = "FILTER_ROUTING__RULES" if scope == DEFAULT_SCOPE else f"scope {scope} of FILTER_ROUTING__SCOPES"
        text += (
            f"Raising min_score from {current.min_score} to {result.threshold:.6f} stops taking {int(below.sum())} of "
            f"the reviewed records ({int((~positive[below]).sum())} judged ok). Replace rule {args.rule} in {where} "
            "with the rule below.\n"
        )
        rule = current.model_copy(update={"min_score": result.threshold})
    return _report(args, result, rule, text, chosen[0].model, args.from_feedback)


def _configured_rule(settings: Settings, scope: str, name: str) -> Rule:
    """The rule as configured now, named as its verdicts name it."""
    from filter_worker.pipeline.routing import scope_rules

    rules = scope_rules(settings.routing)[scope]
    names = rule_names(rules)
    if name not in names:
        raise ConfigError(f"--rule {name}: scope {scope} has no such rule; its rules are {names}")
    return rules[names.index(name)].model_copy(update={"name": name})


def _report(args: argparse.Namespace, result: Calibration, rule: Rule | None, text: str, model: str, data: str) -> int:
    """Print ``text`` and the rule (the last line, JSON), write --out-json and --report; exit 1 without a rule."""
    from filter_worker.tools.calibration import calibration_json
    from filter_worker.tools.report import write_calibration_html

    sys.stdout.write(text)
    document = rule.model_dump() if rule is not None else None
    if args.out_json:
        body = orjson.dumps(calibration_json(result, document), option=orjson.OPT_INDENT_2).decode()
        write("--out-json", args.out_json, body)
    if args.report:
        write_calibration_html(args.report, result, document, model, data, text)
    if document is None:
        return ExitCode.FAILED
    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    return 0
