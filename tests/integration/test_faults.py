"""Faults against the real broker: Kafka missing or gone, topics missing, records refused, bad deploys.

Each test asserts what the README promises for that fault: nothing is committed past a record whose
output the broker has not acknowledged, the worker says what happened, and it exits with the code
that tells an orchestrator whether a restart helps.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import orjson
import pytest
from structlog.testing import capture_logs

from filter_worker.exit_codes import ExitCode
from filter_worker.service import worker as worker_module
from filter_worker.tools.broker import EmbeddedBroker, free_port
from tests.integration.classifiers import FailingClassifier, SlowClassifier
from tests.integration.faulty_producers import CommitFailsOnce, NonIdempotentProducer
from tests.integration.kafka_helpers import (
    committed_offsets,
    create_topics,
    end_offsets,
    produce,
    read_all_outputs,
    read_outputs,
    texts,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import wait_until
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.worker_thread import worker_thread

needs_own_broker = pytest.mark.skipif(
    bool(os.environ.get("FILTER_TEST_BOOTSTRAP_SERVERS")), reason="stops and starts its own embedded broker"
)


@needs_own_broker
def test_worker_started_before_kafka_waits_then_works(keyword_model, classifier):
    broker = EmbeddedBroker().start()
    # The worker bootstraps through a proxy that is down: to it, Kafka does not exist yet. (Metadata
    # then points it at the broker itself, so the proxy only gates the start.)
    proxy = TcpProxy(free_port(), broker.port)
    try:
        settings = worker_settings(broker.bootstrap_servers, str(keyword_model))
        create_topics(settings, input_partitions=2)
        produced = produce(broker.bootstrap_servers, settings.topics.input[0], texts(200))
        via_proxy = settings.model_copy(deep=True)
        via_proxy.kafka.bootstrap_servers = f"127.0.0.1:{proxy.listen_port}"
        with capture_logs() as logs, worker_thread(via_proxy, classifier) as (worker, codes, _):
            time.sleep(5)  # metadata attempts fail meanwhile
            assert not codes, "the worker must wait for Kafka, not exit"
            assert worker.health.live() and not worker.health.ready()
            assert any(e["event"] == "waiting for Kafka" for e in logs)

            proxy.up()
            outputs = read_outputs(settings, expected=len(produced))
            committed = wait_for_commits(settings, end_offsets(produced))
            assert worker.health.ready()
        assert codes == [ExitCode.OK]
        assert {o.source for o in outputs} == {(p.partition, p.offset) for p in produced}
        assert committed == end_offsets(produced)
    finally:
        proxy.down()
        broker.stop()


@needs_own_broker
def test_network_outage_mid_stream_keeps_the_loop_turning_and_loses_nothing(keyword_model, classifier):
    """The broker goes away with records buffered, in the model and awaiting acknowledgement.

    Commits are asynchronous: a synchronous one waits for the group coordinator (6 s a try, measured),
    and the loop, its heartbeats and its liveness would stall with it.
    """
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    proxy = TcpProxy(broker.advertised_port, broker.port).up()
    try:
        settings = worker_settings(
            broker.bootstrap_servers,
            str(keyword_model),
            batch={"max_size": 8, "max_wait_ms": 5},
            health={"liveness_window_s": 2},
            kafka__commit_interval_ms=1000,
        )
        create_topics(settings, input_partitions=3)
        produced = produce(broker.bootstrap_servers, settings.topics.input[0], texts(900))
        slow = SlowClassifier(classifier, seconds=0.03)  # about 3.5 s of work: the cut lands mid-stream
        with capture_logs() as logs, worker_thread(settings, slow) as (worker, codes, _):  # type: ignore[arg-type]
            registry = worker.metrics.registry
            wait_until(lambda: (registry.get_sample_value("filter_commits_total") or 0) >= 1, 30, "a first commit")
            proxy.down()
            in_flight = registry.get_sample_value("filter_in_flight_records")
            live = []
            until = time.monotonic() + 8
            while time.monotonic() < until:
                live.append(worker.health.live())
                time.sleep(0.05)
            assert not worker.health.ready()
            assert any("unreachable" in e["event"] for e in logs), [e["event"] for e in logs]
            assert not codes, "the worker must ride out the outage, not exit"

            proxy.up()
            # Commits first: a committed offset means every output below it was acknowledged. Read the
            # other way round, the repeats of the outage could make up the expected count early.
            committed = wait_for_commits(settings, end_offsets(produced), timeout_s=60)
            outputs = read_outputs(settings, expected=len(produced))
            wait_until(worker.health.ready, 30, "readiness after the outage")
        assert in_flight and in_flight > 0, "records were in flight when the broker went away"
        assert all(live), "the loop stalled during the outage"
        assert codes == [ExitCode.OK]
        assert {o.source for o in outputs} == {(p.partition, p.offset) for p in produced}
        assert committed == end_offsets(produced)
    finally:
        proxy.down()
        broker.stop()


@needs_own_broker
def test_broker_replaced_on_the_same_port(keyword_model, classifier, monkeypatch):
    """The broker process dies and a new one (empty: memory storage) takes its port.

    The new broker has forgotten every producer id. librdkafka's idempotent producer then retries
    forever on UNKNOWN_PRODUCER_ID (seen with debug=eos), so this worker's producer runs without
    idempotence (a test seam: the settings refuse it); the docs tell operators to restart workers
    after a cluster lost its state.
    """
    monkeypatch.setattr(worker_module, "Producer", NonIdempotentProducer)
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    settings = worker_settings(broker.bootstrap_servers, str(keyword_model))
    try:
        create_topics(settings, input_partitions=2)
        first = produce(broker.bootstrap_servers, settings.topics.input[0], texts(200))
        with capture_logs() as logs, worker_thread(settings, classifier) as (worker, codes, _):
            read_outputs(settings, expected=len(first))
            wait_for_commits(settings, end_offsets(first))

            broker.stop()
            wait_until(lambda: not worker.health.ready(), 30, "readiness to drop while the broker is gone")
            time.sleep(2)
            assert not codes and worker.health.live()
            assert any("unreachable" in e["event"] for e in logs)

            broker = EmbeddedBroker(port=port).start()
            create_topics(settings, input_partitions=2)
            second = produce(broker.bootstrap_servers, settings.topics.input[0], texts(200))
            outputs = read_outputs(settings, expected=len(second), timeout_s=180)
            committed = wait_for_commits(settings, end_offsets(second), timeout_s=60)
        assert codes == [ExitCode.OK]
        assert {o.source for o in outputs} >= {(p.partition, p.offset) for p in second}
        assert committed == end_offsets(second)
    finally:
        broker.stop()


def test_missing_topics_stop_start_up_unless_creation_is_asked_for(bootstrap_servers, keyword_model, classifier):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    with capture_logs() as logs, worker_thread(settings, classifier) as (_, codes, thread):
        thread.join(30)
    assert codes == [ExitCode.TOPICS]
    assert any(settings.topics.input[0] in e.get("error", "") for e in logs)

    create_topics(settings, input_partitions=2)
    missing_output = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        topics={**settings.topics.model_dump(), "drop": settings.topics.drop + "x"},
    )
    with capture_logs() as logs, worker_thread(missing_output, classifier) as (_, codes, thread):
        thread.join(30)
    assert codes == [ExitCode.TOPICS]
    assert any("FILTER_TOPICS__CREATE" in e.get("error", "") for e in logs)

    creating = worker_settings(
        bootstrap_servers, str(keyword_model), topics={**missing_output.topics.model_dump(), "create": True}
    )
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(50))
    with worker_thread(creating, classifier) as (_, codes, _thread):
        outputs = read_outputs(creating, expected=len(produced))
        wait_for_commits(creating, end_offsets(produced))
    assert codes == [ExitCode.OK]
    assert {o.topic for o in outputs if o.headers["filter.action"] == b"drop"} == {creating.topics.drop}


def test_refused_output_falls_back_to_its_dead_letter_then_to_one_cut_to_fit(
    bootstrap_servers, keyword_model, classifier
):
    """librdkafka refuses records over message.max.bytes; embedding makes the output bigger than the input."""
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        output={"embed": True},
        kafka__producer_properties={"message.max.bytes": "2000"},
        kafka__commit_interval_ms=100,
    )
    create_topics(settings, input_partitions=1)
    fits = orjson.dumps({"text": "short and fine"})
    grows_too_big = orjson.dumps({"text": "fine " * 300})  # ~1.5 KB in, over 2 KB once embedded
    too_big = orjson.dumps({"text": "fine " * 500})  # over 2 KB even as a dead letter
    values = [fits, grows_too_big, fits, too_big, fits]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)

    with worker_thread(settings, classifier) as (_, codes, _thread):
        outputs = read_outputs(settings, expected=len(values))
        committed = wait_for_commits(settings, end_offsets(produced))
    assert codes == [ExitCode.OK]
    assert committed == end_offsets(produced)
    by_offset = {o.source[1]: o for o in outputs}
    assert [by_offset[i].topic for i in (0, 2, 4)] == [settings.topics.allow] * 3
    assert by_offset[1].topic == settings.topics.dead_letter
    assert by_offset[1].headers["filter.error"] == b"publish_rejected"
    assert b"too large" in by_offset[1].headers["filter.reason"].lower()
    assert by_offset[1].value == grows_too_big, "a dead letter that fits carries the original value"
    assert "filter.value" not in by_offset[1].headers
    assert by_offset[3].topic == settings.topics.dead_letter
    assert by_offset[3].headers["filter.value"] == b"cut"
    assert by_offset[3].headers["filter.original-size"] == str(len(too_big)).encode()
    assert too_big.startswith(by_offset[3].value) and len(by_offset[3].value) < len(too_big)


def test_dead_letter_limit_stops_a_bad_deploy_and_leaves_the_run_uncommitted(
    bootstrap_servers, keyword_model, classifier
):
    # The "bad deploy": the worker reads field "body", but after two records the producers send "text".
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        message={"text_field": "body"},
        dead_letter={"max_consecutive": 20},
    )
    create_topics(settings, input_partitions=1)
    with capture_logs() as logs, worker_thread(settings, classifier) as (_, codes, thread):
        produce(bootstrap_servers, settings.topics.input[0], [orjson.dumps({"body": t}) for t in ("fine", "idiot")])
        read_outputs(settings, expected=2, settle_s=0)
        produce(bootstrap_servers, settings.topics.input[0], [orjson.dumps({"text": f"fine {i}"}) for i in range(60)])
        thread.join(60)
    assert codes == [ExitCode.DEAD_LETTER_LIMIT]
    assert any("FILTER_DEAD_LETTER__MAX_CONSECUTIVE=20" in e.get("error", "") for e in logs)
    outputs = read_all_outputs(settings)
    assert len(outputs) == 2, "the failing run's dead letters were held back: none published"
    # The run of failures is not committed: once the deploy is fixed, it is classified for real.
    assert committed_offsets(settings, partitions=1)[0] == 2


def test_huge_values_are_truncated_or_dead_lettered_and_the_stream_flows(
    bootstrap_servers, keyword_model, running_worker
):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=1)
    huge_text = orjson.dumps({"text": "idiot " + "word " * 100_000})  # ~500 KB, far past 512 tokens
    huge_garbage = b"\x00not json" * 50_000
    values = [huge_text, huge_garbage, *texts(20)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with running_worker(settings):
        outputs = read_outputs(settings, expected=len(produced))
        wait_for_commits(settings, end_offsets(produced))
    by_offset = {o.source[1]: o for o in outputs}
    assert by_offset[0].topic != settings.topics.dead_letter, "a huge text is classified, not dead-lettered"
    assert by_offset[0].headers["filter.label"]
    assert by_offset[0].headers["filter.truncated"] == b"true"
    assert by_offset[0].value == huge_text
    assert by_offset[1].topic == settings.topics.dead_letter
    assert by_offset[1].headers["filter.error"] == b"invalid_json"
    assert len(by_offset) == len(produced)


def test_slow_model_pauses_input_without_eviction_and_bounds_memory(bootstrap_servers, keyword_model, classifier):
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        batch={"max_size": 4, "max_wait_ms": 5},
        kafka__max_poll_interval_ms=6000,  # far shorter than the whole run: a blocked loop would be evicted
    )
    create_topics(settings, input_partitions=2)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(800))
    slow = SlowClassifier(classifier, seconds=0.05)  # 200 batches: 10 s of model time
    bound = settings.batch.max_size * 32
    peaks: list[int] = [0]
    with worker_thread(settings, slow) as (worker, codes, thread):  # type: ignore[arg-type]

        def sample() -> None:
            while thread.is_alive():
                running = worker._running  # noqa: SLF001 - the bound under test
                peaks.append(max(peaks[-1], running.classify.buffered if running is not None else 0))
                time.sleep(0.005)

        threading.Thread(target=sample, daemon=True).start()
        committed = wait_for_commits(settings, end_offsets(produced), timeout_s=120)
        rebalances = {
            s.labels["kind"]: s.value
            for m in worker.metrics.rebalances.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
    peak = peaks[-1]
    assert committed == end_offsets(produced)
    assert codes == [ExitCode.OK]
    assert 0 < peak <= bound + settings.batch.max_size, f"buffer peaked at {peak}, bound {bound}"
    assert rebalances.get("lost", 0) == 0 and rebalances.get("revoke", 0) == 0, rebalances


def test_model_failure_isolates_the_failing_record_and_the_worker_goes_on(bootstrap_servers, keyword_model, classifier):
    settings = worker_settings(bootstrap_servers, str(keyword_model), batch={"max_size": 16, "max_wait_ms": 50})
    create_topics(settings, input_partitions=1)
    poison_id = classifier.tokenize(["loser"])[0].ids[1]  # [CLS] loser [SEP]
    values = texts(40)
    values[17] = orjson.dumps({"text": "what a loser"})
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with worker_thread(settings, FailingClassifier(classifier, poison_id)) as (_, codes, _thread):  # type: ignore[arg-type]
        outputs = read_outputs(settings, expected=len(produced))
        committed = wait_for_commits(settings, end_offsets(produced))
    assert codes == [ExitCode.OK]
    assert committed == end_offsets(produced)
    by_offset = {o.source[1]: o for o in outputs}
    assert len(by_offset) == len(produced) == len(outputs)
    assert by_offset[17].topic == settings.topics.dead_letter
    assert by_offset[17].headers["filter.error"] == b"model_error"
    assert b"out of memory" in by_offset[17].headers["filter.reason"]
    assert all(o.topic != settings.topics.dead_letter for off, o in by_offset.items() if off != 17)


def test_shutdown_deadline_exits_6_and_leaves_unfinished_work_uncommitted(bootstrap_servers, keyword_model, classifier):
    settings = worker_settings(
        bootstrap_servers, str(keyword_model), batch={"max_size": 4, "max_wait_ms": 5}, shutdown_timeout_s=0.5
    )
    create_topics(settings, input_partitions=1)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(40))
    slow = SlowClassifier(classifier, seconds=3.0)  # one batch outlives the deadline
    with worker_thread(settings, slow) as (worker, codes, thread):  # type: ignore[arg-type]
        in_model = lambda: worker._running is not None and worker._running.classify.in_model  # noqa: E731, SLF001
        wait_until(in_model, 30, "a batch in the model")
        worker.stop()
        thread.join(30)
    assert codes == [ExitCode.SHUTDOWN_DEADLINE]
    committed = committed_offsets(settings, partitions=1)[0]
    assert committed < produced[-1].offset + 1, "records still in the model at the deadline are not committed"


def test_abortable_transaction_error_aborts_and_rereads_from_the_committed_offsets(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        kafka__exactly_once=True,
        kafka__transactional_id=f"abort-{uuid.uuid4().hex[:8]}",
    )
    create_topics(settings, input_partitions=2)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(300))
    monkeypatch.setattr(CommitFailsOnce, "failed", [])
    monkeypatch.setattr(worker_module, "Producer", CommitFailsOnce)
    with capture_logs() as logs, worker_thread(settings, classifier) as (worker, codes, _):
        committed = wait_for_commits(settings, end_offsets(produced))
        outputs = read_outputs(settings, expected=len(produced))
        failures = worker.metrics.registry.get_sample_value("filter_commit_failures_total")
    assert codes == [ExitCode.OK]
    assert CommitFailsOnce.failed and CommitFailsOnce.failed[0] > 0, "the first transaction carried records"
    assert failures == 1
    assert any(e["event"].startswith("transaction aborted; re-reading from the last commit") for e in logs)
    assert committed == end_offsets(produced)
    counts = Counter(o.source for o in outputs)
    assert set(counts) == {(p.partition, p.offset) for p in produced}, "an input is missing from the outputs"
    repeats = sum(c - 1 for c in counts.values())
    if os.environ.get("FILTER_TEST_BOOTSTRAP_SERVERS"):
        assert repeats == 0, "read_committed readers must not see the aborted transaction"
    else:
        # Tansu may show an aborted transaction to read_committed readers: at most its records (fewer
        # when the abort purged some before they reached the broker), nothing else.
        assert repeats <= CommitFailsOnce.failed[0]
