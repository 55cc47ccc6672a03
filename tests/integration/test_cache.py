"""With the decision cache on, repeats are routed exactly as the model routes them, and every offset is committed."""

from __future__ import annotations

import orjson

from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    wait_for_commits,
    worker_settings,
)

# A campaign: the same texts over and over, some with changed spacing, among unique ones. (Spacing
# does not change WordPiece tokens, so the model's action per text is known; case would, with this
# cased model, and the cache then answers with the first variant's probabilities, as documented.)
CAMPAIGN = {"you are an idiot": "drop", "this is annoying": "quarantine", "a wonderful day": "allow"}
VARIANTS = (str, lambda t: "  " + t.replace(" ", "   ") + "\n")


def test_repeats_are_routed_like_their_first_copy_and_all_offsets_commit(
    bootstrap_servers, keyword_model, running_worker
):
    settings = worker_settings(bootstrap_servers, str(keyword_model), cache={"size": 100})
    create_topics(settings, input_partitions=3)
    values: list[bytes | None] = []
    expected: list[str] = []
    for i in range(600):
        if i % 3 == 0:
            values.append(orjson.dumps({"text": f"meeting number {i} moved"}))
            expected.append("allow")
        else:
            text = list(CAMPAIGN)[i % len(CAMPAIGN)]
            values.append(orjson.dumps({"text": VARIANTS[i % len(VARIANTS)](text)}))
            expected.append(CAMPAIGN[text])
    values.append(b"not json")  # dead letters still flow past the cache
    expected.append("dead_letter")
    produced = produce(bootstrap_servers, settings.topics.input[0], values)

    with running_worker(settings) as worker:
        outputs = read_outputs(settings, expected=len(produced))
        committed = wait_for_commits(settings, end_offsets(produced))
        registry = worker.metrics.registry
        hits = registry.get_sample_value("filter_cache_records_total", {"result": "hit"})
        misses = registry.get_sample_value("filter_cache_records_total", {"result": "miss"})

    sources = [o.source for o in outputs]
    assert len(sources) == len(set(sources)) == len(produced), "every record exactly once"
    assert committed == end_offsets(produced)
    prefix = settings.topics.allow.rsplit(".", 1)[0]
    topic_of = {"allow": "allow", "quarantine": "quarantine", "drop": "drop", "dead_letter": "dlq"}
    for out in outputs:
        want = expected[int(out.key.decode()[1:])]
        assert out.topic == f"{prefix}.{topic_of[want]}", (out.value, out.headers)
        if want != "dead_letter":
            assert out.headers["filter.action"].decode() == want
    assert hits is not None and hits > 300
    assert hits + misses == len(produced) - 1
