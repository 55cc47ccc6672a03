"""A rule reload re-checks auto's choice: where it disagrees, the worker routes with float32 from then on."""

from __future__ import annotations

import threading
import time

import numpy as np
import orjson

from filter_worker.config import ModelSettings, RoutingSettings, Rule
from filter_worker.model import precision
from filter_worker.model.capabilities import Engine
from filter_worker.model.classifier import Classifier
from filter_worker.model.precision_cache import Measured, Measurement
from filter_worker.pipeline.routing import Router
from filter_worker.service.worker import Worker
from tests.integration.kafka_helpers import create_topics, produce, read_outputs, worker_settings


def _rows(very_negative: list[float], labels: list[str]) -> np.ndarray:
    p = np.zeros((len(very_negative), len(labels)), dtype=np.float32)
    p[:, labels.index("Very Negative")] = very_negative
    p[:, labels.index("Neutral")] = 1.0 - p[:, labels.index("Very Negative")]
    return p


def _model_info(worker: Worker) -> dict[str, str]:
    for metric in worker.metrics.registry.collect():
        if metric.name == "filter_model":
            return dict(metric.samples[0].labels)
    raise AssertionError("no filter_model_info")


def test_a_reload_that_makes_the_choice_disagree_switches_the_running_worker_to_float32(
    bootstrap_servers, keyword_model
):
    loose = Rule(action="quarantine", labels=["Very Negative"], min_score=0.9, name="loose")
    strict = Rule(action="quarantine", labels=["Very Negative"], min_score=0.75, name="strict")
    settings = worker_settings(bootstrap_servers, str(keyword_model), routing={"rules": [loose.model_dump()]})
    create_topics(settings, input_partitions=1)
    model = ModelSettings(name=str(keyword_model))
    classifier = Classifier.load(model.model_copy(update={"dtype": "bfloat16"}))
    labels = classifier.labels
    # The check set as if measured: bfloat16 put 10 of 200 records at 0.8 where float32 had 0.5.
    reference = Measured(precision.REFERENCE, _rows([0.5] * 200, labels), 100.0, 1.0)
    bf16 = Measured(Engine("torch", "bfloat16"), _rows([0.5] * 190 + [0.8] * 10, labels), 300.0, 3.0)
    measurement = Measurement("k" * 64, frozenset({"amx_bf16"}), reference, [bf16], 1.0)
    choice = precision.choose(measurement, Router(settings.routing, classifier.head))
    assert choice.engine == bf16.engine, "under the start-up rules bfloat16 agrees"
    chosen = precision.Precision(classifier, "auto", choice, model)

    worker = Worker(settings, classifier, reload_routing=lambda: RoutingSettings(rules=[strict]), precision=chosen)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        topic = settings.topics.input[0]
        produce(bootstrap_servers, topic, [orjson.dumps({"text": "you idiot"})])
        read_outputs(settings, expected=1, settle_s=0)
        assert _model_info(worker)["dtype"] == "bfloat16" and _model_info(worker)["precision_source"] == "auto"

        worker.request_reload()
        deadline = time.monotonic() + 60
        while _model_info(worker)["precision_source"] != "fallback":
            assert time.monotonic() < deadline, "the reload's re-check did not switch to float32 within 60 s"
            time.sleep(0.05)
        produce(bootstrap_servers, topic, [orjson.dumps({"text": "you idiot again"})])
        outputs = read_outputs(settings, expected=2)
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert codes == [0]
    info = _model_info(worker)
    assert (info["dtype"], info["backend"], info["precision_source"]) == ("float32", "torch", "fallback")
    assert classifier.dtype == "float32"
    rules = {orjson.loads(o.value)["text"]: o.headers["filter.rule"].decode() for o in outputs}
    assert rules == {"you idiot": "loose", "you idiot again": "strict"}, "the new rules apply after the switch"
