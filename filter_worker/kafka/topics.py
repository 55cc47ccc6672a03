"""Start-up topic checks: the inputs exist, the outputs exist or are created, their size limits agree.

A missing input is a typo or the wrong cluster, never created; a missing output is created only when
``FILTER_TOPICS__CREATE=true``. Either failure is exit 4, naming the topics and the settings to check.
"""

from __future__ import annotations

from confluent_kafka.admin import AdminClient

from filter_worker.config import Settings
from filter_worker.exit_codes import ExitCode, FatalError
from filter_worker.kafka import clients
from filter_worker.kafka.clients import SizeLimits
from filter_worker.logs import get_logger

log = get_logger("filter_worker.kafka.topics")


def output_topics(settings: Settings) -> set[str]:
    """Every topic the worker writes: the four outputs, and the review topic when sampling is on (random
    review, or the candidate's disagreements)."""
    outputs = set(settings.topics.outputs().values())
    if settings.review.enabled or (settings.candidate.name is not None and settings.candidate.sample_rate > 0):
        outputs.add(settings.review.topic)
    return outputs


def prepare_topics(admin: AdminClient, settings: Settings, existing: dict[str, int]) -> SizeLimits:
    """Check (or create) the topics given the cluster's ``existing`` ones (name -> partitions); their size limits.

    Logs ``record size limits differ`` when an input takes records some output would refuse.
    """
    topics = settings.topics
    inputs = [t for t in topics.input if not t.startswith("^")]  # a regex subscription may match later
    missing_inputs = [t for t in inputs if t not in existing]
    if missing_inputs:
        raise FatalError(
            f"input topic(s) {missing_inputs} do not exist on {settings.kafka.bootstrap_servers} "
            "(check FILTER_TOPICS__INPUT and FILTER_KAFKA__BOOTSTRAP_SERVERS)",
            ExitCode.TOPICS,
        )
    outputs = output_topics(settings)
    missing = sorted(outputs - set(existing))
    if missing and not topics.create:
        raise FatalError(
            f"output topic(s) {missing} do not exist; create them or set FILTER_TOPICS__CREATE=true", ExitCode.TOPICS
        )
    if missing:
        partitions = max((existing[t] for t in inputs), default=1)
        try:
            clients.create_topics(admin, missing, partitions)
        except RuntimeError as exc:
            raise FatalError(str(exc), ExitCode.TOPICS) from None
        log.info("created output topics", topics=missing, partitions=partitions)
    limits = clients.size_limits(admin, [*inputs, *outputs], clients.producer_max_bytes(settings.kafka))
    for mismatch in limits.mismatches(topics, outputs):
        log.warning("record size limits differ", detail=mismatch)
    return limits
