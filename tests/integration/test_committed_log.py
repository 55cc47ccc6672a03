"""The test-side read_committed reader resolves the embedded broker's transaction markers."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer

from tests.integration.committed_log import read_committed_outputs, read_partition
from tests.integration.kafka_helpers import create_topics, worker_settings


def test_aborted_and_open_transactions_are_told_from_committed_ones(bootstrap_servers, keyword_model):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=1)
    topic = settings.topics.allow
    plain = Producer({"bootstrap.servers": bootstrap_servers})
    plain.produce(topic, value=b"plain-1")
    plain.flush(10)
    txn = Producer({"bootstrap.servers": bootstrap_servers, "transactional.id": f"t-{uuid.uuid4().hex}"})
    txn.init_transactions(10)
    for outcome, values in (("commit", [b"c1", b"c2"]), ("abort", [b"a1", b"a2", b"a3"]), ("commit", [b"c3"])):
        txn.begin_transaction()
        for value in values:
            txn.produce(topic, value=value)
        txn.flush(10)
        (txn.commit_transaction if outcome == "commit" else txn.abort_transaction)(10)
    txn.begin_transaction()
    txn.produce(topic, value=b"still-open")
    txn.flush(10)
    plain.produce(topic, value=b"plain-2")
    plain.flush(10)

    log = read_partition(bootstrap_servers, topic, 0)
    assert sorted(o.value for o in log.committed) == [b"c1", b"c2", b"c3", b"plain-1", b"plain-2"]
    assert sorted(o.value for o in log.aborted) == [b"a1", b"a2", b"a3"]
    assert [o.value for o in log.open] == [b"still-open"]
    assert log.markers == {"commit": 2, "abort": 1}
    assert len(read_committed_outputs(settings).committed) == 5
    txn.abort_transaction(10)
