"""Process exit codes: what an orchestrator (or the operator reading ``kubectl get pods``) learns.

Every non-zero code leaves offsets at the last record whose output the broker acknowledged, so a
restart resumes without losing anything; the codes say whether a restart can help.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # stopped on request, everything in the model finished, published and committed
    FAILED = 1  # runtime failure (a delivery failed for good, fatal client error, fenced); a restart resumes
    CONFIG = 2  # a setting is wrong; the message names it; a restart does not help
    MODEL = 3  # the model could not be loaded or verified
    TOPICS = 4  # an input topic is missing, or an output topic without FILTER_TOPICS__CREATE=true
    DEAD_LETTER_LIMIT = 5  # too many records failed: likely a bad deploy; the failing run stays uncommitted
    SHUTDOWN_DEADLINE = 6  # stopped on request, but FILTER_SHUTDOWN_TIMEOUT_S passed with work unfinished


class ModelLoadError(Exception):
    """The model could not be loaded (exit 3); the message says what to do about it."""


class FatalError(Exception):
    """Something the worker must not continue past; ``code`` is the process exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


class FailureSlot:
    """The first fatal error, kept for the loop to raise: callbacks (librdkafka's) must not raise through C.

    Write-once on purpose: a later error, or a recovery of something else (an aborted transaction),
    never hides the first fatal one.
    """

    def __init__(self) -> None:
        self.failure: FatalError | None = None

    def set(self, failure: FatalError) -> None:
        if self.failure is None:
            self.failure = failure

    def raise_if_set(self) -> None:
        if self.failure is not None:
            raise self.failure
