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
