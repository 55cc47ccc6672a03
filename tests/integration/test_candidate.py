"""A candidate model in shadow in the running worker: compared on live traffic, never acted on.

The live model drops or quarantines the hostile records; the candidate's rules allow everything,
so every hostile record is a drop->allow or quarantine->allow disagreement, and the test knows which
of them the salted source hash draws for review. The outputs must be the live decisions, each record
once; the review topic must hold exactly the drawn disagreements, once each, with both decisions in
their headers. Exactly-once outputs are judged as read_committed consumers see them.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from filter_worker.config import ModelSettings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.candidate import ACTION_HEADER, MODEL_HEADER, PAIRS
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
def test_a_candidate_is_compared_on_live_traffic_and_its_disagreements_sampled_for_review(
    bootstrap_servers, keyword_model, classifier, exactly_once
):
    rate = 0.5
    candidate_settings = {"name": str(keyword_model), "routing": {"rules": []}, "sample_rate": rate}
    extra: dict[str, object] = {"candidate": candidate_settings, "topics__create": True}
    if exactly_once:
        extra |= {"kafka__exactly_once": True, "kafka__transactional_id": f"t-{uuid.uuid4().hex[:8]}"}
    settings = worker_settings(bootstrap_servers, str(keyword_model), **extra)
    prefix = settings.topics.input[0].removesuffix(".in")
    settings = settings.model_copy(update={"review": settings.review.model_copy(update={"topic": f"{prefix}.review"})})
    create_topics(settings, input_partitions=2)  # the review topic is created by the worker
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(300))
    candidate = Classifier.load(ModelSettings(name=str(keyword_model)))
    with worker_thread(settings, classifier, candidate) as (worker, codes, _):
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
        value = worker.metrics.registry.get_sample_value
        pairs = {p: value("filter_candidate_disagreements_total", {"pair": p}) for p in PAIRS}
        copies = value("filter_candidate_review_copies_total")
        compared = value("filter_candidate_records_total")
    assert codes == [ExitCode.OK]
    topic = settings.topics.input[0]
    hostile = {f"{topic}/{p.partition}/{p.offset}" for p in produced if b"idiot" in p.value}
    expected = {source for source in hostile if draw("candidate/" + source) < rate}
    assert 0.3 * len(hostile) < len(expected) < 0.7 * len(hostile)

    outputs = read_committed_outputs(settings).committed if exactly_once else read_all_outputs(settings)
    assert Counter(o.source for o in outputs) == Counter((p.partition, p.offset) for p in produced)
    by_source = {f"{topic}/{o.source[0]}/{o.source[1]}": o for o in outputs}
    taken = {s for s, o in by_source.items() if o.headers["filter.action"] != b"allow"}
    assert taken == hostile  # the live decisions were published, not the candidate's
    reviews = read_topics(bootstrap_servers, [settings.review.topic])
    assert not reviews.open
    drawn = Counter(o.headers["filter.source"].decode() for o in reviews.committed)
    assert set(drawn) == expected and max(drawn.values()) == 1, "each drawn disagreement once, no other"
    for review in reviews.committed:
        assert (
            review.headers["filter.action"]
            == by_source[review.headers["filter.source"].decode()].headers["filter.action"]
        )
        assert review.headers[ACTION_HEADER] == b"allow"
        assert review.headers[MODEL_HEADER] == candidate.identity.encode()
    # Counted as decided: at least every record once (a batch decided again after an abort counts again).
    live_actions = Counter(by_source[s].headers["filter.action"].decode() for s in hostile)
    assert {p for p, n in pairs.items() if n} == {f"{a}->allow" for a in live_actions}
    for action, count in live_actions.items():
        assert pairs[f"{action}->allow"] >= count
    assert compared is not None and compared >= len(produced)
    assert copies is not None and copies >= len(expected)
