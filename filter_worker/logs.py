"""structlog set-up: JSON lines for machines (containers), readable lines on a terminal."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable

import structlog

from filter_worker.config import LogSettings
from filter_worker.security import redaction

# What librdkafka appends to a line and changes at every repeat: "(after 3ms in state CONNECT)",
# ", 4 identical error(s) suppressed". Left in the key, every repeat was a new line: a name that does
# not resolve is retried hundreds of times a second, and each retry got through.
_TIMING = re.compile(r" \(after \d+ms in state \w+(?:, \d+ identical error\(s\) suppressed)?\)")


def configure(settings: LogSettings) -> None:
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redaction.redact_event,  # last before rendering: whatever was added, nothing secret leaves
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, settings.level)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """A logger on the ``sys.stderr`` of the moment: a command run in-process (tests capturing its output,
    an embedding application) may replace and close the stream it had when logging was configured."""
    return structlog.PrintLogger(sys.stderr)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


def repeated_line(text: str) -> str:
    """``text`` without what librdkafka changes at every repeat of the same line."""
    return _TIMING.sub("", text)


class RateLimit:
    """Each distinct key at most once per ``interval_s``; how many were held back rides on the next one."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """``None`` to hold this one back; else how many of this key were held back since the last admitted."""
        now = self._clock()
        if now - self._last.get(key, -self._interval_s) < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        if len(self._last) > 1000:  # distinct lines are few; this only bounds pathological cases
            self._last.clear()
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class _LibrdkafkaHandler(logging.Handler):
    """librdkafka's own log lines into structlog, each distinct line at most once per ``interval_s``.

    While a broker is down librdkafka logs every failed connect, about twenty lines a second, which
    would drown the worker's own "Kafka unreachable" line; repeats are counted instead and the count
    rides on the next line that gets through.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._limit = RateLimit(interval_s, clock)
        self._log = get_logger("librdkafka")

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) and len(record.args) == 3 else None
        facility, client, text = (str(a) for a in args) if args else ("", "", record.getMessage())
        repeats = self._limit.admit(f"{facility} {repeated_line(text)}")
        if repeats is None:
            return
        level = (
            "warning" if record.levelno >= logging.WARNING else "info" if record.levelno >= logging.INFO else "debug"
        )
        getattr(self._log, level)("librdkafka", facility=facility, client=client, message=text, repeats=repeats)


def librdkafka_logger(interval_s: float = 30.0) -> logging.Logger:
    """A stdlib logger for confluent-kafka's ``logger`` setting that forwards to structlog, rate-limited."""
    logger = logging.getLogger("filter_worker.librdkafka")
    if not logger.handlers:
        logger.addHandler(_LibrdkafkaHandler(interval_s))
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    return logger
