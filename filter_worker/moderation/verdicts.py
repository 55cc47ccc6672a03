"""The verdict record: a reviewer's judgement of one decision, as the review tool publishes it.

A verdict is a record on ``FILTER_FEEDBACK__TOPIC`` whose value is JSON
``{"source": "<topic/partition/offset>", "verdict": "abuse" | "ok", "reviewer": "..."}`` and whose
headers are the decision headers the reviewed record carried (``filter.action``, ``filter.rule``,
``filter.scope``, ``filter.score``, ``filter.model``, copied unchanged). Everything needed travels in
the record, so nothing is joined or looked up.

A verdict on a record the worker drew for random review (``FILTER_REVIEW__*``) also carries
``filter.sampled``, ``filter.sample-probability`` and ``filter.rule-scores``: such a record may have
been allowed, and its probability of being drawn is what lets the feedback service and ``calibrate``
estimate recall and prevalence without bias.

Both readers of verdicts (the live service and ``calibrate --from-feedback``) count each source once,
its latest verdict winning: an export delivered twice or a reviewer's revision must not count twice.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from filter_worker.config import ConfigError, KafkaSettings
from filter_worker.kafka import clients
from filter_worker.kafka.clients import headers_of
from filter_worker.logs import librdkafka_logger
from filter_worker.pipeline.sampling import PROBABILITY_HEADER, RULE_SCORES_HEADER, SAMPLED_HEADER

VERDICTS = ("abuse", "ok")
MODERATED = ("quarantine", "drop")  # the decisions reviewers judge; allowed records only by random sample
DECISION_HEADERS = ("filter.action", "filter.rule", "filter.scope", "filter.score", "filter.model")
INVALID_REASONS = (
    "not_json",  # the value is not JSON
    "bad_verdict",  # not an object, or verdict not "abuse"/"ok", or reviewer not a string
    "bad_source",  # source is not topic/partition/offset
    "missing_header",  # a decision header is absent (or a sampling header of a sampled verdict)
    "bad_header",  # a header is not UTF-8, the score not a probability, an unknown action or model form
    "not_moderated",  # the decision was allow or dead_letter, and the record was not drawn for review
    "unknown_scope",  # filter.scope is not a scope of the routing configuration
    "unknown_rule",  # filter.rule is not a rule of that scope
    "unknown_model",  # filter.model is not a model the service tracks (FILTER_FEEDBACK__MODELS)
    "too_many_models",  # a new model while the most the service tracks at once all have recent verdicts
    "below_threshold",  # the score is below the rule's min_score in force: decided under an older, lower one
)
_SOURCE = re.compile(r"[A-Za-z0-9._-]{1,249}/\d+/\d+")
_MODEL = re.compile(r"\S{1,256}")

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Sample:
    """How a randomly drawn record came to review: its probability of being drawn, and every rule of
    its scope with its score (so it can be decided again under other thresholds)."""

    probability: float
    rule_scores: dict[str, float]

    @property
    def weight(self) -> float:
        """How many records of the stream this one stands for (inverse-probability weighting)."""
        return 1.0 / self.probability


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reviewer's judgement of one decision (the reviewer's name is checked, not kept: it is no label)."""

    source: str
    abuse: bool
    action: str
    rule: str
    scope: str
    score: float
    model: str
    sample: Sample | None = None


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a verdict record was skipped: ``reason`` is one of ``INVALID_REASONS``, ``detail`` for people."""

    reason: str
    detail: str


def _probability(text: str) -> float:
    """A header's number from 0 to 1, or NaN (never raises: a bad header is data)."""
    try:
        value = float(text)
    except ValueError:
        return float("nan")
    return value if 0.0 <= value <= 1.0 else float("nan")


def _sample(found: dict[str, bytes | None]) -> Sample | Invalid:
    raw_probability, raw_scores = found.get(PROBABILITY_HEADER), found.get(RULE_SCORES_HEADER)
    if raw_probability is None or raw_scores is None:
        return Invalid("missing_header", f"a sampled verdict needs {PROBABILITY_HEADER} and {RULE_SCORES_HEADER}")
    try:
        probability = _probability(raw_probability.decode())
        scores = orjson.loads(raw_scores)
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return Invalid("bad_header", f"{PROBABILITY_HEADER} or {RULE_SCORES_HEADER} is not readable")
    if not probability > 0.0:  # NaN included
        return Invalid("bad_header", f"{PROBABILITY_HEADER} is not a probability above 0")
    if not isinstance(scores, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in scores.values()
    ):
        return Invalid("bad_header", f"{RULE_SCORES_HEADER} is not a JSON object of rule scores from 0 to 1")
    return Sample(probability, {str(k): float(v) for k, v in scores.items()})


def parse_verdict(headers: Sequence[tuple[str, bytes | None]], value: bytes | None) -> Verdict | Invalid:
    """A verdict record -> ``Verdict``, or ``Invalid`` saying why not. Never raises: a bad record is data."""
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return Invalid("not_json", "the value is not JSON")
    if not isinstance(body, dict):
        return Invalid("bad_verdict", f"the value is JSON {type(body).__name__}, not an object")
    verdict, reviewer, source = body.get("verdict"), body.get("reviewer"), body.get("source")
    if verdict not in VERDICTS:
        return Invalid("bad_verdict", f"verdict must be one of {list(VERDICTS)}")
    if reviewer is not None and not isinstance(reviewer, str):
        return Invalid("bad_verdict", "reviewer must be a string")
    if not isinstance(source, str) or not _SOURCE.fullmatch(source):
        return Invalid("bad_source", "source must be topic/partition/offset, as in the filter.source header")
    found: dict[str, bytes | None] = {}
    for key, raw in headers:
        found[key] = raw  # the last one of a name counts, as in routing
    missing = [name for name in DECISION_HEADERS if found.get(name) is None]
    if missing:
        return Invalid("missing_header", f"missing decision header(s) {missing}")
    try:
        action, rule, scope, score_text, model = (found[name].decode() for name in DECISION_HEADERS)  # type: ignore[union-attr]
    except UnicodeDecodeError:
        return Invalid("bad_header", "a decision header is not UTF-8")
    score = _probability(score_text)
    if not 0.0 <= score <= 1.0:
        return Invalid("bad_header", "filter.score is not a number from 0 to 1")
    sample: Sample | None = None
    if found.get(SAMPLED_HEADER) == b"true":
        drawn = _sample(found)
        if isinstance(drawn, Invalid):
            return drawn
        sample = drawn
    if action not in (*MODERATED, "allow", "dead_letter"):
        return Invalid("bad_header", "filter.action is not an action")
    if action == "dead_letter" or (action == "allow" and sample is None):
        return Invalid("not_moderated", f"the decision was {action}; only quarantine and drop are judged")
    if not _MODEL.fullmatch(model):
        return Invalid("bad_header", "filter.model is empty, too long or has spaces")
    return Verdict(source, verdict == "abuse", action, rule, scope, score, model, sample)


def latest_per_source(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """One verdict per source, the last one winning (a revision, or a repeat of an at-least-once export).

    A source drawn for random review keeps its sampling facts even when a later, ordinary verdict on
    it (from the quarantine queue, say) is the one that counts: it was drawn all the same, and
    dropping it would bias the sample toward records nobody looked at otherwise.
    """
    latest: dict[str, Verdict] = {}
    for verdict in verdicts:
        earlier = latest.pop(verdict.source, None)
        if verdict.sample is None and earlier is not None and earlier.sample is not None:
            verdict = replace(verdict, sample=earlier.sample)
        latest[verdict.source] = verdict
    return list(latest.values())


# ---- reading verdicts for calibration ----


def read_verdicts(source: str, kafka: KafkaSettings) -> tuple[list[Verdict], Counter[str]]:
    """Every verdict in a JSON-lines export (an existing file, in line order) or a topic read from its
    beginning (in record timestamp order), and the skipped records per reason. Repeats included: see
    ``latest_per_source``."""
    records = read_records(source, kafka)
    verdicts: list[Verdict] = []
    skipped: Counter[str] = Counter()
    for headers, value in records:
        outcome = parse_verdict(headers, value)
        if isinstance(outcome, Invalid):
            skipped[outcome.reason] += 1
        else:
            verdicts.append(outcome)
    return verdicts, skipped


def read_records(
    source: str, kafka: KafkaSettings, option: str = "--from-feedback"
) -> list[tuple[Headers, bytes | None]]:
    """(headers, value) of every record of a JSON-lines export (an existing file) or of a topic read from
    its beginning: the verdicts, or the output and review records whose texts they judged
    (``model train --texts``). ``option`` names the source in error messages."""
    path = Path(source)
    if path.is_file():
        return list(_jsonl_records(path, option))
    return _topic_records(source, kafka, option=option)


def _jsonl_records(path: Path, option: str) -> list[tuple[Headers, bytes]]:
    """``{"headers": {"filter.action": "drop", ...}, "value": {"source": ..., "verdict": ...}}`` per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {path}: not UTF-8 text") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ConfigError(f"{option} {path} line {n}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("headers"), dict) or "value" not in row:
            raise ConfigError(f"{option} {path} line {n}: expected an object with 'headers' and 'value'")
        headers = [(str(k), None if v is None else str(v).encode()) for k, v in row["headers"].items()]
        value = row["value"]
        records.append((headers, value.encode() if isinstance(value, str) else orjson.dumps(value)))
    return records


def _topic_records(
    topic: str, kafka: KafkaSettings, stall_s: float = 30.0, option: str = "--from-feedback"
) -> list[tuple[Headers, bytes | None]]:
    """Every record of ``topic`` up to the end it had when reading began, with a throwaway group, in
    record timestamp order (partitions are read interleaved; the latest verdict of a source must be the
    one published last, whichever partition it is in)."""
    config = {
        **clients.consumer_config(
            kafka.model_copy(update={"group_id": f"filter-worker-calibrate-{uuid.uuid4().hex}"})
        ),
        "auto.offset.reset": "earliest",
        "logger": librdkafka_logger(),
    }
    consumer = Consumer(config)
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=10)
        except KafkaException as exc:
            raise ConfigError(
                f"{option} {topic}: no such file, and Kafka at FILTER_KAFKA__BOOTSTRAP_SERVERS="
                f"{kafka.bootstrap_servers} did not answer ({exc.args[0].str() if exc.args else exc})"
            ) from None
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise ConfigError(f"{option} {topic}: no such file, and no such topic on {kafka.bootstrap_servers}")
        ends: dict[int, int] = {}
        starts = []
        for partition in described.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
        consumer.assign(starts)
        records: list[tuple[tuple[int, int, int], Headers, bytes | None]] = []
        last_progress = time.monotonic()
        while ends:
            for message in consumer.consume(500, 1.0):
                if message.error() is None:
                    order = (message.timestamp()[1], message.partition() or 0, message.offset() or 0)
                    records.append((order, headers_of(message), message.value()))
                    last_progress = time.monotonic()
            # Positions, not the last record's offset: a transaction marker may be the last offset.
            for tp in consumer.position([TopicPartition(topic, partition) for partition in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
            if time.monotonic() - last_progress > stall_s:
                raise ConfigError(f"{option} {topic}: reading stalled for {stall_s:.0f} s before the end")
        records.sort(key=lambda record: record[0])
        return [(headers, value) for _, headers, value in records]
    finally:
        consumer.close()
