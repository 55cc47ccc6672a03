"""Liveness, readiness and the HTTP endpoint that serves them next to ``/metrics``.

Liveness means the Kafka loop is turning (a wedged loop gets the pod restarted); readiness means the
worker can do its job right now: model loaded and warmed up, group joined, broker reachable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Health:
    """Written by the Kafka loop, read by the HTTP thread; single assignments, so no lock is needed."""

    def __init__(self, liveness_window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = liveness_window_s
        self._clock = clock
        self._last_progress = clock()
        self.model_ready = False
        self.joined = False
        self.broker_reachable = False
        # False while exactly-once transactions keep failing and the worker backs off before re-reading.
        self.publishing = True

    def progress(self) -> None:
        self._last_progress = self._clock()

    def live(self) -> bool:
        return self._clock() - self._last_progress <= self._window

    def ready(self) -> bool:
        return self.model_ready and self.joined and self.broker_reachable and self.publishing

    def describe(self) -> str:
        return (
            f"model_ready={self.model_ready} joined={self.joined} broker_reachable={self.broker_reachable} "
            f"publishing={self.publishing}"
        )


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, on a daemon thread."""

    def __init__(self, port: int, health: Health, registry: CollectorRegistry, host: str = "0.0.0.0") -> None:  # noqa: S104
        handler = _handler(health, registry)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(health: Health, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.live()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"main loop stalled\n")
            elif path == "/readyz":
                ok = health.ready()
                self._reply(200 if ok else 503, (health.describe() + "\n").encode())
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - probes every few seconds: no access log
            return

    return Handler
