"""Moderation in the running worker: rule sets per scope, decisions counted per scope, score drift."""

from __future__ import annotations

from collections import Counter

import orjson

from filter_worker.config import RoutingSettings
from filter_worker.exit_codes import ExitCode
from filter_worker.model import Classifier
from filter_worker.pipeline.drift import reference_of
from filter_worker.pipeline.routing import Router
from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)
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


def test_drift_index_crosses_0_2_on_shifted_traffic_and_not_on_traffic_like_the_reference(
    bootstrap_servers, keyword_model, classifier: Classifier, tmp_path
):
    calm = [f"an ordinary message number {i}" for i in range(300)]
    router = Router(RoutingSettings(), classifier.labels)
    probs, _ = classifier.classify(calm)
    scored = router.rule_scores(probs, "default")
    rules = router.rules("default")
    reference = reference_of(
        classifier.identity,
        "calm",
        {"default": {rule: (labels, scored[:, i]) for i, (rule, labels) in enumerate(rules.items())}},
    )
    path = tmp_path / "reference.json"
    path.write_bytes(orjson.dumps(reference.to_json()))
    settings = worker_settings(bootstrap_servers, str(keyword_model), drift={"reference": str(path), "window": 100})
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]

    def index() -> float:
        value = registry.get_sample_value("filter_score_psi", {"scope": "default", "rule": "negative"})
        assert value is not None, "no index once the window is full"
        return value

    with worker_thread(settings, classifier) as (worker, codes, _):
        registry = worker.metrics.registry
        like = produce(
            bootstrap_servers, topic, [orjson.dumps({"text": f"another ordinary one {i}"}) for i in range(150)]
        )
        wait_for_commits(settings, end_offsets(like))
        unshifted = index()
        shifted = produce(
            bootstrap_servers, topic, [orjson.dumps({"text": f"so annoying and broken {i}"}) for i in range(150)]
        )
        wait_for_commits(settings, end_offsets(like + shifted))
        after_shift = index()
    assert codes == [ExitCode.OK]
    print(f"drift index: {unshifted:.3f} on traffic like the reference, {after_shift:.3f} after the shift")
    assert unshifted < 0.2 < after_shift
