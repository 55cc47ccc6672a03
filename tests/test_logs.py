"""librdkafka's log lines reach structlog, and a line repeated during an outage is rate-limited."""

from __future__ import annotations

import logging

from structlog.testing import capture_logs

from filter_worker.logs import _LibrdkafkaHandler


def _record(text: str, level: int = logging.ERROR) -> logging.LogRecord:
    # confluent-kafka logs as logger.log(level, "%s [%s] %s", facility, client name, text).
    return logging.LogRecord("x", level, __file__, 1, "%s [%s] %s", ("FAIL", "rdkafka#consumer-1", text), None)


def test_repeats_within_the_interval_are_counted_not_logged():
    now = [0.0]
    handler = _LibrdkafkaHandler(interval_s=30.0, clock=lambda: now[0])
    refused = "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"
    with capture_logs() as logs:
        for _ in range(20):
            handler.emit(_record(refused))
            now[0] += 0.05
        handler.emit(_record("another line", logging.INFO))
        now[0] = 31.0
        handler.emit(_record(refused))
    assert [(e["message"], e["repeats"], e["log_level"]) for e in logs] == [
        (refused, 0, "warning"),
        ("another line", 0, "info"),
        (refused, 19, "warning"),
    ]
    assert logs[0]["facility"] == "FAIL" and logs[0]["client"] == "rdkafka#consumer-1"


def test_lines_that_differ_only_in_librdkafkas_timing_suffix_are_one_line():
    # A typo'd broker name: librdkafka retried the name hundreds of times a second, each line ending in
    # its own "(after Nms in state ...)", and every one of them got through as a distinct line.
    now = [0.0]
    handler = _LibrdkafkaHandler(interval_s=30.0, clock=lambda: now[0])
    cause = "locahost:9092/bootstrap: Failed to resolve 'locahost:9092': Name or service not known"
    suffixes = [
        "(after 0ms in state CONNECT)",
        "(after 3ms in state CONNECT)",
        "(after 1ms in state CONNECT, 4 identical error(s) suppressed)",
    ]
    with capture_logs() as logs:
        for i in range(300):
            handler.emit(_record(f"[thrd:locahost:9092/bootstrap]: {cause} {suffixes[i % 3]}"))
            now[0] += 0.002
    assert len(logs) == 1 and cause in logs[0]["message"]
