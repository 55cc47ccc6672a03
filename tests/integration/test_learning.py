"""From live traffic to a trained model: verdicts and the judged records read from real topics.

A worker decides the records (and draws some for random review); a reviewer's verdict is published
for each quarantined, dropped and drawn record, with the record's decision headers as the review tool
copies them; ``model train --from-feedback TOPIC --texts TOPIC ...`` then joins the verdicts with the
records' texts on ``filter.source``, holds out a part of the randomly drawn verdicts, and writes a
model that every command loads.
"""

from __future__ import annotations

import orjson
from confluent_kafka import Producer

from filter_worker.cli import main
from filter_worker.exit_codes import ExitCode
from filter_worker.model.lockfile import read_lock, verify_directory
from filter_worker.moderation.verdicts import DECISION_HEADERS
from filter_worker.pipeline.sampling import PROBABILITY_HEADER, RULE_SCORES_HEADER, SAMPLED_HEADER
from tests.integration.committed_log import read_topics
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


def test_model_train_learns_from_verdicts_on_live_topics(
    bootstrap_servers, keyword_model, tiny_model, classifier, tmp_path, monkeypatch
):
    settings = worker_settings(bootstrap_servers, str(keyword_model), review={"rate": 0.3}, topics__create=True)
    prefix = settings.topics.input[0].removesuffix(".in")
    settings = settings.model_copy(update={"review": settings.review.model_copy(update={"topic": f"{prefix}.review"})})
    create_topics(settings, input_partitions=2)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(300))
    with worker_thread(settings, classifier) as (_, codes, _thread):
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
    assert codes == [ExitCode.OK]
    taken = [o for o in read_all_outputs(settings) if o.headers["filter.action"] != b"allow"]
    drawn = read_topics(bootstrap_servers, [settings.review.topic]).committed
    assert taken and drawn

    # The reviewers: abuse exactly when the text is hostile; the review tool copies the decision headers.
    verdict_topic = f"{prefix}.verdicts"
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    copied = (*DECISION_HEADERS, SAMPLED_HEADER, PROBABILITY_HEADER, RULE_SCORES_HEADER)
    judged: dict[str, bool] = {}
    for record in [*taken, *drawn]:
        source = record.headers["filter.source"].decode()
        judged[source] = b"idiot" in record.value
        value = {"source": source, "verdict": "abuse" if judged[source] else "ok", "reviewer": "r"}
        headers = [(k, v) for k, v in record.header_list if k in copied]
        producer.produce(verdict_topic, value=orjson.dumps(value), headers=headers)
    assert producer.flush(30) == 0

    monkeypatch.setenv("FILTER_KAFKA__BOOTSTRAP_SERVERS", bootstrap_servers)
    out = tmp_path / "learned"
    text_topics = [settings.topics.quarantine, settings.topics.drop, settings.review.topic]
    args = ["--from-feedback", verdict_topic, *(x for t in text_topics for x in ("--texts", t))]
    assert main(["model", "train", *args, "--base", str(tiny_model), "--to", str(out), "--min-examples", "5"]) == 0
    card = orjson.loads((out / "training.json").read_bytes())
    data = card["data"]
    assert data["examples"] == len(judged) and data["skipped"] == {}
    abuse = sum(judged.values())
    assert data["train_per_label"]["abuse"] + data["held_out_per_label"]["abuse"] == abuse
    assert data["train_per_label"]["ok"] + data["held_out_per_label"]["ok"] == len(judged) - abuse
    assert "drawn at random for review" in card["split"]["held_out"]
    drawn_abuse = sum(b"idiot" in r.value for r in drawn)
    assert data["held_out_per_label"]["abuse"] == max(1, round(0.2 * drawn_abuse))  # from the drawn ones only
    assert verify_directory(out, read_lock(out)) == []
