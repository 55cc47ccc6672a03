"""``filter-worker produce``: a load generator sending sample messages to the input topic at a rate."""

from __future__ import annotations

import argparse
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import load_settings


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "produce", "load generator: sample messages to the input topic at a rate")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second (default 50)")
    parser.add_argument("--count", type=int, default=1000, help="messages to send; 0 sends until stopped")
    parser.add_argument("--topic", help="target topic (default: the first FILTER_TOPICS__INPUT)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from filter_worker.kafka.client_check import check_clients
    from filter_worker.tools.loadgen import produce_samples

    settings = load_settings(args.config)
    check_clients(settings.kafka)
    return produce_samples(settings, args.topic or settings.topics.input[0], args.rate, args.count)
