"""Random review sampling in the running worker: drawn records reach the review topic with their output.

The draw is a hash of the record's source, so the test knows which records must be drawn; a record
counts as acknowledged (and its offset may be committed) only once both its output and its copy for
review are, in both modes. Exactly-once outputs are judged as read_committed consumers see them.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from filter_worker.exit_codes import ExitCode
from filter_worker.pipeline.sampling import draw
from tests.integration.committed_log import read_committed_outputs, read_topics
from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_all_outputs,
    texts,
    wait_for_commits,
    worker_settings,
)
from tests.integration.worker_thread import worker_thread


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_drawn_records_reach_the_review_topic_with_their_output_and_how_they_were_drawn(
    bootstrap_servers, keyword_model, classifier, exactly_once
):
    rate = 0.3
    extra: dict[str, object] = {"review": {"rate": rate}, "topics__create": True}
    if exactly_once:
        extra |= {"kafka__exactly_once": True, "kafka__transactional_id": f"t-{uuid.uuid4().hex[:8]}"}
    settings = worker_settings(bootstrap_servers, str(keyword_model), **extra)
    prefix = settings.topics.input[0].removesuffix(".in")
    settings = settings.model_copy(update={"review": settings.review.model_copy(update={"topic": f"{prefix}.review"})})
    create_topics(settings, input_partitions=2)  # the review topic is created by the worker
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(300))
    with worker_thread(settings, classifier) as (worker, codes, _):
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
        counted = worker.metrics.registry.get_sample_value("filter_review_records_total", {"result": "published"})
    assert codes == [ExitCode.OK]
    sources = {f"{settings.topics.input[0]}/{p.partition}/{p.offset}": p for p in produced}
    expected = {source for source in sources if draw(source) < rate}
    assert 0.2 * len(produced) < len(expected) < 0.4 * len(produced)

    outputs = read_committed_outputs(settings).committed if exactly_once else read_all_outputs(settings)
    reviews = read_topics(bootstrap_servers, [settings.review.topic])  # plain records count as committed
    assert not reviews.open
    review_records = reviews.committed
    assert Counter(o.source for o in outputs) == Counter((p.partition, p.offset) for p in produced)
    drawn = Counter(o.headers["filter.source"].decode() for o in review_records)
    assert set(drawn) == expected and max(drawn.values()) == 1, "each drawn record once, no other"
    assert counted == len(expected)
    by_source = {f"{settings.topics.input[0]}/{o.source[0]}/{o.source[1]}": o for o in outputs}
    for review in review_records:
        source = review.headers["filter.source"].decode()
        routed = by_source[source]
        assert review.value == routed.value and review.key == routed.key
        assert review.headers["filter.action"] == routed.headers["filter.action"]
        assert review.headers["filter.sampled"] == b"true"
        assert float(review.headers["filter.sample-probability"]) == rate
