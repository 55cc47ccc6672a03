"""Reload on a changed ``--config`` file: a Kubernetes ConfigMap mounted as a file changes with no signal.

Used by ``run`` (the worker) and ``feedback`` (the precision service), which read the same routing
settings; each also reloads on SIGHUP.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

from filter_worker.logs import get_logger

log = get_logger("filter_worker.service.config_watcher")

# How often the --config file is read for changes. Reading a small file every few seconds costs
# nothing, and the kubelet itself takes up to a minute or so to project a ConfigMap change.
CONFIG_POLL_S = 2.0


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
        self._path = Path(path)
        self._on_change = on_change
        self._interval_s = interval_s
        self._last = _digest(self._path)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="config-watcher", daemon=True)

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
            log.info("config file changed; reloading the routing settings", path=str(self._path))
            self._on_change()
