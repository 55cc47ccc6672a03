"""Stop and reload requests from signals, taken from the process's first moments.

Signals are process-wide, and a command's imports take most of a second before any of its code runs;
the entry point (``__main__.py``) takes SIGHUP before them, and a service's command takes SIGTERM and
SIGINT before it loads its model. Standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import os
import signal
import threading


class Requests:
    """Stop and reload requests: set by signal handlers and the config watcher, taken by the loop.

    Made before anything slow (loading the model), so a signal that arrives while the service starts
    is kept for when the loop can act on it instead of ending the process.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._reload = threading.Event()

    def stop(self, *_signal: object) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_reload(self, *_signal: object) -> None:
        """Ask the loop to reload the routing settings; safe from signal handlers and other threads."""
        self._reload.set()

    def reload_requested(self) -> bool:
        """Whether a reload was asked for since the last call (the request is taken)."""
        if not self._reload.is_set():
            return False
        self._reload.clear()
        return True


def take_reloads(requests: Requests) -> None:
    """SIGHUP asks ``requests`` to reload: installed by the entry point before any import that takes time.

    Python's default for SIGHUP ends the process, silently; a reload sent to every pod must never kill
    one that is still starting (importing, loading its model). The request is kept for the loop.
    """
    signal.signal(signal.SIGHUP, requests.request_reload)


def take_stops(requests: Requests) -> None:
    """SIGTERM and SIGINT ask ``requests`` to stop: installed once a service's command begins (before its
    model loads); other commands keep Python's defaults."""
    signal.signal(signal.SIGTERM, requests.stop)
    signal.signal(signal.SIGINT, requests.stop)


def release_reloads(requests: Requests) -> None:
    """For a command that is not a service: SIGHUP ends it again, as Python's default does, also when one
    came while it started."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if requests.reload_requested():
        os.kill(os.getpid(), signal.SIGHUP)
