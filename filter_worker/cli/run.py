"""``filter-worker run``: the worker itself, until SIGTERM/SIGINT.

The routing settings are reloaded from ``--config`` on SIGHUP and whenever the file's content
changes (a Kubernetes ConfigMap mounted as a file is updated in place, with no signal to anyone).
"""

from __future__ import annotations

import argparse
from typing import Any

from filter_worker.cli.common import model_argument, settings_with_model, subcommand
from filter_worker.config import load_settings
from filter_worker.service.config_watcher import ConfigWatcher
from filter_worker.service.signals import Requests, take_reloads, take_stops


def add_parser(commands: Any) -> None:
    parser = subcommand(
        commands,
        "run",
        "consume, classify and route until SIGTERM/SIGINT",
        "consume, classify and route until SIGTERM/SIGINT; the [routing] section of --config is reloaded on "
        "SIGHUP and when the file's content changes",
    )
    model_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Signals are taken before anything slow: a SIGHUP while the model loads is a reload applied once
    # the loop runs (Python's default would end the process), a SIGTERM a stop before joining the group.
    requests: Requests = args.requests
    take_reloads(requests)
    take_stops(requests)
    # The watcher's baseline is the content the settings are loaded from, so an edit made while the
    # model loads is still noticed.
    watcher = ConfigWatcher(args.config, requests.request_reload) if args.config else None
    settings = settings_with_model(args)
    # Imported after the settings are checked: torch and transformers take seconds to import, and a
    # bad setting should be reported at once.
    from filter_worker.kafka.client_check import check_clients
    from filter_worker.model import precision
    from filter_worker.model.classifier import Classifier
    from filter_worker.pipeline.candidate import check_candidate_rules
    from filter_worker.service.shell import serve
    from filter_worker.service.worker import Worker

    check_clients(settings.kafka)  # before the (slow) model load
    loaded = precision.load(settings.model, settings.routing, settings.batch.max_size)
    candidate = settings.candidate
    shadow = None
    if candidate.name is not None:
        shadow = Classifier.load(candidate.model_settings(settings.model))
        check_candidate_rules(settings, shadow.head)
    worker = Worker(
        settings,
        loaded.classifier,
        reload_routing=lambda: load_settings(args.config).routing,
        candidate=shadow,
        precision=loaded,
        requests=requests,
    )
    return serve(worker, args.config, watcher)
