"""The shell around a Kafka service's loop, shared by ``run`` (the worker) and ``feedback``.

Both serve ``/metrics``, ``/healthz`` and ``/readyz``; wait for Kafka at start-up rather than
crash-looping (live but not ready meanwhile), saying at once why it does not answer and stopping
start-up when waiting cannot help (``kafka/startup.py``: a name that never resolves, an untrusted
certificate, refused credentials); notice when the broker goes and comes back; turn librdkafka's error
callbacks into health and a fatal error for the loop to raise; and take stop and reload requests from
signal handlers and the config-file watcher. The loop itself is each service's own.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ClusterMetadata
from prometheus_client import CollectorRegistry

from filter_worker.config import ConfigError, KafkaSettings
from filter_worker.exit_codes import FailureSlot, FatalError
from filter_worker.kafka.startup import StartupWatch, embedded_broker_hint
from filter_worker.logs import RateLimit, get_logger, repeated_line
from filter_worker.monitoring.health import Health, HealthServer
from filter_worker.service.config_watcher import ConfigWatcher
from filter_worker.service.signals import Requests

log = get_logger("filter_worker.service.shell")

# While waiting for Kafka at start-up: how long one metadata request may take, and how often to log.
METADATA_TIMEOUT_S = 2.0
WAITING_LOG_INTERVAL_S = 10.0
# While the broker is unreachable, how often to probe it (a metadata request) for readiness.
PROBE_INTERVAL_S = 2.0
# Client errors that are neither fatal nor "unreachable" (a name that does not resolve, a refused
# connection): each distinct one at most this often; librdkafka reports some hundreds of times a second.
CLIENT_ERROR_LOG_INTERVAL_S = 30.0
_UNREACHABLE = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT}


class MetadataSource(Protocol):
    """A Kafka client that answers metadata requests and serves its queue (a consumer before it subscribes)."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> ClusterMetadata: ...

    def poll(self, timeout: float = -1) -> object: ...


class ServiceShell:
    """See the module docstring. ``port_setting`` names the variable a busy port is reported under;
    ``requests`` are the stop and reload requests, when they were taken before the shell existed."""

    def __init__(
        self,
        health: Health,
        registry: CollectorRegistry,
        kafka: KafkaSettings,
        port: int | None,
        port_setting: str,
        clock: Callable[[], float] = time.monotonic,
        requests: Requests | None = None,
    ) -> None:
        self.health = health
        self._registry = registry
        self._kafka = kafka
        self._bootstrap = kafka.bootstrap_servers
        self._port = port
        self._port_setting = port_setting
        self._clock = clock
        self.failures = FailureSlot()
        self.requests = requests or Requests()
        self._http: HealthServer | None = None
        self._watch: StartupWatch | None = None  # while waiting for Kafka at start-up
        self._last_probe = clock()
        self._client_errors = RateLimit(CLIENT_ERROR_LOG_INTERVAL_S, clock)

    # -- requests from signal handlers and other threads -----------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self.requests.stop()

    @property
    def stopping(self) -> bool:
        return self.requests.stopping

    def request_reload(self) -> None:
        """Ask the loop to reload the routing settings; safe from signal handlers and other threads."""
        self.requests.request_reload()

    def reload_requested(self) -> bool:
        """Whether a reload was asked for since the last call (the request is taken)."""
        return self.requests.reload_requested()

    # -- the HTTP endpoint ------------------------------------------------------------------------

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def start_http(self) -> None:
        if self._port is None:
            return
        try:
            self._http = HealthServer(self._port, self.health, self._registry).start()
        except OSError as exc:
            raise ConfigError(f"{self._port_setting}={self._port}: {exc.strerror}") from None

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()

    # -- Kafka ------------------------------------------------------------------------------------

    def await_kafka(self, client: MetadataSource) -> ClusterMetadata | None:
        """The cluster's metadata once it answers; retried for as long as it takes, ``None`` if stopped meanwhile.

        A service started before its broker (compose, a cluster being restored) must not crash-loop:
        it waits, says so in the log, and stays live but not ready. What the client reports meanwhile
        (name resolution, refused connections, TLS, authentication) is logged at once and at a bounded
        rate; a cause waiting cannot heal stops start-up with one sentence (``FatalError``, exit 2).
        """
        started = self._clock()
        last_log = -WAITING_LOG_INTERVAL_S
        self._watch = watch = StartupWatch(self._kafka, self._clock)
        try:
            while not self.stopping:
                self.failures.raise_if_set()
                self.health.progress()
                try:
                    metadata = client.list_topics(timeout=METADATA_TIMEOUT_S)
                except KafkaException as exc:
                    client.poll(0.1)  # serves the client's errors and log lines: the watch hears them
                    watch.check()
                    if self._clock() - last_log >= WAITING_LOG_INTERVAL_S:
                        last_log = self._clock()
                        log.warning(
                            "waiting for Kafka",
                            bootstrap_servers=self._bootstrap,
                            waited_s=round(self._clock() - started, 1),
                            error=str(exc.args[0].str() if exc.args else exc),
                        )
                    continue
                if metadata.brokers:
                    self.health.broker_reachable = True
                    embedded_broker_hint(metadata, self._kafka)
                    return metadata
            return None
        finally:
            self._watch = None
            watch.reached()

    def probe(self, client: MetadataSource) -> None:
        """While the broker looks unreachable, ask it for metadata now and then to notice its return."""
        if self.health.broker_reachable or self._clock() - self._last_probe < PROBE_INTERVAL_S:
            return
        self._last_probe = self._clock()
        try:
            client.list_topics(timeout=1.0)
        except KafkaException:
            return
        self.health.broker_reachable = True
        log.info("Kafka reachable again")

    def client_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb``: a fatal error stops the loop, an unreachable broker only makes it unready."""
        watch = self._watch
        if watch is not None:
            watch.error(err)
        if err.fatal():
            self.failures.set(FatalError(f"fatal Kafka client error: {err.str()}"))
            return
        if err.code() in _UNREACHABLE:
            if self.health.broker_reachable:
                log.error("Kafka unreachable; retrying, nothing is committed meanwhile", error=err.str())
            self.health.broker_reachable = False
            return
        repeats = self._client_errors.admit(f"{err.name()} {repeated_line(err.str())}")
        if repeats is not None:
            log.warning("kafka client error", code=err.name(), error=err.str(), repeats=repeats)


class Service(Protocol):
    """What ``serve`` runs: ``run`` blocks until stopped and returns an exit code."""

    def run(self) -> int: ...

    def stop(self) -> None: ...

    def request_reload(self) -> None: ...


def serve(service: Service, config_file: str | None, watcher: ConfigWatcher | None = None) -> int:
    """Run ``service`` until SIGTERM/SIGINT; SIGHUP, and changes to ``config_file``, reload its routing.

    ``watcher`` may be made (with this file's content as its baseline) before the settings are
    loaded, so an edit made while a model loads is still noticed.
    """

    def request_stop(_signum: int, _frame: Any) -> None:
        service.stop()

    def request_reload(_signum: int, _frame: Any) -> None:
        service.request_reload()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    if watcher is None and config_file is not None:
        watcher = ConfigWatcher(config_file, service.request_reload)
    if watcher is not None:
        watcher.start()
    try:
        return service.run()
    finally:
        if watcher is not None:
            watcher.stop()
