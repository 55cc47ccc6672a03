"""``filter-worker demo``: embedded broker, sample traffic and a worker, then a summary."""

from __future__ import annotations

import argparse
from typing import Any

from filter_worker.cli.common import model_argument, settings_with_model, subcommand


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "demo", "embedded broker + sample traffic + worker, then a summary")
    model_argument(parser)
    parser.add_argument("--messages", type=int, default=400, help="sample messages to produce (default 400)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from filter_worker.kafka.client_check import check_clients
    from filter_worker.tools.demo import run_demo

    settings = settings_with_model(args)
    check_clients(settings.kafka)  # FILTER_KAFKA__*PROPERTIES apply to the demo's clients too
    return run_demo(settings, args.messages)
