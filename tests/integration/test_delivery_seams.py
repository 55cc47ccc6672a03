"""The seams where revocation, stop and close meet the gate, the committer and the budget: one test per fault.

Each test is named after a fault a review found (issue 20 lists the triggers) and failed on the worker
before the lifecycle got one owner (``delivery/lifecycle.py``). Exactly-once outputs are judged as a
correct ``read_committed`` consumer would (``committed_log.py`` resolves the embedded broker's markers).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import orjson
import pytest
from confluent_kafka import KafkaError
from structlog.testing import capture_logs

from filter_worker.exit_codes import ExitCode
from filter_worker.service import worker as worker_module
from filter_worker.tools.broker import EmbeddedBroker, free_port
from tests.integration.classifiers import GatedClassifier, SlowClassifier
from tests.integration.committed_log import read_committed_outputs
from tests.integration.faulty_producers import CommitFailsOnce, RefusingProducer
from tests.integration.kafka_helpers import (
    Produced,
    committed_offsets,
    create_topics,
    end_offsets,
    produce,
    read_all_outputs,
    texts,
    wait_for_commits,
    worker_settings,
)
from tests.integration.processes import wait_until
from tests.integration.tcp_proxy import END_TXN, TcpProxy
from tests.integration.worker_thread import worker_thread

MODES = [pytest.param(False, id="at-least-once"), pytest.param(True, id="exactly-once")]


def exactly_once(**overrides: object) -> dict[str, object]:
    return {"kafka__exactly_once": True, "kafka__transactional_id": f"t-{uuid.uuid4().hex[:8]}", **overrides}


def sample(registry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def total(registry, name: str) -> float:
    """The sum of every series of a counter (all label values)."""
    return sum(s.value for metric in registry.collect() for s in metric.samples if s.name == name)


def assert_each_once(settings, produced: list[Produced]) -> Counter:
    """The committed outputs hold every produced record exactly once (as read_committed consumers see them)."""
    log = read_committed_outputs(settings)
    assert not log.open, f"{len(log.open)} outputs in a transaction that never ended"
    counts = Counter(o.source for o in log.committed)
    expected = {(p.partition, p.offset) for p in produced}
    missing = sorted(expected - set(counts))
    assert not missing, f"lost: {len(missing)} records never committed, first {missing[:8]}"
    repeated = sorted(k for k, n in counts.items() if n > 1)
    assert not repeated, f"committed twice: {repeated[:8]}"
    return counts


def wait_for_event(logs: list[dict], event: str, timeout_s: float = 30) -> None:
    wait_until(lambda: any(e["event"] == event for e in logs), timeout_s, f"the log line {event!r}")


# -- 1 ---------------------------------------------------------------------------------------------


def test_exactly_once_stop_past_its_deadline_loses_no_record(bootstrap_servers, keyword_model, classifier):
    """SIGTERM while a forward pass outlives FILTER_SHUTDOWN_TIMEOUT_S.

    Before: close aborted the open transaction, then the revocation inside consumer.close() began a new
    one with the pass that finished during the stop and committed the aborted transaction's offsets too.
    """
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        batch={"max_size": 4, "max_wait_ms": 5},
        shutdown_timeout_s=0.5,
        **exactly_once(kafka__commit_interval_ms=60_000),
    )
    create_topics(settings, input_partitions=1)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(24))
    gated = GatedClassifier(classifier)
    with capture_logs() as logs, worker_thread(settings, gated) as (worker, codes, thread):  # type: ignore[arg-type]
        gated.release(2)  # records 0-7 go into the open transaction, which nothing commits before the stop
        wait_until(lambda: gated.waiting >= 3, 30, "pass 3 to reach the model")
        running = worker._running  # noqa: SLF001 - which passes the stage holds
        wait_until(lambda: running is not None and running.classify.in_model == 2, 30, "pass 4 to be queued behind it")
        time.sleep(0.5)
        worker.stop()
        wait_for_event(logs, "stopping: finishing in-flight work")
        gated.release(1)  # pass 3 ends inside the stop; pass 4 outlives its deadline
        thread.join(30)
    gated.open()
    assert codes == [ExitCode.SHUTDOWN_DEADLINE]
    with worker_thread(settings, classifier) as (_, codes, _thread):
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
    assert codes == [ExitCode.OK]
    assert_each_once(settings, produced)


# -- 2 ---------------------------------------------------------------------------------------------


def _refuse_marked(settings, *markers: bytes):
    def refuse(topic: str, value: bytes | None) -> KafkaError | None:
        if topic != settings.topics.dead_letter and value and any(m in value for m in markers):
            return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
        return None

    return staticmethod(refuse)


def test_exactly_once_refusal_reported_inside_the_commit_is_replaced(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    """The refused record is in the last batch before catching up: its report arrives inside commit_transaction.

    Before: the report was handled after the abort had rewound, seen as stale and dropped, so no
    replacement was registered and every retry was refused again until FILTER_KAFKA__MAX_ABORTS.
    """
    settings = worker_settings(bootstrap_servers, str(keyword_model), **exactly_once())
    create_topics(settings, input_partitions=1)
    monkeypatch.setattr(RefusingProducer, "refuse", _refuse_marked(settings, b"refuse me"))
    monkeypatch.setattr(RefusingProducer, "refused", [])
    monkeypatch.setattr(worker_module, "Producer", RefusingProducer)
    produced = produce(bootstrap_servers, settings.topics.input[0], [*texts(20), orjson.dumps({"text": "refuse me"})])
    with worker_thread(settings, classifier) as (worker, codes, _):
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
        aborts = sample(worker.metrics.registry, "filter_transaction_aborts_total")
    assert codes == [ExitCode.OK]
    assert aborts == 1
    counts = assert_each_once(settings, produced)
    assert counts[(0, 20)] == 1
    letter = next(o for o in read_committed_outputs(settings).committed if o.source == (0, 20))
    assert letter.topic == settings.topics.dead_letter and letter.headers["filter.error"] == b"publish_rejected"


def test_exactly_once_two_refused_records_do_not_take_turns(bootstrap_servers, keyword_model, classifier, monkeypatch):
    """Two refused records in different transactions.

    Before: a replacement was forgotten once delivered, even when its transaction was then aborted for the
    other record, so the first came back unreplaced: aborts alternated until exit 1, nothing committed.
    """
    settings = worker_settings(bootstrap_servers, str(keyword_model), **exactly_once(kafka__commit_interval_ms=60_000))
    create_topics(settings, input_partitions=1)
    monkeypatch.setattr(RefusingProducer, "refuse", _refuse_marked(settings, b"refuse A", b"refuse B"))
    monkeypatch.setattr(RefusingProducer, "refused", [])
    monkeypatch.setattr(worker_module, "Producer", RefusingProducer)
    values = texts(400)
    values[5] = orjson.dumps({"text": "refuse A"})
    values[300] = orjson.dumps({"text": "refuse B"})
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    slow = SlowClassifier(classifier, seconds=0.02)  # record B's pass ends long after A's transaction aborted
    with worker_thread(settings, slow) as (worker, codes, _):  # type: ignore[arg-type]
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
        aborts = sample(worker.metrics.registry, "filter_transaction_aborts_total")
    assert codes == [ExitCode.OK]
    assert aborts == 2, "one abort per refused record, then both replacements commit together"
    assert_each_once(settings, produced)


# -- 3 ---------------------------------------------------------------------------------------------


def test_exactly_once_commit_timeout_is_resumed_not_fatal(keyword_model, classifier):
    """The broker stops answering the producer for longer than a transactional call may take (10 s).

    After a retriable commit_transaction error librdkafka refuses produce (_STATE) and
    send_offsets_to_transaction (_CONFLICT): only commit_transaction may be called again. Before, the
    worker re-sent offsets, never resumed the commit, and the next produce stopped it with exit 1.
    """
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    proxy = TcpProxy(broker.advertised_port, broker.port).up()
    try:
        settings = worker_settings(broker.bootstrap_servers, str(keyword_model), **exactly_once())
        create_topics(settings, input_partitions=1)
        first = produce(broker.bootstrap_servers, settings.topics.input[0], texts(50))
        with worker_thread(settings, classifier) as (worker, codes, _):
            wait_for_commits(settings, end_offsets(first))
            # The outputs are acknowledged and the offsets sent, then the transaction coordinator stops
            # answering: commit_transaction itself times out ("retry call to resume").
            proxy.stall("filter-worker-producer", api_keys={END_TXN})
            second = produce(broker.bootstrap_servers, settings.topics.input[0], texts(100, start=50))
            time.sleep(13)
            third = produce(broker.bootstrap_servers, settings.topics.input[0], texts(120, start=100))
            proxy.stall(None)
            wait_for_commits(settings, end_offsets(first + second + third), timeout_s=90)
            aborts = sample(worker.metrics.registry, "filter_transaction_aborts_total")
        assert codes == [ExitCode.OK]
        assert aborts == 0, "the commit was resumed, nothing aborted"
        assert_each_once(settings, first + second + third)
    finally:
        proxy.down()
        broker.stop()


# -- 4 ---------------------------------------------------------------------------------------------


def test_at_least_once_cache_answers_no_repeat_above_a_stop(bootstrap_servers, keyword_model, classifier):
    """A clean stop with the decision cache on and a repeat of an in-model text buffered above everything decided.

    Before: finishing the stop answered that repeat from the cache and published it above records the
    stop then abandoned; the commit stopped below them and the next owner published it again.
    """
    settings = worker_settings(
        bootstrap_servers, str(keyword_model), batch={"max_size": 4, "max_wait_ms": 5}, cache={"size": 1000}
    )
    create_topics(settings, input_partitions=1)
    values = texts(40)
    values[2] = values[30] = orjson.dumps({"text": "the same campaign text"})
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    gated = GatedClassifier(classifier)
    with capture_logs() as logs, worker_thread(settings, gated) as (worker, codes, thread):  # type: ignore[arg-type]
        wait_until(lambda: gated.waiting >= 1, 30, "the first pass to reach the model")
        consumed = lambda: sample(  # noqa: E731
            worker.metrics.registry, "filter_records_consumed_total", topic=settings.topics.input[0]
        )
        wait_until(lambda: consumed() == 40, 30, "every record to be consumed")
        worker.stop()
        wait_for_event(logs, "stopping: finishing in-flight work")
        gated.open()
        thread.join(30)
    assert codes == [ExitCode.OK]
    with worker_thread(settings, classifier) as (_, codes, _thread):
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
    assert codes == [ExitCode.OK]
    counts = Counter(o.source for o in read_all_outputs(settings))
    assert set(counts) == {(p.partition, p.offset) for p in produced}
    assert counts[(0, 30)] == 1, "the cached repeat was published twice"
    assert max(counts.values()) == 1


# -- 5 ---------------------------------------------------------------------------------------------


def test_exactly_once_graceful_stop_under_load_exits_0(bootstrap_servers, keyword_model, classifier):
    """Records buffered above every decided one are abandoned by design: not a missed deadline (exit 6)."""
    settings = worker_settings(
        bootstrap_servers, str(keyword_model), batch={"max_size": 8, "max_wait_ms": 5}, **exactly_once()
    )
    create_topics(settings, input_partitions=2)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(600))
    slow = SlowClassifier(classifier, seconds=0.05)
    with worker_thread(settings, slow) as (worker, codes, thread):  # type: ignore[arg-type]
        wait_until(lambda: sum(max(0, o) for o in committed_offsets(settings, 2).values()) > 40, 60, "commits")
        started = time.monotonic()
        worker.stop()
        thread.join(30)
        took = time.monotonic() - started
    assert codes == [ExitCode.OK], "a graceful stop under load is not a missed deadline"
    assert took < settings.shutdown_timeout_s
    assert sum(max(0, o) for o in committed_offsets(settings, 2).values()) < len(produced), "it stopped under load"
    with worker_thread(settings, classifier) as (_, codes, _thread):
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
    assert codes == [ExitCode.OK]
    assert_each_once(settings, produced)


# -- 6 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transactions", MODES)
def test_oversized_key_is_dead_lettered_without_it_and_its_partition_flows(
    bootstrap_servers, keyword_model, classifier, transactions
):
    """A 1.5 MB key: too large routed, as a dead letter, cut and with its value left out; the key must go too.

    Before: the last fallback kept the key, nothing came after it, and the worker exited 1 on every restart.
    """
    overrides = exactly_once() if transactions else {}
    settings = worker_settings(bootstrap_servers, str(keyword_model), **overrides)
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]
    before = produce(bootstrap_servers, topic, texts(5))
    big_key = b"k" * 1_500_000
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap_servers, "message.max.bytes": 3_000_000})
    producer.produce(topic, key=big_key, value=orjson.dumps({"text": "a fine text"}))
    assert producer.flush(30) == 0
    after = produce(bootstrap_servers, topic, texts(10, start=5))
    ends = {0: len(before) + 1 + len(after)}
    with worker_thread(settings, classifier) as (_, codes, _thread):
        wait_for_commits(settings, ends, timeout_s=60)
    assert codes == [ExitCode.OK]
    outputs = read_committed_outputs(settings).committed if transactions else read_all_outputs(settings)
    by_source = Counter(o.source for o in outputs)
    assert set(by_source) == {(0, offset) for offset in range(ends[0])} and max(by_source.values()) == 1
    letter = next(o for o in outputs if o.source == (0, 5))
    assert letter.topic == settings.topics.dead_letter
    assert letter.key is None
    assert letter.headers["filter.key"] == b"omitted"
    assert letter.headers["filter.original-key-size"] == str(len(big_key)).encode()


# -- 7 ---------------------------------------------------------------------------------------------


def test_at_least_once_stop_with_the_coordinator_unreachable_ends_by_its_deadline_and_says_so(
    keyword_model, classifier
):
    """The group coordinator stops answering (its requests are held) while the stop commits.

    Before: the stop's synchronous commit blocked for as long as librdkafka retried it, and a commit
    that failed was still reported as a clean stop (exit 0).
    """
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    proxy = TcpProxy(broker.advertised_port, broker.port).up()
    try:
        settings = worker_settings(
            broker.bootstrap_servers, str(keyword_model), batch={"max_size": 8, "max_wait_ms": 5}, shutdown_timeout_s=3
        )
        create_topics(settings, input_partitions=1)
        produced = produce(broker.bootstrap_servers, settings.topics.input[0], texts(400))
        slow = SlowClassifier(classifier, seconds=0.05)
        with worker_thread(settings, slow) as (worker, codes, thread):  # type: ignore[arg-type]
            wait_until(lambda: committed_offsets(settings, 1)[0] > 16, 60, "the first commits")
            proxy.stall("filter-worker-consumer")  # fetched records go on being classified and published
            time.sleep(1.5)
            started = time.monotonic()
            worker.stop()
            thread.join(30)
            took = time.monotonic() - started
            proxy.stall(None)
        assert codes == [ExitCode.SHUTDOWN_DEADLINE], "the commit did not happen: not a clean stop"
        assert took < settings.shutdown_timeout_s + 3, f"the stop took {took:.1f} s"
        with worker_thread(settings, classifier) as (_, codes, _thread):
            wait_for_commits(settings, end_offsets(produced), timeout_s=90)
        assert {o.source for o in read_all_outputs(settings)} == {(p.partition, p.offset) for p in produced}
    finally:
        proxy.stall(None)
        proxy.down()
        broker.stop()


# -- 8 ---------------------------------------------------------------------------------------------


def test_consumer_lag_moves_while_fetching_is_paused(bootstrap_servers, keyword_model, classifier):
    """Cached watermarks only move with fetch responses: the gauge must ask the broker while paused."""
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        budget={"max_records": 40},
        batch={"max_size": 4, "max_wait_ms": 5},
    )
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]
    produce(bootstrap_servers, topic, texts(200))
    gated = GatedClassifier(classifier)  # the model is stuck: the budget stays spent, fetching stays paused
    with worker_thread(settings, gated) as (worker, codes, _):  # type: ignore[arg-type]
        registry = worker.metrics.registry
        lag = lambda: sample(registry, "filter_consumer_lag", topic=topic, partition="0") or 0  # noqa: E731
        wait_until(lambda: sample(registry, "filter_fetch_paused") == 1, 60, "fetching to pause")
        wait_until(lambda: lag() > 0, 30, "a lag")
        before = lag()
        # Small batches: the embedded broker reports the last batch's first offset as its high watermark.
        produce(bootstrap_servers, topic, texts(2200, start=200), config={"linger.ms": 0, "batch.num.messages": 20})
        wait_until(lambda: lag() >= before + 1900, 15, "the lag gauge to count the records that came while paused")
        assert sample(registry, "filter_fetch_paused") == 1, "paused all along"
        gated.open()
    assert codes == [ExitCode.OK]


# -- 9 ---------------------------------------------------------------------------------------------


def test_exactly_once_counts_only_committed_deliveries(bootstrap_servers, keyword_model, classifier, monkeypatch):
    """Outputs delivered inside a transaction that is then aborted are not published: not counted either."""
    settings = worker_settings(bootstrap_servers, str(keyword_model), **exactly_once())
    create_topics(settings, input_partitions=1)
    monkeypatch.setattr(CommitFailsOnce, "failed", [])
    monkeypatch.setattr(worker_module, "Producer", CommitFailsOnce)
    values = [*texts(150), *[b"not json %d" % i for i in range(10)]]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with worker_thread(settings, classifier) as (worker, codes, _):
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
        registry = worker.metrics.registry
        wait_until(lambda: total(registry, "filter_records_published_total") >= len(produced), 10, "the counts")
        time.sleep(0.5)
        published = total(registry, "filter_records_published_total")
        dead = total(registry, "filter_dead_letters_total")
        latencies = sample(registry, "filter_end_to_end_latency_seconds_count")
    assert codes == [ExitCode.OK]
    assert CommitFailsOnce.failed and CommitFailsOnce.failed[0] > 0, "the aborted transaction carried records"
    assert_each_once(settings, produced)
    assert published == len(produced), f"{published} counted as published, {len(produced)} committed"
    assert dead == 10
    assert latencies == len(produced)


# -- 10 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("FILTER_KAFKA__CONSUMER_PROPERTIES", '{"enable.auto.commit": "true"}', "enable.auto.commit"),
        ("FILTER_KAFKA__CONSUMER_PROPERTIES", '{"isolation.level": "read_uncommitted"}', "isolation.level"),
        ("FILTER_KAFKA__PRODUCER_PROPERTIES", '{"acks": "1"}', "acks"),
        ("FILTER_KAFKA__PRODUCER_PROPERTIES", '{"enable.idempotence": "false"}', "enable.idempotence"),
        ("FILTER_KAFKA__PRODUCER_PROPERTIES", '{"transactional.id": "x"}', "FILTER_KAFKA__TRANSACTIONAL_ID"),
        (
            "FILTER_KAFKA__PROPERTIES",
            '{"partition.assignment.strategy": "cooperative-sticky"}',
            "FILTER_KAFKA__ASSIGNMENT_STRATEGY",
        ),
    ],
)
def test_pass_through_properties_the_worker_owns_are_refused_at_start_up(keyword_model, variable, value, setting):
    """Overriding them would silently break the guarantees: exit 2 naming the variable and what to use."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "FILTER_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",  # refused before Kafka is asked anything
        "FILTER_MODEL__NAME": str(keyword_model),
        variable: value,
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "filter_worker", "run"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == ExitCode.CONFIG, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert variable in message and setting in message, message
    assert time.monotonic() - started < 60


# -- assertions that could not fail before --------------------------------------------------------


def test_exactly_once_abort_with_latest_reset_loses_nothing_committed(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    """The abort-with-``latest`` check, judged as read_committed consumers see it (the broker shows aborted records)."""
    settings = worker_settings(bootstrap_servers, str(keyword_model), **exactly_once(kafka__auto_offset_reset="latest"))
    create_topics(settings, input_partitions=2)
    monkeypatch.setattr(CommitFailsOnce, "failed", [])
    monkeypatch.setattr(worker_module, "Producer", CommitFailsOnce)
    with worker_thread(settings, classifier) as (worker, codes, _):
        wait_until(lambda: worker.health.joined, 60, "the group join")
        time.sleep(3)  # "latest" resolves to the end of each partition: produce after that
        produced = produce(bootstrap_servers, settings.topics.input[0], texts(200))
        committed = wait_for_commits(settings, end_offsets(produced))
    assert codes == [ExitCode.OK]
    assert CommitFailsOnce.failed and CommitFailsOnce.failed[0] > 0, "the aborted transaction carried records"
    assert committed == end_offsets(produced)
    log = read_committed_outputs(settings)
    assert log.aborted, "the aborted transaction's records are in the log, marked aborted"
    assert_each_once(settings, produced)


# -- issue 25, item 2: a broker outage under exactly-once -------------------------------------------


def _outage_run(keyword_model, classifier, during_outage):
    """Exactly-once through a proxy the broker advertises, with every connection dropped for 20 s mid-stream.

    ``during_outage(worker, thread)`` runs while the proxy is down; returns what it returns with the
    produced records and the settings, once the proxy is up again.
    """
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    proxy = TcpProxy(broker.advertised_port, broker.port).up()
    try:
        settings = worker_settings(
            broker.bootstrap_servers,
            str(keyword_model),
            batch={"max_size": 8, "max_wait_ms": 5},
            health={"liveness_window_s": 5},
            **exactly_once(kafka__commit_interval_ms=500),
        )
        create_topics(settings, input_partitions=3)
        produced = produce(broker.bootstrap_servers, settings.topics.input[0], texts(3300))
        slow = SlowClassifier(classifier, seconds=0.03)  # about 12 s of work: the outage lands mid-stream
        with worker_thread(settings, slow) as (worker, codes, thread):  # type: ignore[arg-type]
            registry = worker.metrics.registry
            wait_until(lambda: (sample(registry, "filter_commits_total") or 0) >= 2, 60, "commits before the outage")
            proxy.down()
            outcome = during_outage(worker, thread)
            proxy.up()
            yield settings, produced, worker, codes, thread, outcome
    finally:
        proxy.down()
        broker.stop()


def test_exactly_once_broker_outage_keeps_the_loop_live_says_not_ready_and_recovers(keyword_model, classifier):
    """Issue 25, item 2: librdkafka 2.16 blocks in send_offsets_to_transaction far past its timeout.

    Before: the loop blocked inside the call for minutes (liveness lost, SIGTERM not served, /readyz 200)
    and the worker did not recover after the outage without a restart.
    """

    def watch(worker, _thread):
        live, ready = [], []
        until = time.monotonic() + 20
        while time.monotonic() < until:
            live.append(worker.health.live())
            ready.append(worker.health.ready())
            time.sleep(0.05)
        return live, ready

    run = _outage_run(keyword_model, classifier, watch)
    settings, produced, worker, codes, _thread, (live, ready) = next(run)
    try:
        wait_for_commits(settings, end_offsets(produced), timeout_s=180)
        wait_until(worker.health.ready, 60, "readiness after the outage")
        worker.stop()
        _thread.join(60)
        assert codes == [ExitCode.OK]
        assert all(live), f"the loop stalled during the outage ({live.count(False)} of {len(live)} samples)"
        assert not all(ready), "ready all through an outage that stopped every commit"
        assert_each_once(settings, produced)
    finally:
        run.close()


def test_exactly_once_stop_during_a_broker_outage_ends_by_its_deadline(keyword_model, classifier):
    """Issue 25, item 2: a stop asked for while a transactional call hangs is served by the shutdown deadline
    (10 s here), and what it could not commit is read again, once, by the next run."""

    def stop_late(worker, thread):
        time.sleep(12)  # past the session timeout (6 s): a transactional call hangs on the dropped connections
        stopped_at = time.monotonic()
        worker.stop()
        thread.join(40)
        return time.monotonic() - stopped_at

    run = _outage_run(keyword_model, classifier, stop_late)
    settings, produced, _worker, codes, thread, took_s = next(run)
    try:
        assert not thread.is_alive(), "the stop was not served"
        assert took_s < settings.shutdown_timeout_s + 5, f"the stop took {took_s:.1f} s"
        assert codes and codes[0] in (ExitCode.OK, ExitCode.SHUTDOWN_DEADLINE)
        with worker_thread(settings, classifier) as (_, again, _t):
            wait_for_commits(settings, end_offsets(produced), timeout_s=120)
        assert again == [ExitCode.OK]
        assert_each_once(settings, produced)
    finally:
        run.close()
