"""The start-up diagnosis (``diagnosis``) attached to live clients while a service waits for Kafka.

It hears what the pure diagnosis needs: every ``error_cb`` event (the service forwards them) and every
librdkafka log line (a handler of its own on the shared librdkafka logger, so it sees each line before
that logger's rate limit). ``check`` logs the causes that are due and raises ``FatalError`` with exit
code 2 when waiting cannot help. librdkafka delivers both only when a client's queue is served, so
the waiting loop must poll between its metadata requests: a loop that only asks for metadata left
"Failed to resolve" unread until shutdown.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from confluent_kafka import KafkaError
from confluent_kafka.admin import ClusterMetadata

from filter_worker.config import KafkaSettings
from filter_worker.exit_codes import FatalError
from filter_worker.kafka.diagnosis import KafkaDiagnosis
from filter_worker.logs import get_logger, librdkafka_logger
from filter_worker.security import tls

log = get_logger("filter_worker.kafka.startup")

# How long causes that may be passing (a name not in DNS yet, a broker restarting its listeners) are
# given before start-up stops: longer than a pod's DNS record takes to appear, shorter than the
# 10 minutes a Kubernetes startup probe allows.
WINDOW_S = 60.0
# How long the service waits before saying, once, what it tried and how to get a broker: a pod's broker
# often comes up within this, a person at a terminal should not watch "waiting for Kafka" scroll by.
HINT_AFTER_S = 15.0
_LOOPBACK = ("localhost", "127.", "[::1]", "::1")

# The embedded broker (Tansu) names its cluster so. It holds every JoinGroup answer for half the
# group's session timeout: with the default 45 s each start waits 23 s to join, with 6 s, 3 s
# (docs/development.md, "The embedded broker and the session timeout").
EMBEDDED_CLUSTER_ID = "tansu_cluster"
LOCAL_SESSION_TIMEOUT_MS = 6000


class _Lines(logging.Handler):
    """Every librdkafka line, as it is served, into the diagnosis."""

    def __init__(self, feed: Callable[[str, str], object]) -> None:
        super().__init__()
        self._feed = feed

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) and len(record.args) == 3 else None
        if args is not None:
            self._feed(str(args[0]), str(args[2]))


class StartupWatch:
    """From construction to ``reached``: what stops start-up, and what to log meanwhile."""

    def __init__(
        self, kafka: KafkaSettings, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S
    ) -> None:
        self._clock = clock
        self._bootstrap = kafka.bootstrap_servers
        self._hint_at: float | None = clock() + HINT_AFTER_S
        self._last_error = "no answer to a metadata request"
        self._diagnosis = KafkaDiagnosis(
            kafka,
            clock(),
            window_s,
            explain_certificate=lambda broker: tls.broker_certificate_problem(broker, kafka.ssl_ca_location),
        )
        self._lines: _Lines | None = _Lines(lambda facility, text: self._diagnosis.log_line(clock(), facility, text))
        librdkafka_logger().addHandler(self._lines)

    def error(self, err: KafkaError) -> None:
        """Forward from the service's ``error_cb``."""
        self._last_error = err.str()
        self._diagnosis.error(self._clock(), err.name(), err.str())

    def check(self) -> None:
        """Log what is due; raise ``FatalError`` (exit 2, one sentence) when waiting cannot help."""
        now = self._clock()
        for report in self._diagnosis.due(now):
            log.warning(
                "Kafka not reachable",
                cause=report.cause.kind,
                broker=report.cause.broker,
                error=report.cause.text,
                repeats=report.repeats,
            )
        if self._hint_at is not None and now >= self._hint_at:
            self._hint_at = None
            log.warning(
                "Kafka has not answered yet; still waiting",
                tried=self._bootstrap,
                waited_s=HINT_AFTER_S,
                error=self._last_error,
                hint=self._hint(),
            )
        stop = self._diagnosis.stop(now)
        if stop is not None:
            self.reached()  # stop listening: the process is on its way out
            raise FatalError(stop.message, stop.code)

    def _hint(self) -> str:
        servers = [s.strip() for s in self._bootstrap.split(",")]
        if all(s.startswith(_LOOPBACK) for s in servers):
            return (
                "no broker is running here; for a local try start the embedded one in another terminal with "
                "`filter-worker broker --topics` and set FILTER_KAFKA__BOOTSTRAP_SERVERS to the address it "
                "prints (see the README's 'Run it locally')"
            )
        return "check that the brokers in FILTER_KAFKA__BOOTSTRAP_SERVERS run and can be reached from here"

    def reached(self) -> None:
        """Kafka answered (or start-up ends): nothing seen so far stops the service, and the watch detaches."""
        self._diagnosis.reached()
        if self._lines is not None:
            librdkafka_logger().removeHandler(self._lines)
            self._lines = None


def embedded_broker_hint(metadata: ClusterMetadata, kafka: KafkaSettings) -> None:
    """Say once, on reaching the embedded broker with a long session timeout, why joining will be slow."""
    if metadata.cluster_id != EMBEDDED_CLUSTER_ID or kafka.session_timeout_ms <= LOCAL_SESSION_TIMEOUT_MS:
        return
    log.warning(
        "this is the embedded broker, which holds every group join for half the session timeout: joining will "
        f"take about {math.ceil(kafka.session_timeout_ms / 2000)} s; set FILTER_KAFKA__SESSION_TIMEOUT_MS="
        f"{LOCAL_SESSION_TIMEOUT_MS} before the group's first start (docs/development.md)",
        session_timeout_ms=kafka.session_timeout_ms,
    )
