"""FILTER_MODEL__STREAMS=2 on the real broker: two passes in the model at once, every record decided once,
as one pass at a time decides it."""

from __future__ import annotations

import orjson
import pytest
import torch

from filter_worker.config import ModelSettings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.classifier import Classifier
from filter_worker.pipeline.routing import Router
from tests.integration.kafka_helpers import (
    create_topics,
    end_offsets,
    produce,
    read_outputs,
    texts,
    wait_for_commits,
    worker_settings,
)
from tests.integration.worker_thread import worker_thread

pytest.importorskip("openvino", reason="the openvino extra is not installed")


def test_two_streams_decide_every_record_once_as_one_pass_at_a_time_does(bootstrap_servers, keyword_model, classifier):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # one thread per stream
    try:
        model = ModelSettings(name=str(keyword_model), backend="openvino", dtype="float32", streams=2)
        streams = Classifier.load(model)
    finally:
        torch.set_num_threads(threads)
    assert streams.streams == 2
    settings = worker_settings(bootstrap_servers, str(keyword_model), batch={"max_size": 4, "max_wait_ms": 5})
    create_topics(settings, input_partitions=2)
    values = texts(80)
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with worker_thread(settings, streams) as (worker, codes, _thread):
        outputs = read_outputs(settings, expected=len(values))
        wait_for_commits(settings, end_offsets(produced))
        passes = worker.metrics.registry.get_sample_value("filter_batch_size_count")
    assert codes == [ExitCode.OK]
    assert sorted(o.source for o in outputs) == sorted((p.partition, p.offset) for p in produced), "each once"
    # What one torch float32 pass at a time decides for the same texts.
    router = Router(settings.routing, classifier.head)
    scores, _ = classifier.classify([orjson.loads(p.value or b"")["text"] for p in produced])
    topics = settings.topics.outputs()
    expected = {(p.partition, p.offset): topics[router.decide(scores[i]).action] for i, p in enumerate(produced)}
    assert {o.source: o.topic for o in outputs} == expected
    assert passes and passes >= len(values) / 4
