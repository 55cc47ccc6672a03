"""What several commands share: the subcommand parser's common options and settings with ``--model``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from filter_worker.config import ConfigError, ModelSettings, Settings, load_settings

if TYPE_CHECKING:
    from filter_worker.model.classifier import Classifier

SOURCES = (
    "Settings come from FILTER_* environment variables over the TOML file given with --config, over "
    "the defaults; docs/configuration.md lists every setting."
)


def subcommand(commands: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:  # noqa: A002 - argparse's name
    """A subcommand parser that also accepts ``--config`` after the command name."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description or help, epilog=SOURCES
    )
    # SUPPRESS: given before the command, the root parser's value stays; given after, it wins.
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML settings file (environment overrides it)"
    )
    return parser


def model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local directory (overrides FILTER_MODEL__NAME)")


def settings_with_model(args: argparse.Namespace) -> Settings:
    """Settings from ``--config`` and the environment, ``--model`` applied, logging configured."""
    from filter_worker.logs import configure

    settings = load_settings(args.config)
    if getattr(args, "model", None) is not None:
        settings.model = with_model_name(settings.model, args.model)
    configure(settings.log)  # log lines (an unpinned model, say) go to stderr, never into the output
    return settings


def load_classifier(model: ModelSettings) -> Classifier:
    """The model as the development commands load it: with the onnx backend, a graph missing from an
    unlocked directory is exported first (``run`` never exports; see ``model/onnx_export.ensure_graph``)."""
    from filter_worker.model.classifier import Classifier
    from filter_worker.model.onnx_export import ensure_graph

    ensure_graph(model)
    return Classifier.load(model)


def with_model_name(model: ModelSettings, name: str) -> ModelSettings:
    """``model`` with ``--model NAME``, validated as FILTER_MODEL__NAME is but reported under the option."""
    try:
        return ModelSettings.model_validate({**model.model_dump(), "name": name})
    except ValidationError as exc:
        raise ConfigError(f"--model: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def write(option: str, path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: {exc.strerror}") from None


def data_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """Options of the commands that read labeled examples (``eval``, ``calibrate``)."""
    parser.add_argument(
        "data", nargs="?" if optional else None, help="labeled examples: .csv with a header line, or .jsonl"
    )
    parser.add_argument("--text-field", default="text", help="field holding the text (default text)")
    parser.add_argument("--label-field", default="label", help="field holding the gold label (default label)")
    parser.add_argument("--lang-field", help="field holding the language: adds metrics per language")
    parser.add_argument("--label-map", help='JSON object mapping data labels to model labels: \'{"spam": "toxic"}\'')
    model_argument(parser)
    parser.add_argument("--out-json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--report", metavar="PATH", help="also write a self-contained HTML report (needs matplotlib)")


def scope_argument(parser: argparse.ArgumentParser, help: str) -> None:  # noqa: A002 - argparse's name
    parser.add_argument("--scope", metavar="NAME", help=help)


def checked_scope(settings: Settings, scope: str | None) -> str | None:
    """``--scope NAME`` must be ``default`` or a scope of FILTER_ROUTING__SCOPES."""
    from filter_worker.pipeline.routing import ScopeMatcher

    names = ScopeMatcher(settings.routing.scopes).names
    if scope is not None and scope not in names:
        raise ConfigError(f"--scope {scope}: no such scope; FILTER_ROUTING__SCOPES gives {names}")
    return scope


def labeled_data(args: argparse.Namespace) -> tuple[Settings, list[Any]]:
    """Settings and examples, validated before the (slow) model load.

    Each example's scope is the one its columns select; ``--scope NAME`` makes every row NAME's.
    """
    import dataclasses

    from filter_worker.pipeline.routing import ScopeMatcher
    from filter_worker.tools.evaluation import load_examples, parse_label_map
    from filter_worker.tools.report import require_matplotlib

    settings = settings_with_model(args)
    scope = checked_scope(settings, args.scope)
    if args.report:
        require_matplotlib()
    label_map = parse_label_map(args.label_map)
    scopes = ScopeMatcher(settings.routing.scopes)
    examples = load_examples(args.data, args.text_field, args.label_field, args.lang_field, label_map, scopes)
    if scope is not None:
        examples = [dataclasses.replace(e, scope=scope) for e in examples]
    return settings, examples
