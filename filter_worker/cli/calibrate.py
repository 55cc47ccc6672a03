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
    from filter_worker.tools.report import ThresholdChart
    from filter_worker.tools.verdict_calibration import VerdictCalibration

FEEDBACK_NOTE = (
    "Verdicts on what this rule took (score >= the min_score in force when they were decided) can justify raising "
    "min_score, never lowering it: what a lower threshold would add was never reviewed. Only verdicts on records "
    "drawn at random below it (FILTER_REVIEW__*) can.\n"
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

    from filter_worker.cli.common import load_classifier
    from filter_worker.tools.calibration import calibrate, calibration_json, rule_scores
    from filter_worker.tools.report import calibration_text

    if args.action is None or args.labels is None:
        raise ConfigError("calibrate DATA needs --action and --labels")
    if args.rule or args.feedback_model:
        raise ConfigError("--rule and --feedback-model go with --from-feedback, not with DATA")
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    settings, examples = labeled_data(args)
    classifier = load_classifier(settings.model)
    unknown = [label for label in labels if label not in classifier.labels]
    if unknown or not labels:
        raise ConfigError(f"--labels: unknown label(s) {unknown}; the model's labels are {classifier.labels}")
    positive = np.array([e.label in labels for e in examples])
    if not positive.any():
        raise ConfigError(f"{args.data}: no example's label is one of {labels}; map data labels with --label-map")
    probs, _ = classifier.classify([e.text for e in examples], settings.batch.max_size, settings.batch.max_tokens)
    result = calibrate(
        rule_scores(probs, classifier.head, labels), positive, args.target_precision, args.resamples, seed=args.seed
    )
    text = calibration_text(result, args.action, labels, "examples")
    name = args.name or f"{args.action}-p{round(100 * args.target_precision)}"
    rule = Rule(action=args.action, labels=labels, min_score=result.threshold, name=name)
    if result.meets_target and args.scope not in (None, DEFAULT_SCOPE):
        text += f"Add the rule below to the rules of scope {args.scope} in FILTER_ROUTING__SCOPES.\n"
    chosen = rule if result.meets_target else None
    document = calibration_json(result, _dump(chosen))
    return _report(args, document, result, chosen, text, classifier.identity, args.data)


def _from_feedback(args: argparse.Namespace) -> int:
    import numpy as np

    from filter_worker.moderation.verdicts import MODERATED, latest_per_source, read_verdicts
    from filter_worker.tools.report import require_matplotlib, verdict_calibration_text
    from filter_worker.tools.verdict_calibration import calibrate_verdicts, drawn_below, verdict_calibration_json

    if args.action or args.labels or args.name:
        raise ConfigError("--action, --labels and --name go with DATA; --from-feedback calibrates a configured --rule")
    if not args.rule:
        raise ConfigError("--from-feedback needs --rule NAME (the filter.rule of the verdicts to use)")
    if args.target_precision >= 1.0:
        raise ConfigError("--target-precision 1 can never be shown by a sample of verdicts; use at most 0.999")
    settings = settings_with_model(args)
    if args.report:
        require_matplotlib()
    scope = checked_scope(settings, args.scope) or DEFAULT_SCOPE
    current, earlier = _configured_rule(settings, scope, args.rule)
    verdicts, skipped = read_verdicts(args.from_feedback, settings.kafka)
    in_scope = [v for v in verdicts if v.scope == scope]
    models = sorted({v.model for v in in_scope if v.rule == args.rule})
    if args.feedback_model:
        in_scope = [v for v in in_scope if v.model == args.feedback_model]
    elif len(models) > 1:
        raise ConfigError(
            f"--from-feedback {args.from_feedback}: the verdicts on rule {args.rule} come from {len(models)} models "
            f"{models}; choose one with --feedback-model"
        )
    elif models:
        in_scope = [v for v in in_scope if v.model == models[0]]
    records = sum(v.rule == args.rule for v in in_scope)
    latest = latest_per_source(in_scope)
    chosen = [v for v in latest if v.rule == args.rule and v.action in MODERATED]
    source = f"--from-feedback {args.from_feedback}"
    if not chosen:
        raise ConfigError(
            f"{source}: no verdict on rule {args.rule} in scope {scope}"
            + (f" for model {args.feedback_model}" if args.feedback_model else "")
            + f" ({len(verdicts)} valid verdicts in all; records skipped: {dict(skipped) or 'none'})"
        )
    if not any(v.abuse for v in chosen):
        raise ConfigError(f"{source}: every verdict on rule {args.rule} is 'ok'; no threshold keeps any abuse")
    reviewed = [v for v in chosen if v.score >= current.min_score]
    drawn = [v for v in latest if v.sample is not None]
    movable = drawn_below([v.sample.rule_scores for v in drawn if v.sample is not None], args.rule, earlier)
    drawn = [v for v, keep in zip(drawn, movable, strict=True) if keep]
    below = (
        np.array([v.sample.rule_scores[args.rule] for v in drawn if v.sample is not None], dtype=np.float64),
        np.array([v.abuse for v in drawn], dtype=bool),
        np.array([v.sample.probability for v in drawn if v.sample is not None], dtype=np.float64),
    )
    result = calibrate_verdicts(
        np.array([v.score for v in reviewed], dtype=np.float64),
        np.array([v.abuse for v in reviewed], dtype=bool),
        current.min_score,
        args.target_precision,
        args.resamples,
        args.seed,
        below,
    )
    model = chosen[0].model
    text = (
        f"{len(chosen)} verdicts on rule {args.rule} (scope {scope}, model {model}; 'abuse' is positive); "
        f"verdict records skipped: {dict(skipped) or 'none'}\n"
        f"{records} verdict records on these {len(chosen)} sources: each source counts once, with its latest verdict\n"
    )
    if len(chosen) > len(reviewed):
        text += (
            f"{len(chosen) - len(reviewed)} verdicts scored below the min_score in force ({current.min_score}) and are "
            "left out: decided under an older, lower min_score, they say nothing about the rule as it is\n"
        )
    text += verdict_calibration_text(result, current.action, current.labels, "verdicts") + FEEDBACK_NOTE
    rule = _advice(result, current, scope)
    text += rule[1]
    return _report(
        args, verdict_calibration_json(result, _dump(rule[0])), result, rule[0], text, model, args.from_feedback
    )


def _advice(result: VerdictCalibration, current: Rule, scope: str) -> tuple[Rule | None, str]:
    """The rule to put in force (None: none can be justified) and the sentences that say why."""
    where = "FILTER_ROUTING__RULES" if scope == DEFAULT_SCOPE else f"scope {scope} of FILTER_ROUTING__SCOPES"
    replace = f"Replace rule {current.name} in {where} with the rule below.\n"
    target = result.target_precision
    if result.threshold is None:
        return None, f"No min_score at or above {current.min_score} can be shown to reach precision {target}.\n"
    if result.threshold > current.min_score:
        stopped = result.reviewed - result.taken
        released_ok = stopped - (result.abuse - result.caught)
        return current.model_copy(update={"min_score": result.threshold}), (
            f"Raising min_score from {current.min_score} to {result.threshold:.6f} stops taking {stopped} of the "
            f"reviewed records ({released_ok} judged ok). " + replace
        )
    keep = (
        f"The {result.reviewed} verdicts at or above the min_score in force reach precision {target} (lower end "
        f"{result.precision.low:.4f}): keep min_score {current.min_score}.\n"
    )
    lowering = result.lowering
    if lowering is None or not lowering.drawn:
        return current, keep + (
            f"No verdict on a record drawn at random below {current.min_score}: nothing can justify lowering it "
            "(random review sampling: FILTER_REVIEW__RATE, FILTER_REVIEW__NEAR_RATE).\n"
        )
    if lowering.threshold is None or lowering.precision is None:
        return current, keep + (
            f"{lowering.drawn} verdicts on records drawn at random below it: no range below it shows precision "
            f"{target}, so it stays.\n"
        )
    estimate = lowering.precision
    return current.model_copy(update={"min_score": lowering.threshold}), keep + (
        f"Lowering min_score from {current.min_score} to {lowering.threshold:.6f} adds the records between them: "
        f"{lowering.added} of the {lowering.drawn} verdicts on records drawn at random below it lie there, weighted "
        f"by 1 / their chance of being drawn: precision {estimate.value:.4f} 95% [{estimate.low:.4f}, "
        f"{estimate.high:.4f}] (Wilson, effective size {estimate.size:.1f}). " + replace
    )


def _dump(rule: Rule | None) -> dict[str, object] | None:
    return rule.model_dump() if rule is not None else None


def _configured_rule(settings: Settings, scope: str, name: str) -> tuple[Rule, list[tuple[str, float]]]:
    """The rule as configured now, named as its verdicts name it, and the rules before it in its scope
    (name, min_score): a record one of them takes never reaches it."""
    from filter_worker.pipeline.routing import scope_rules

    rules = scope_rules(settings.routing)[scope]
    names = rule_names(rules)
    if name not in names:
        raise ConfigError(f"--rule {name}: scope {scope} has no such rule; its rules are {names}")
    at = names.index(name)
    earlier = [(names[i], rules[i].min_score) for i in range(at)]
    return rules[at].model_copy(update={"name": name}), earlier


def _report(
    args: argparse.Namespace,
    document: dict[str, object],
    chart: ThresholdChart,
    rule: Rule | None,
    text: str,
    model: str,
    data: str,
) -> int:
    """Print ``text`` and the rule (the last line, JSON), write --out-json and --report; exit 1 without a rule."""
    from filter_worker.tools.report import write_calibration_html

    sys.stdout.write(text)
    if args.out_json:
        write("--out-json", args.out_json, orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    if args.report:
        write_calibration_html(args.report, chart, _dump(rule), model, data, text)
    if rule is None:
        return ExitCode.FAILED
    sys.stdout.write(orjson.dumps(rule.model_dump()).decode() + "\n")
    return 0
