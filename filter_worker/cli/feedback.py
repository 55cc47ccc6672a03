"""``filter-worker feedback``: reviewers' verdicts in, precision per scope, rule and model out, until SIGTERM.

The routing settings (which scopes and rules exist) are reloaded on SIGHUP and when the ``--config``
file's content changes, as for ``run``.
"""

from __future__ import annotations

import argparse
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import load_settings
from filter_worker.service.config_watcher import ConfigWatcher


def add_parser(commands: Any) -> None:
    parser = subcommand(
        commands,
        "feedback",
        "consume reviewers' verdicts and export each rule's precision on FILTER_FEEDBACK__METRICS_PORT",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from filter_worker.kafka.client_check import check_clients
    from filter_worker.logs import configure
    from filter_worker.service.feedback import FeedbackService
    from filter_worker.service.shell import serve

    # The baseline is the content the settings are loaded from, as in ``run``.
    watcher = ConfigWatcher(args.config, lambda: service.request_reload()) if args.config else None
    settings = load_settings(args.config)
    configure(settings.log)
    check_clients(settings.kafka)
    service = FeedbackService(settings, reload_routing=lambda: load_settings(args.config).routing)
    return serve(service, args.config, watcher)
