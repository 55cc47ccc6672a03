"""``filter-worker run``: the worker itself, until SIGTERM/SIGINT.

The routing settings are reloaded from ``--config`` on SIGHUP and whenever the file's content
changes (a Kubernetes ConfigMap mounted as a file is updated in place, with no signal to anyone).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filter_worker.cli.common import subcommand
from filter_worker.config import load_settings

# How often the --config file is read for changes. Reading a small file every few seconds costs
# nothing, and the kubelet itself takes up to a minute or so to project a ConfigMap change.
CONFIG_POLL_S = 2.0


def add_parser(commands: Any) -> None:
    parser = subcommand(
        commands,
        "run",
        "consume, classify and route until SIGTERM/SIGINT",
        "consume, classify and route until SIGTERM/SIGINT; the [routing] section of --config is reloaded on "
        "SIGHUP and when the file's content changes",
    )
    parser.set_defaults(handler=run)


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:  # mid-swap or removed: keep the last known content
        return None


class ConfigWatcher:
    """Calls ``on_change`` when the file's content changes, polled on a daemon thread.

    Content, not mtime: Kubernetes updates a mounted ConfigMap by pointing a ``..data`` symlink at a
    new directory, and the new file's mtime need not differ from the old one's (nor does a file
    restored from a backup). The path is re-resolved on every read, so the swap is followed.
    """

    def __init__(self, path: str, on_change: Callable[[], None], interval_s: float = CONFIG_POLL_S) -> None:
        from filter_worker.logs import get_logger

        self._path = Path(path)
        self._on_change = on_change
        self._interval_s = interval_s
        self._last = _digest(self._path)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="config-watcher", daemon=True)
        self._log = get_logger("filter_worker.config_watcher")

    def start(self) -> ConfigWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self._interval_s):
            digest = _digest(self._path)
            if digest is None or digest == self._last:
                continue
            self._last = digest
            self._log.info("config file changed; reloading the routing settings", path=str(self._path))
            self._on_change()


def run(args: argparse.Namespace) -> int:
    from filter_worker.client_check import check_clients
    from filter_worker.logs import configure
    from filter_worker.model import Classifier
    from filter_worker.worker import Worker

    # The watcher's baseline is the content the settings are loaded from, so an edit made while the
    # model loads is still noticed.
    watcher = ConfigWatcher(args.config, lambda: worker.request_reload()) if args.config else None
    settings = load_settings(args.config)
    configure(settings.log)
    check_clients(settings.kafka)  # before the (slow) model load
    classifier = Classifier.load(settings.model)
    worker = Worker(settings, classifier, reload_routing=lambda: load_settings(args.config).routing)

    def request_stop(signum: int, _frame: Any) -> None:
        worker.stop()

    def request_reload(signum: int, _frame: Any) -> None:
        worker.request_reload()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    if watcher is not None:
        watcher.start()
    try:
        return worker.run()
    finally:
        if watcher is not None:
            watcher.stop()
