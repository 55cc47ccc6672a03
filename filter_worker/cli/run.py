"""``filter-worker run``: the worker itself, until SIGTERM/SIGINT; SIGHUP reloads the routing settings."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import load_settings


def add_parser(commands: Any) -> None:
    parser = subcommand(commands, "run", "consume, classify and route until SIGTERM/SIGINT")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from filter_worker.logs import configure
    from filter_worker.model import Classifier
    from filter_worker.worker import Worker

    settings = load_settings(args.config)
    configure(settings.log)
    classifier = Classifier.load(settings.model)
    worker = Worker(settings, classifier, reload_routing=lambda: load_settings(args.config).routing)

    def request_stop(signum: int, _frame: Any) -> None:
        worker.stop()

    def request_reload(signum: int, _frame: Any) -> None:
        worker.request_reload()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    return worker.run()
