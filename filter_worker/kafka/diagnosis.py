"""Why Kafka does not answer at start-up, from what librdkafka says, and whether waiting can help.

A service that starts before its broker must wait for it, but some causes never heal by waiting: a
broker name that does not resolve (a typo), a certificate the client cannot trust, credentials the
broker refuses. Before this, all of them looked alike ("waiting for Kafka ... Broker transport
failure" every 10 s) while the real cause sat in librdkafka's queue unread.

This module is pure: it is fed librdkafka's error callbacks and log lines with the time they were
served, and answers two questions. ``due``: which causes to log now (each distinct one at once, then
at most every ``repeat_s`` with the count of repeats in between). ``stop``: whether start-up must end,
with one sentence naming the problem and the setting to fix, and the exit code.

What stops, and when:

- at once: the broker's certificate cannot be verified (unknown CA, another host name, expired),
  authentication is refused (or the SASL mechanism is not offered);
- after ``window_s`` of nothing else: a name that does not resolve, a broker that closes every TLS
  connection after the handshake (it wants a client certificate it accepts), a broker that closes
  every plain-text connection at its first request (it speaks TLS), a TLS client whose every
  handshake is reset or never answered (the listener speaks plain text: Apache Kafka resets the
  connection, librdkafka then asks "connecting to a PLAINTEXT broker listener?"; a broker that waits
  for the rest of what it took for a request lets the handshake time out after
  ``socket.connection.setup.timeout.ms``, 30 s);
- never: connections refused or timing out, anything else. A broker that is not up yet looks like
  that, and it is waited for.

Any event of a cause that can heal (a refused connection) means some address resolved and some
broker answered at the TCP level, so the window stops counting towards a stop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from filter_worker.config import KafkaSettings
from filter_worker.exit_codes import ExitCode

RESOLVE = "resolve"
UNTRUSTED = "tls_untrusted"
AUTHENTICATION = "authentication"
TLS_CLOSED = "tls_closed"
WANTS_TLS = "wants_tls"
WANTS_PLAINTEXT = "wants_plaintext"
UNREACHABLE = "unreachable"

_AT_ONCE = frozenset({UNTRUSTED, AUTHENTICATION})
_AFTER_WINDOW = frozenset({RESOLVE, TLS_CLOSED, WANTS_TLS, WANTS_PLAINTEXT})

# "[thrd:ssl://h:9093/bootstrap]: ssl://h:9093/bootstrap: <what> (after 3ms in state SSL_HANDSHAKE, 2 identical ...)"
_LINE = re.compile(
    r"^(?:\[thrd:[^\]]*\]: )?(?:(?P<broker>[^\s:]+(?::\d+)?|\w+://[^\s/]+)(?:/(?:bootstrap|\d+))?: )?(?P<what>.*?)"
    r"(?: \(after \d+ms in state (?P<state>\w+)(?:, \d+ identical error\(s\) suppressed)?\))?$"
)
_CLOSED = re.compile(r"(connection closed by peer|connection reset by peer)", re.IGNORECASE)
_SCHEME = re.compile(r"^\w+://")
_SASL_REFUSED = re.compile(r"SASL .*(authentication|handshake failed)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Cause:
    """One distinct reason Kafka did not answer: its kind, the broker, and librdkafka's words."""

    kind: str
    broker: str
    text: str


@dataclass(frozen=True, slots=True)
class Report:
    """A cause to log now, and how often it recurred since it was last logged."""

    cause: Cause
    repeats: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Start-up must end: ``message`` is one sentence for the operator, ``code`` the process exit code."""

    message: str
    code: ExitCode = ExitCode.CONFIG


@dataclass(slots=True)
class _Seen:
    first: float
    last: float
    logged: float | None = None
    unlogged: int = 0


def classify(text: str, tls: bool, code: str | None = None) -> Cause | None:
    """librdkafka's words about one failed attempt -> a ``Cause``; None for lines that are no failure."""
    match = _LINE.match(text.strip())
    if match is None:  # the pattern's every part is optional: only a non-string could miss
        return None
    what, state = match["what"], match["state"]
    broker = _SCHEME.sub("", match["broker"] or "")
    if "brokers are down" in what:  # a summary of the others, not a cause of its own
        return None
    lowered = what.lower()
    if "failed to resolve" in lowered or code == "_RESOLVE":
        kind = RESOLVE
    elif "certificate verify failed" in lowered:
        kind = UNTRUSTED
    elif code == "_AUTHENTICATION" or _SASL_REFUSED.search(what):
        kind = AUTHENTICATION
    elif state == "APIVERSION_QUERY" and (_CLOSED.search(what) or "ssl connection closed" in lowered):
        kind = TLS_CLOSED if tls else WANTS_TLS
    elif tls and state == "SSL_HANDSHAKE" and (_CLOSED.search(what) or "timed out" in lowered):
        kind = WANTS_PLAINTEXT
    else:
        kind = UNREACHABLE
    return Cause(kind, broker, what)


class KafkaDiagnosis:
    """See the module docstring. ``started`` is when start-up began waiting for Kafka."""

    def __init__(
        self,
        kafka: KafkaSettings,
        started: float,
        window_s: float = 60.0,
        repeat_s: float = 30.0,
        explain_certificate: Callable[[str], str | None] | None = None,
    ) -> None:
        self._kafka = kafka
        self._tls = kafka.security_protocol.endswith("SSL")
        self._started = started
        self._window_s = window_s
        self._repeat_s = repeat_s
        self._explain = explain_certificate
        self._seen: dict[Cause, _Seen] = {}
        self._healable_since_start = False
        self._reached = False

    # -- what librdkafka says -----------------------------------------------------------------

    def error(self, now: float, code: str, text: str) -> Cause | None:
        """An ``error_cb`` event: its code's name (``KafkaError.name()``, e.g. ``_RESOLVE``) and text."""
        return self._observe(now, classify(text, self._tls, code))

    def log_line(self, now: float, facility: str, text: str) -> Cause | None:
        """A librdkafka log line; only failures (facility ``FAIL``) can be causes."""
        return self._observe(now, classify(text, self._tls) if facility == "FAIL" else None)

    def reached(self) -> None:
        """Kafka answered: start-up goes on, and nothing seen before stops it."""
        self._reached = True
        self._seen.clear()

    def _observe(self, now: float, cause: Cause | None) -> Cause | None:
        if cause is None or self._reached:
            return None
        seen = self._seen.get(cause)
        if seen is None:
            seen = self._seen[cause] = _Seen(now, now)
        seen.last = now
        seen.unlogged += 1
        if cause.kind not in _AT_ONCE and cause.kind not in _AFTER_WINDOW:
            self._healable_since_start = True
        return cause

    # -- the answers --------------------------------------------------------------------------

    def due(self, now: float) -> list[Report]:
        """Causes to log now: new ones at once, known ones at most every ``repeat_s`` (with their repeats)."""
        reports = []
        for cause, seen in self._seen.items():
            if seen.unlogged and (seen.logged is None or now - seen.logged >= self._repeat_s):
                reports.append(Report(cause, seen.unlogged - 1 if seen.logged is None else seen.unlogged))
                seen.logged, seen.unlogged = now, 0
        return reports

    def stop(self, now: float) -> Stop | None:
        """Whether start-up must end now, and why; None while waiting can still help."""
        if self._reached or not self._seen:
            return None
        latest = max(self._seen, key=lambda cause: self._seen[cause].last)
        for cause in sorted(self._seen, key=lambda c: self._seen[c].first):
            if cause.kind in _AT_ONCE:
                return self._stop(cause)
        if self._healable_since_start or now - self._started < self._window_s:
            return None
        return self._stop(latest)

    def _stop(self, cause: Cause) -> Stop:
        kafka = self._kafka
        where = cause.broker or kafka.bootstrap_servers
        waited = f"for {self._window_s:.0f} s"
        if cause.kind == RESOLVE:
            host = where.rsplit(":", 1)[0]
            return Stop(
                f"Kafka cannot be reached: the broker name {host!r} did not resolve {waited} ({cause.text}); check "
                f"FILTER_KAFKA__BOOTSTRAP_SERVERS={kafka.bootstrap_servers}"
            )
        if cause.kind == UNTRUSTED:
            detail = self._explain(where) if self._explain is not None else None
            return Stop(_untrusted(where, detail, kafka))
        if cause.kind == AUTHENTICATION:
            password = "FILTER_KAFKA__SASL_PASSWORD (or FILTER_KAFKA__SASL_PASSWORD_FILE)"
            return Stop(
                f"the broker at {where} refused authentication ({cause.text}); check FILTER_KAFKA__SASL_USERNAME, "
                f"{password} and FILTER_KAFKA__SASL_MECHANISM={kafka.sasl_mechanism}"
            )
        if cause.kind == TLS_CLOSED:
            if kafka.ssl_certificate_location is None:
                fix = "it most likely requires a client certificate: set FILTER_KAFKA__SSL_CERTIFICATE_LOCATION and "
                fix += "FILTER_KAFKA__SSL_KEY_LOCATION"
            else:
                fix = "it most likely does not accept the client certificate in FILTER_KAFKA__SSL_CERTIFICATE_LOCATION "
                fix += "(not signed by a CA it trusts, or expired)"
            return Stop(f"the broker at {where} closed every TLS connection right after the handshake {waited}: {fix}")
        if cause.kind == WANTS_PLAINTEXT:
            return Stop(
                f"the broker at {where} completed no TLS handshake {waited} ({cause.text}): it most likely listens "
                f"for plain text, but FILTER_KAFKA__SECURITY_PROTOCOL is {kafka.security_protocol} (use PLAINTEXT or "
                "SASL_PLAINTEXT, or the port of the broker's TLS listener in FILTER_KAFKA__BOOTSTRAP_SERVERS)"
            )
        return Stop(
            f"the broker at {where} closed every connection at its first request {waited}: it most likely expects "
            f"TLS, but FILTER_KAFKA__SECURITY_PROTOCOL is {kafka.security_protocol} (use SSL or SASL_SSL)"
        )


def _untrusted(broker: str, detail: str | None, kafka: KafkaSettings) -> str:
    """The sentence for a broker certificate that failed verification; ``detail`` is OpenSSL's reason when known."""
    ca = (
        f"FILTER_KAFKA__SSL_CA_LOCATION={kafka.ssl_ca_location}"
        if kafka.ssl_ca_location is not None
        else "FILTER_KAFKA__SSL_CA_LOCATION (unset: the system's CA store is used)"
    )
    reason = detail or "certificate verify failed"
    lowered = reason.lower()
    if "expired" in lowered:
        fix = "the broker's certificate has expired: renew it on the broker"
    elif "hostname" in lowered or "ip address mismatch" in lowered:
        host = broker.rsplit(":", 1)[0]
        fix = (
            f"the certificate is not valid for {host!r}: FILTER_KAFKA__BOOTSTRAP_SERVERS (and the broker's advertised "
            "listeners) must use a name the certificate lists"
        )
    else:
        fix = f"it is not signed by a CA in {ca}"
    return f"the certificate of the broker at {broker} cannot be trusted ({reason}): {fix}"
