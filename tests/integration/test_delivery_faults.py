"""The delivery core's known ways to lose, repeat or stall a record, each against the real broker.

Every test is named after the fault it reproduces; each failed on the worker before the delivery core
was split into committers, gate and budget (see the README's fault table).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError
from structlog.testing import capture_logs

from filter_worker.exit_codes import ExitCode
from filter_worker.service import worker as worker_module
from filter_worker.tools.broker import EmbeddedBroker, free_port
from tests.integration.classifiers import SlowClassifier
from tests.integration.committed_log import read_committed_outputs
from tests.integration.faulty_producers import CommitFailsOnce, RefusingProducer
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

MODES = [pytest.param(False, id="at-least-once"), pytest.param(True, id="exactly-once")]


def transactional(settings_kwargs: dict[str, object], exactly_once: bool) -> dict[str, object]:
    if exactly_once:
        settings_kwargs |= {"kafka__exactly_once": True, "kafka__transactional_id": f"t-{uuid.uuid4().hex[:8]}"}
    return settings_kwargs


def sample(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


def watch_in_flight(worker, thread: threading.Thread) -> list[int]:
    """Start sampling ``filter_in_flight_records`` every 10 ms while ``thread`` runs; ``[-1]`` is the peak so far."""
    peaks = [0]

    def watch() -> None:
        while thread.is_alive():
            peaks.append(max(peaks[-1], int(sample(worker.metrics.registry, "filter_in_flight_records"))))
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    return peaks


# -- 1. one oversized record -----------------------------------------------------------------------


@pytest.mark.parametrize("exactly_once", MODES)
def test_oversized_record_is_dead_lettered_cut_to_fit_and_its_partition_flows(
    bootstrap_servers, keyword_model, classifier, exactly_once
):
    """The input takes a 2 MB record, the producer sends at most 1 MB (librdkafka's default)."""
    settings = worker_settings(bootstrap_servers, str(keyword_model), **transactional({}, exactly_once))
    create_topics(settings, input_partitions=1)
    huge = orjson.dumps({"text": "fine " * 400_000})  # 2 MB: too big routed, too big as a dead letter
    values = [*texts(10), huge, *texts(30, start=10)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values, config={"message.max.bytes": 3_000_000})
    with worker_thread(settings, classifier) as (worker, codes, _):
        outputs = read_outputs(settings, expected=len(produced))
        committed = wait_for_commits(settings, end_offsets(produced))
        oversized = sample(worker.metrics.registry, "filter_oversized_dead_letters_total", value="cut")
    if exactly_once:  # as read_committed consumers see them (the embedded broker also shows aborted records)
        outputs = read_committed_outputs(settings).committed
    assert codes == [ExitCode.OK]
    assert committed == end_offsets(produced)
    by_offset = {o.source[1]: o for o in outputs}
    assert len(by_offset) == len(produced) == len(outputs), "every record once, none lost, none repeated"
    letter = by_offset[10]
    assert letter.topic == settings.topics.dead_letter
    assert letter.headers["filter.error"] == b"publish_rejected"
    assert letter.headers["filter.value"] == b"cut"
    assert letter.headers["filter.original-size"] == str(len(huge)).encode()
    assert letter.headers["filter.source"] == f"{settings.topics.input[0]}/0/10".encode()
    assert b"too large" in letter.headers["filter.reason"].lower()
    assert 0 < len(letter.value) < 1_000_000 and huge.startswith(letter.value)
    assert oversized == 1


def test_oversized_record_stops_the_worker_when_the_operator_says_stop(bootstrap_servers, keyword_model, classifier):
    """FILTER_DEAD_LETTER__OVERSIZED=stop: exit 1 before committing it (exactly-once: no traceback at exit)."""
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        **transactional({"dead_letter__oversized": "stop"}, exactly_once=True),
    )
    create_topics(settings, input_partitions=1)
    huge = orjson.dumps({"text": "fine " * 400_000})
    produce(
        bootstrap_servers,
        settings.topics.input[0],
        [*texts(5), huge, *texts(5)],
        config={"message.max.bytes": 3_000_000},
    )
    with worker_thread(settings, classifier) as (_, codes, thread):
        thread.join(60)
    assert codes == [ExitCode.FAILED], "run() returns the exit code; nothing escapes as a traceback"
    assert committed_offsets(settings, partitions=1)[0] <= 5


# -- 3. exactly-once: a record refused after it was queued ------------------------------------------


def test_exactly_once_record_refused_after_queueing_ends_in_the_dead_letter_topic(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    """Like a topic whose max.message.bytes is below the producer's: the broker refuses the queued record."""
    settings = worker_settings(bootstrap_servers, str(keyword_model), **transactional({}, exactly_once=True))
    create_topics(settings, input_partitions=1)
    marker = b"refuse me"

    def refuse(topic: str, value: bytes | None) -> KafkaError | None:
        if topic != settings.topics.dead_letter and value and marker in value:
            return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
        return None

    monkeypatch.setattr(RefusingProducer, "refuse", staticmethod(refuse))
    monkeypatch.setattr(RefusingProducer, "refused", [])
    monkeypatch.setattr(worker_module, "Producer", RefusingProducer)
    values = [*texts(20), orjson.dumps({"text": "refuse me please"}), *texts(40, start=20)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with worker_thread(settings, classifier) as (worker, codes, _):
        committed = wait_for_commits(settings, end_offsets(produced), timeout_s=60)
        aborts = sample(worker.metrics.registry, "filter_transaction_aborts_total")
    assert codes == [ExitCode.OK]
    assert committed == end_offsets(produced)
    assert aborts == 1, "one abort; after the rewind the record goes straight to its dead letter"
    committed_outputs = read_committed_outputs(settings).committed
    by_offset = {o.source[1]: o for o in committed_outputs}
    assert sorted(o.source[1] for o in committed_outputs) == list(range(len(produced))), "each record once"
    assert by_offset[20].topic == settings.topics.dead_letter
    assert by_offset[20].headers["filter.error"] == b"publish_rejected"


def test_exactly_once_pipeline_refusal_backs_off_then_exits_1(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    """Every record to one output is refused (an ACL, say): bounded aborts with backoff, not ready, then exit 1."""
    settings = worker_settings(
        bootstrap_servers, str(keyword_model), **transactional({"kafka__max_aborts": 2}, exactly_once=True)
    )
    create_topics(settings, input_partitions=1)

    def refuse(topic: str, _value: bytes | None) -> KafkaError | None:
        if topic == settings.topics.drop:
            return KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")
        return None

    monkeypatch.setattr(RefusingProducer, "refuse", staticmethod(refuse))
    monkeypatch.setattr(RefusingProducer, "refused", [])
    monkeypatch.setattr(worker_module, "Producer", RefusingProducer)
    produce(bootstrap_servers, settings.topics.input[0], texts(20))  # record 0 is "idiot": dropped
    readiness: list[bool] = []
    with capture_logs() as logs, worker_thread(settings, classifier) as (worker, codes, thread):
        while thread.is_alive():
            readiness.append(worker.health.ready())
            aborts = sample(worker.metrics.registry, "filter_transaction_aborts_total")
            thread.join(0.05)
    assert codes == [ExitCode.FAILED]
    error = next(e["error"] for e in logs if e["event"].startswith("worker failed"))
    assert "FILTER_KAFKA__MAX_ABORTS=2" in error and settings.topics.drop in error and "authorization" in error
    assert aborts == 3, "the first try and two retries, not a loop"
    assert False in readiness, "not ready while backing off"
    assert committed_offsets(settings, partitions=1)[0] < 0, "nothing committed past the refused record"


# -- 8. exactly-once commits: retriable errors, the interval, the lag gauge ------------------------


def test_exactly_once_retriable_commit_error_is_retried_not_fatal(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    settings = worker_settings(bootstrap_servers, str(keyword_model), **transactional({}, exactly_once=True))
    create_topics(settings, input_partitions=2)
    monkeypatch.setattr(CommitFailsOnce, "failed", [])
    monkeypatch.setattr(CommitFailsOnce, "error", KafkaError(KafkaError._TIMED_OUT, "injected", retriable=True))
    monkeypatch.setattr(worker_module, "Producer", CommitFailsOnce)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(100))
    with worker_thread(settings, classifier) as (worker, codes, _):
        committed = wait_for_commits(settings, end_offsets(produced))
        registry = worker.metrics.registry
        failures, aborts = (
            sample(registry, "filter_commit_failures_total"),
            sample(registry, "filter_transaction_aborts_total"),
        )
    assert codes == [ExitCode.OK]
    assert committed == end_offsets(produced)
    assert (failures, aborts) == (1, 0), "retried in place: no abort, no re-read"
    outputs = read_committed_outputs(settings).committed
    assert sorted(o.source for o in outputs) == sorted((p.partition, p.offset) for p in produced)


def test_exactly_once_commits_at_the_commit_interval_and_reports_lag(bootstrap_servers, keyword_model, classifier):
    interval_s = 1.0
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        batch={"max_size": 4, "max_wait_ms": 5},
        **transactional({"kafka__commit_interval_ms": int(interval_s * 1000)}, exactly_once=True),
    )
    create_topics(settings, input_partitions=2)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(300))
    slow = SlowClassifier(classifier, seconds=0.05)  # 75 passes: about 4 s of backlog
    with worker_thread(settings, slow) as (worker, codes, _):  # type: ignore[arg-type]
        started = time.monotonic()
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
        elapsed = time.monotonic() - started
        registry = worker.metrics.registry
        commits = sample(registry, "filter_commits_total")
        lag_of = lambda p: registry.get_sample_value(  # noqa: E731
            "filter_consumer_lag", {"topic": settings.topics.input[0], "partition": str(p)}
        )
        wait_until(lambda: all(lag_of(p) == 0 for p in (0, 1)), 10, "the lag gauge of each partition to reach 0")
    assert codes == [ExitCode.OK]
    assert commits <= elapsed / interval_s + 2, f"{commits} transactions in {elapsed:.1f}s"


# -- 4. a partial outage: outputs unacknowledged, input still flowing -------------------------------


def test_partial_outage_bounds_in_flight_records_stays_live_and_stops_in_time(keyword_model, classifier):
    broker = EmbeddedBroker(advertised_port=free_port()).start()
    proxy = TcpProxy(broker.advertised_port, broker.port).up()
    budget = 200
    try:
        settings = worker_settings(
            broker.bootstrap_servers,
            str(keyword_model),
            budget={"max_records": budget},
            health={"liveness_window_s": 3},
            shutdown_timeout_s=3,
        )
        create_topics(settings, input_partitions=2)
        first = produce(broker.bootstrap_servers, settings.topics.input[0], texts(50))
        peaks, live = [0], []
        with worker_thread(settings, classifier) as (worker, codes, thread):
            wait_for_commits(settings, end_offsets(first))
            proxy.stall("filter-worker-producer")  # the broker stops acknowledging; fetching goes on
            second = produce(broker.bootstrap_servers, settings.topics.input[0], texts(3000, start=50))
            until = time.monotonic() + 8
            while time.monotonic() < until:
                peaks.append(max(peaks[-1], int(sample(worker.metrics.registry, "filter_in_flight_records"))))
                live.append(worker.health.live())
                time.sleep(0.02)
            stop_started = time.monotonic()
            worker.stop()
            thread.join(30)
            stop_took = time.monotonic() - stop_started
        print(f"partial outage: in-flight records peaked at {peaks[-1]} (budget {budget}), {len(second)} waiting")
        assert codes == [ExitCode.SHUTDOWN_DEADLINE], "outputs unacknowledged at the deadline: exit 6"
        assert stop_took < settings.shutdown_timeout_s + 5, f"the stop took {stop_took:.1f}s"
        assert all(live), "the loop kept turning through the outage"
        assert budget <= peaks[-1] <= budget + settings.batch.max_size, f"in flight peaked at {peaks[-1]}"

        proxy.stall(None)
        with worker_thread(settings, classifier) as (_, codes, _thread):
            # Commits first: the stop's repeats could make up the expected count of outputs early.
            wait_for_commits(settings, end_offsets(first + second), timeout_s=120)
            outputs = read_outputs(settings, expected=len(first) + len(second), timeout_s=60)
        assert codes == [ExitCode.OK]
        assert {o.source for o in outputs} == {(p.partition, p.offset) for p in first + second}
    finally:
        proxy.down()
        broker.stop()


def test_new_partitions_stay_paused_while_the_budget_is_spent(bootstrap_servers, keyword_model, classifier):
    """Cooperative rebalancing hands a paused worker more partitions: they must not fetch past the budget."""
    budget = 24
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        budget={"max_records": budget},
        batch={"max_size": 4, "max_wait_ms": 5},
        kafka__assignment_strategy="cooperative-sticky",
    )
    create_topics(settings, input_partitions=4)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(400))
    slow = SlowClassifier(classifier, seconds=0.1)
    with worker_thread(settings, slow) as (first, codes, thread):  # type: ignore[arg-type]
        peaks = watch_in_flight(first, thread)
        wait_until(lambda: first.health.joined, 60, "the first worker to join")
        with worker_thread(settings, slow) as (second, second_codes, _):  # type: ignore[arg-type]
            wait_until(lambda: second.health.joined, 60, "the second worker to join")
            time.sleep(2)
        # the second left: the first is assigned its partitions while over budget
        wait_for_commits(settings, end_offsets(produced), timeout_s=120)
    print(f"paused assignment: in-flight records peaked at {peaks[-1]} (budget {budget})")
    assert codes == [ExitCode.OK] and second_codes == [ExitCode.OK]
    assert peaks[-1] <= budget + settings.batch.max_size, f"in flight peaked at {peaks[-1]} (budget {budget})"


class PauseCountingConsumer(Consumer):
    """The real consumer, counting the partitions the worker pauses."""

    paused: list[int] = []

    def pause(self, partitions):  # type: ignore[no-untyped-def]
        PauseCountingConsumer.paused.append(len(partitions))
        return super().pause(partitions)


def test_a_full_batch_buffer_stops_reading_without_pausing_the_fetch(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    """A slow model fills the batch buffer; the loop must stop reading, not pause the partitions.

    A pause throws away what librdkafka has prefetched, and on the embedded broker the first record
    after a resume came 0.5 to 0.95 s later: a worker whose buffer filled behind a fast model then
    sat idle once per fill. The pause is for the in-flight budget, which this test never spends.
    """
    PauseCountingConsumer.paused = []
    monkeypatch.setattr(worker_module, "Consumer", PauseCountingConsumer)
    settings = worker_settings(bootstrap_servers, str(keyword_model), batch={"max_size": 4, "max_wait_ms": 5})
    create_topics(settings, input_partitions=2)
    produced = produce(bootstrap_servers, settings.topics.input[0], texts(600))  # buffer holds 4 x 32 = 128
    slow = SlowClassifier(classifier, seconds=0.01)
    with worker_thread(settings, slow) as (worker, codes, thread):  # type: ignore[arg-type]
        peaks = watch_in_flight(worker, thread)
        outputs = read_outputs(settings, expected=len(produced), timeout_s=120)
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
        paused_while_running = list(PauseCountingConsumer.paused)  # the stop holds fetching, by design
    assert codes == [ExitCode.OK]
    assert {o.source for o in outputs} == {(p.partition, p.offset) for p in produced}
    assert 128 <= peaks[-1] < settings.budget.max_records, f"in flight peaked at {peaks[-1]}: the buffer filled"
    assert paused_while_running == [], f"paused {len(paused_while_running)} times, budget never spent"


# -- 5. a graceful stop after a trailing run of dead letters ---------------------------------------


def test_graceful_stop_after_a_trailing_run_of_dead_letters_repeats_none(bootstrap_servers, keyword_model, classifier):
    settings = worker_settings(bootstrap_servers, str(keyword_model))
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]
    with worker_thread(settings, classifier) as (worker, codes, _thread):
        good = produce(bootstrap_servers, topic, texts(20))
        read_outputs(settings, expected=len(good), settle_s=0)
        produce(bootstrap_servers, topic, [b"not json %d" % i for i in range(10)])
        consumed = lambda: sample(worker.metrics.registry, "filter_records_consumed_total", topic=topic)  # noqa: E731
        wait_until(lambda: consumed() == 30, 30, "the malformed records to be consumed")
        # leaving the block stops the worker at once: the run of dead letters has not ended
    assert codes == [ExitCode.OK]
    with worker_thread(settings, classifier) as (restarted, codes, _thread):  # re-reads what was left uncommitted
        wait_until(lambda: restarted.health.joined, 60, "the restarted worker to join")
        wait_for_commits(settings, {0: 30})
    assert codes == [ExitCode.OK]
    outputs = read_all_outputs(settings)
    assert sum(o.topic == settings.topics.dead_letter for o in outputs) == 10, "dead letters repeated after a stop"
    assert len(outputs) == 30


# -- 7. dead letters with the limits switched off --------------------------------------------------


def test_dead_letters_are_committed_during_a_long_run_when_the_limits_are_off(
    bootstrap_servers, keyword_model, classifier
):
    """Nothing to hold a run back for: a stream of bad records is committed as it goes, not at its end."""
    settings = worker_settings(
        bootstrap_servers, str(keyword_model), dead_letter={"max_consecutive": 0, "max_ratio": 1.0}
    )
    create_topics(settings, input_partitions=1)
    topic = settings.topics.input[0]
    bad = produce(bootstrap_servers, topic, [b"not json %d" % i for i in range(300)])
    trickling = threading.Event()

    def trickle() -> None:  # the run never ends and the input never goes quiet
        while not trickling.is_set():
            produce(bootstrap_servers, topic, [b"still not json"])
            time.sleep(0.3)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        with worker_thread(settings, classifier) as (_, codes, _thread):
            committed = wait_for_commits(settings, end_offsets(bad), timeout_s=30)
    finally:
        trickling.set()
        feeder.join()
    assert codes == [ExitCode.OK]
    assert committed[0] >= len(bad)


# -- 6. rebalances and records published out of offset order ---------------------------------------


def test_rebalance_repeats_no_record_published_out_of_offset_order(bootstrap_servers, keyword_model, classifier):
    """Batches cut by length publish out of offset order; a revocation finishes the gaps before committing."""
    settings = worker_settings(bootstrap_servers, str(keyword_model), batch={"max_size": 8, "max_wait_ms": 5})
    create_topics(settings, input_partitions=4)
    values = [orjson.dumps({"text": "fine " * (1 + (i * 37) % 60) + str(i)}) for i in range(1500)]
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    slow = SlowClassifier(classifier, seconds=0.02)  # a backlog: the buffer holds many lengths at once
    with (
        capture_logs() as logs,
        worker_thread(settings, slow) as (first, codes, _),  # type: ignore[arg-type]
    ):
        wait_until(
            lambda: (
                sample(
                    first.metrics.registry,
                    "filter_records_published_total",
                    action="allow",
                    topic=settings.topics.input[0],
                )
                > 200
            ),
            60,
            "the first outputs",
        )
        with worker_thread(settings, slow) as (second, second_codes, _):  # type: ignore[arg-type]
            wait_until(lambda: second.health.joined, 60, "the second worker to join")
            time.sleep(1)
        outputs = read_outputs(settings, expected=len(produced), timeout_s=120)
        wait_for_commits(settings, end_offsets(produced), timeout_s=60)
    assert codes == [ExitCode.OK] and second_codes == [ExitCode.OK]
    revocations = [e for e in logs if e["event"] == "partitions revoked"]
    assert revocations and all(e["finished_in_time"] for e in revocations)
    counts = Counter(o.source for o in outputs)
    assert set(counts) == {(p.partition, p.offset) for p in produced}
    repeats = sum(n - 1 for n in counts.values())
    print(f"repeats after {len(revocations)} revocations: {repeats} of {len(produced)}")
    assert repeats == 0, f"repeated (partition, offset): {sorted(k for k, n in counts.items() if n > 1)}"


# -- issue 25: refusals that must not crash-loop exactly-once --------------------------------------


def _sized(i: int, size: int) -> bytes:
    """A JSON record of exactly ``size`` bytes."""
    head = orjson.dumps({"text": f"message {i} "})
    return orjson.dumps({"text": f"message {i} " + "x" * (size - len(head))})


def test_exactly_once_review_copies_over_the_size_limit_are_dropped_without_an_abort(
    bootstrap_servers, keyword_model, classifier
):
    """Issue 25, item 1: every routed output fits the producer's message.max.bytes, no copy for review does.

    Before: produce() refused each copy before queueing it, the refusal doomed a transaction the copy was
    never in, each abort learned only its own refusals and counted toward FILTER_KAFKA__MAX_ABORTS:
    exit 1 after 6 aborts, nothing committed, the same on every restart.
    """
    extra = transactional(
        {"review": {"rate": 1.0}, "topics__create": True, "kafka__producer_properties": {"message.max.bytes": "4000"}},
        exactly_once=True,
    )
    settings = worker_settings(bootstrap_servers, str(keyword_model), **extra)
    prefix = settings.topics.input[0].removesuffix(".in")
    settings = settings.model_copy(update={"review": settings.review.model_copy(update={"topic": f"{prefix}.review"})})
    create_topics(settings, input_partitions=1)
    produced = produce(bootstrap_servers, settings.topics.input[0], [_sized(i, 3695) for i in range(120)])
    with worker_thread(settings, classifier) as (worker, codes, _):
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
        registry = worker.metrics.registry
        aborts = sample(registry, "filter_transaction_aborts_total")
        dropped = sample(registry, "filter_review_records_total", result="refused")
    assert codes == [ExitCode.OK]
    assert aborts == 0, "a copy refused before it was queued was never in the transaction"
    assert dropped == len(produced)
    outputs = read_committed_outputs(settings)
    assert not outputs.open
    assert sorted(o.source for o in outputs.committed) == [(0, p.offset) for p in produced], "each record once"
    assert {o.topic for o in outputs.committed} <= {settings.topics.allow, settings.topics.drop}


def test_exactly_once_a_burst_of_records_refused_after_queueing_does_not_exhaust_the_abort_limit(
    bootstrap_servers, keyword_model, classifier, monkeypatch
):
    """Issue 25, item 5: like a topic whose max.message.bytes is below the producer's, for 7 records in a row.

    Each refusal dooms its transaction and the rewind re-reads from the last commit, so the 7 refused
    records abort 7 transactions in a row. Before: each abort counted toward FILTER_KAFKA__MAX_ABORTS (5),
    so the 6th stopped the worker (exit 1) and a restart forgot the replacements: a crash loop. An abort
    that registered a replacement is progress: the record is not refused again.
    """
    settings = worker_settings(
        bootstrap_servers,
        str(keyword_model),
        batch={"max_size": 8, "max_wait_ms": 5},
        **transactional({"kafka__commit_interval_ms": 60_000}, exactly_once=True),
    )
    create_topics(settings, input_partitions=1)
    marker = b"too large for its topic"

    def refuse(topic: str, value: bytes | None) -> KafkaError | None:
        if topic != settings.topics.dead_letter and value and marker in value:
            return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
        return None

    monkeypatch.setattr(RefusingProducer, "refuse", staticmethod(refuse))
    monkeypatch.setattr(RefusingProducer, "refused", [])
    monkeypatch.setattr(worker_module, "Producer", RefusingProducer)
    values = texts(200)
    refused_at = [10 + 25 * k for k in range(7)]
    for offset in refused_at:
        values[offset] = orjson.dumps({"text": f"message {offset} {marker.decode()}"})
    produced = produce(bootstrap_servers, settings.topics.input[0], values)
    with worker_thread(settings, classifier) as (worker, codes, _):
        wait_for_commits(settings, end_offsets(produced), timeout_s=90)
        aborts = sample(worker.metrics.registry, "filter_transaction_aborts_total")
    assert codes == [ExitCode.OK]
    assert aborts >= 6, "the refusals landed in six transactions or more (else this shows nothing)"
    outputs = read_committed_outputs(settings)
    assert not outputs.open
    assert sorted(o.source for o in outputs.committed) == [(0, p.offset) for p in produced], "each record once"
    letters = {o.source[1] for o in outputs.committed if o.topic == settings.topics.dead_letter}
    assert letters == set(refused_at)
