"""The secrets this process knows, kept out of everything it writes: log lines, error messages.

Secrets are registered where they are read (``config.load_settings``), not by each command: a
command added later cannot forget to. Every log event passes ``redact_event`` (a structlog
processor), which covers librdkafka's own lines, exceptions and messages built from client
errors, whichever code logs them. Removal is by value, so a secret is hidden wherever it appears,
inside a longer message too.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

MASK = "***"
# Shorter values are not looked for: "1" or "all" would be masked inside ordinary words.
MIN_LENGTH = 3
_known: set[str] = set()


def register(values: Iterable[str]) -> None:
    """Remember secrets; registered once, a secret stays masked for the life of the process."""
    _known.update(v for v in values if len(v) >= MIN_LENGTH)


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``***`` (longest first, so none is left half-masked)."""
    for secret in sorted((s for s in _known if s in text), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redacted(item) for item in value)
    return value


def redact_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: every string in the event, nested ones included, with secrets masked."""
    if not _known:
        return event
    return {key: _redacted(value) for key, value in event.items()}
