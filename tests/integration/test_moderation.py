"""Moderation in the running worker: rule sets per scope, decisions counted per scope, score drift."""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np
import orjson

from filter_worker.config import RoutingSettings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.classifier import Classifier
from filter_worker.moderation.drift import reference_of
from filter_worker.pipeline.routing import Router
from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import wait_until
from tests.integration.worker_thread import worker_thread

SCOPES = [
    {
        "name": "kids",
        "match": {"header": "tenant", "values": ["kids-app"]},
        "rules": [{"action": "drop", "labels": ["Very Negative", "Negative"], "min_score": 0.5, "name": "strict"}],
    },
    {
        "name": "de",
        "match": {"field": "meta.lang", "values": ["de"]},
        "rules": [{"action": "allow", "labels": ["Negative"], "min_score": 0.5, "name": "lenient"}],
    },
]


def test_scopes_pick_the_rules_by_header_and_field_and_are_counted_per_scope(
    bootstrap_servers, keyword_model, classifier
):
    settings = worker_settings(bootstrap_servers, str(keyword_model), routing={"scopes": SCOPES})
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]
    annoying = orjson.dumps({"text": "this is annoying"})
    kids = produce(bootstrap_servers, topic, [annoying] * 3, headers=[("tenant", b"kids-app")], key_prefix="kids")
    german = produce(
        bootstrap_servers, topic, [orjson.dumps({"text": "annoying", "meta": {"lang": "de"}})] * 4, key_prefix="de"
    )
    other = produce(bootstrap_servers, topic, [annoying] * 5, headers=[("tenant", b"adults")], key_prefix="x")
    produced = kids + german + other
    with worker_thread(settings, classifier) as (worker, codes, _):
        outputs = read_outputs(settings, expected=len(produced))
        wait_for_commits(settings, end_offsets(produced))
        registry = worker.metrics.registry
        counted = {
            (scope, action, rule): registry.get_sample_value(
                "filter_decisions_total", {"scope": scope, "action": action, "rule": rule}
            )
            for scope, action, rule in [
                ("kids", "drop", "strict"),
                ("de", "allow", "lenient"),
                ("default", "quarantine", "negative"),
            ]
        }
    assert codes == [ExitCode.OK]
    by_scope = Counter(
        (o.headers["filter.scope"], o.headers["filter.action"], o.headers["filter.rule"], o.topic) for o in outputs
    )
    assert by_scope == {
        (b"kids", b"drop", b"strict", settings.topics.drop): 3,
        (b"de", b"allow", b"lenient", settings.topics.allow): 4,
        (b"default", b"quarantine", b"negative", settings.topics.quarantine): 5,
    }
    assert counted == {
        ("kids", "drop", "strict"): 3,
        ("de", "allow", "lenient"): 4,
        ("default", "quarantine", "negative"): 5,
    }


def test_a_topic_scope_takes_what_is_read_from_its_topic_whatever_the_sender_writes(
    bootstrap_servers, keyword_model, classifier
):
    """The kids' app writes to its own input topic: its scope matches there, and a sender on the general
    topic cannot pick it (or escape into a laxer one) by setting a header or a field."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    kids_topic = f"{prefix}.kids"
    scopes = [
        {
            "name": "kids",
            "match": {"topics": [kids_topic]},
            "rules": [{"action": "drop", "labels": ["Very Negative", "Negative"], "min_score": 0.5, "name": "strict"}],
        }
    ]
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        partitions_topic_prefix=prefix,
        topics__input=[f"{prefix}.in", kids_topic],
        routing={"scopes": scopes},
    )
    create_topics(settings, input_partitions=1)
    annoying = orjson.dumps({"text": "this is annoying", "topic": kids_topic})
    kids = produce(bootstrap_servers, kids_topic, [annoying] * 3, key_prefix="kids")
    other = produce(bootstrap_servers, f"{prefix}.in", [annoying] * 4, headers=[("topic", kids_topic.encode())])
    with worker_thread(settings, classifier) as (_, codes, _):
        outputs = read_outputs(settings, expected=7)
        wait_for_commits(settings, end_offsets(kids + other))
    assert codes == [ExitCode.OK]
    by_scope = Counter((o.headers["filter.scope"], o.headers["filter.action"], o.topic) for o in outputs)
    assert by_scope == {
        (b"kids", b"drop", settings.topics.drop): 3,
        (b"default", b"quarantine", settings.topics.quarantine): 4,
    }


def mixed_texts(seed: int, count: int, hostile: float) -> list[str]:
    """Messages of 2 to 30 words, a share ``hostile`` of them with a keyword: the keyword model scores
    each by its share of keyword tokens, so two draws of this generator give two samples of one score
    distribution, not the same scores."""
    rng = np.random.default_rng(seed)
    filler = ["the", "meeting", "is", "at", "noon", "see", "you", "there", "ordinary", "message", "today"]
    texts = []
    for i in range(count):
        words = list(rng.choice(filler, size=int(rng.integers(2, 31))))
        if rng.random() < hostile:
            words.insert(int(rng.integers(0, len(words))), str(rng.choice(["idiot", "annoying", "broken", "loser"])))
        texts.append(f"{' '.join(words)} {i}")
    return texts


def test_drift_index_crosses_0_2_on_shifted_traffic_and_stays_low_but_not_zero_on_traffic_like_the_reference(
    bootstrap_servers, keyword_model, classifier: Classifier, tmp_path
):
    """The reference and the unshifted traffic are two draws of one generator (a deterministic model on
    the same texts would make the unshifted index trivially 0); the shifted traffic has three times the
    hostile messages."""
    # A low threshold for the quarantine rule: the keyword model rarely scores one hostile word among up
    # to 30 ordinary ones above 0.75, so at the default the take rates (1 % and 3 %) are too small for
    # 500 records to tell apart; at 0.2 they are about 4.5 % and 17 %.
    routing_rules = [
        {"action": "drop", "labels": ["Very Negative"], "min_score": 0.9, "name": "very-negative"},
        {"action": "quarantine", "labels": ["Very Negative", "Negative"], "min_score": 0.2, "name": "negative"},
    ]
    router = Router(RoutingSettings(rules=routing_rules), classifier.head)
    probs, _ = classifier.classify(mixed_texts(1, 1200, hostile=0.2))
    scored = router.rule_scores(probs, "default")
    rules = router.rules("default")
    reference = reference_of(
        classifier.identity,
        "mixed",
        {"default": {rule: (labels, scored[:, i]) for i, (rule, labels) in enumerate(rules.items())}},
    )
    path = tmp_path / "reference.json"
    path.write_bytes(orjson.dumps(reference.to_json()))
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        drift={"reference": str(path), "window": 500},
        routing={"rules": routing_rules},
    )
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]

    def index() -> float:
        value = registry.get_sample_value("filter_score_psi", {"scope": "default", "rule": "negative"})
        assert value is not None, "no index once the window is full"
        return value

    def take_rate_z() -> float:
        value = registry.get_sample_value("filter_take_rate_zscore", {"scope": "default", "rule": "negative"})
        assert value is not None, "no take rate once the window is full"
        return value

    def scored() -> float | None:
        return registry.get_sample_value("filter_rule_score_count", {"scope": "default", "rule": "negative"})

    with worker_thread(settings, classifier) as (worker, codes, _):
        registry = worker.metrics.registry
        like = produce(bootstrap_servers, topic, [orjson.dumps({"text": t}) for t in mixed_texts(2, 600, hostile=0.2)])
        wait_for_commits(settings, end_offsets(like))
        wait_until(lambda: scored() == 600, what="600 records' scores in the histograms and the index")
        unshifted, unshifted_z = index(), take_rate_z()
        shifted = produce(
            bootstrap_servers, topic, [orjson.dumps({"text": t}) for t in mixed_texts(3, 600, hostile=0.6)]
        )
        wait_for_commits(settings, end_offsets(like + shifted))
        wait_until(lambda: scored() == 1200, what="1200 records' scores in the histograms and the index")
        after_shift, shifted_z = index(), take_rate_z()
    assert codes == [ExitCode.OK]
    print(f"drift index: {unshifted:.3f} on traffic like the reference, {after_shift:.3f} after the shift")
    print(f"take-rate z of rule negative: {unshifted_z:.1f} like the reference, {shifted_z:.1f} after the shift")
    assert 0.0 < unshifted < 0.1 < 0.2 < after_shift
    assert abs(unshifted_z) < 4 < shifted_z, "the take rate seen by the worker, against the reference's"
