"""A candidate model in shadow: its decisions compared with the live ones, counted by action pair,
and a sample of the disagreements copied for review, both decisions in the copy's headers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import orjson
import pytest

from filter_worker.config import ConfigError, MessageSettings, RoutingSettings, Rule, Settings, load_settings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.head import Head
from filter_worker.pipeline.candidate import (
    ACTION_HEADER,
    MODEL_HEADER,
    PAIRS,
    Candidate,
    check_candidate_rules,
    pair,
)
from filter_worker.pipeline.decide import Decider
from filter_worker.pipeline.intake import Pending
from filter_worker.pipeline.records import InputRecord, Outgoing, OutputRecord
from filter_worker.pipeline.routing import Router
from filter_worker.pipeline.sampling import draw
from filter_worker.tools.synthetic import build_model
from tests.test_classify import ScriptedModel, _stage
from tests.test_cli import cli

LABELS = ["ham", "spam"]
HEAD = Head(tuple(LABELS), "softmax")
RULES = RoutingSettings(
    rules=[
        Rule(action="drop", labels=["spam"], min_score=0.9, name="spam"),
        Rule(action="quarantine", labels=["spam"], min_score=0.6, name="maybe-spam"),
    ]
)
TOPICS = {"allow": "out.allow", "quarantine": "out.quarantine", "drop": "out.drop", "dead_letter": "out.dlq"}


def truth(spam: float) -> str:
    """The rules above, written out: what each score must be decided as."""
    return "drop" if spam >= 0.9 else "quarantine" if spam >= 0.6 else "allow"


def records(n: int) -> list[Pending]:
    return [
        Pending(
            InputRecord("in", i % 3, i, None, orjson.dumps({"text": f"t{i}"}), [], None), 1, [1], False, True, False
        )
        for i in range(n)
    ]


def probs_of(spam: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - spam, spam], axis=1).astype(np.float32)


def candidate_of(spam: np.ndarray, rate: float) -> Candidate:
    """A candidate whose model gives record ``t{i}`` the spam probability ``spam[i]``."""

    def classify(texts):
        return probs_of(np.array([spam[int(t[1:])] for t in texts]))

    return Candidate(classify, "cand@1", Router(RULES, HEAD), MessageSettings(), "review", rate)


def live(items: list[Pending], spam: np.ndarray) -> tuple[list[Outgoing], list]:
    return Decider(Router(RULES, HEAD), False, TOPICS, "live@1").classified(items, probs_of(spam))


def test_disagreements_are_counted_by_pair_as_the_truth_says():
    rng = np.random.default_rng(7)
    n = 3000
    mine = rng.uniform(size=n)
    theirs = mine.copy()
    changed = rng.uniform(size=n) < 0.2
    theirs[changed] = rng.uniform(size=int(changed.sum()))
    items = records(n)
    outputs, decisions = live(items, mine)
    comparison = candidate_of(theirs, 0.0).compare(items, decisions, outputs)
    expected = Counter(pair(truth(a), truth(b)) for a, b in zip(mine, theirs, strict=True) if truth(a) != truth(b))
    assert comparison.disagreements == expected
    assert set(expected) <= set(PAIRS) and len(expected) == 6  # every pair occurs in this simulation
    assert comparison.actions == [truth(b) for b in theirs]
    assert comparison.drawn == 0 and all(o.review is None for o in comparison.outputs)


def test_when_nothing_changed_nothing_disagrees_and_nothing_is_copied():
    rng = np.random.default_rng(8)
    spam = rng.uniform(size=500)
    items = records(500)
    outputs, decisions = live(items, spam)
    comparison = candidate_of(spam, 1.0).compare(items, decisions, outputs)
    assert comparison.disagreements == Counter()
    assert comparison.drawn == 0
    assert comparison.outputs == outputs


def test_a_sample_of_disagreements_goes_for_review_with_both_decisions():
    rng = np.random.default_rng(9)
    n = 4000
    mine, theirs = rng.uniform(size=n), rng.uniform(size=n)
    items = records(n)
    outputs, decisions = live(items, mine)
    comparison = candidate_of(theirs, 0.25).compare(items, decisions, outputs)
    disagreeing = [i for i in range(n) if truth(mine[i]) != truth(theirs[i])]
    copied = [i for i, o in enumerate(comparison.outputs) if o.review is not None]
    # Drawn by the hash of the source, salted: the same records on every re-decision.
    assert copied == [i for i in disagreeing if draw("candidate/" + items[i].record.source) < 0.25]
    share = len(copied) / len(disagreeing)
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / len(disagreeing)) ** 0.5
    i = copied[0]
    review = comparison.outputs[i].review
    assert review is not None and review.topic == "review"
    headers = dict(review.headers)
    assert headers["filter.action"] == truth(mine[i]).encode()
    assert headers[ACTION_HEADER] == truth(theirs[i]).encode()
    assert headers[MODEL_HEADER] == b"cand@1" and headers["filter.model"] == b"live@1"
    assert comparison.outputs[i].out == outputs[i].out  # the live output itself is unchanged


def test_a_record_already_drawn_for_review_keeps_one_copy_with_the_candidate_headers_added():
    items = records(1)
    outputs, decisions = live(items, np.array([0.1]))
    out = outputs[0].out
    drawn = OutputRecord("review", out.key, out.value, [*out.headers, ("filter.sampled", b"true")], None)
    outputs = [Outgoing(out, items[0].record, 1, "allow", review=drawn)]
    comparison = candidate_of(np.array([0.95]), 1.0).compare(items, decisions, outputs)
    review = comparison.outputs[0].review
    assert review is not None
    names = [k for k, _ in review.headers]
    assert names.count("filter.sampled") == 1 and names.count(ACTION_HEADER) == 1
    assert dict(review.headers)[ACTION_HEADER] == b"drop"


def test_the_stage_counts_the_comparison_and_emits_the_copies():
    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted)  # live: the sentiment labels, every record allowed (all scores 0.2)
    stage.candidate = candidate_of(np.array([0.95, 0.1, 0.7, 0.3]), 1.0)
    stage.submit([(item.record, 1) for item in records(4)])
    for _ in range(3):
        stage.poll()
    out = [o for group in emitted for o in group]
    assert [o.action for o in out] == ["allow"] * 4  # the live decisions are what is published
    assert [o.review is not None for o in out] == [True, False, True, False]
    value = stage._metrics.registry.get_sample_value  # type: ignore[attr-defined]
    assert value("filter_candidate_records_total") == 4
    assert value("filter_candidate_disagreements_total", {"pair": "allow->drop"}) == 1
    assert value("filter_candidate_disagreements_total", {"pair": "allow->quarantine"}) == 1
    assert value("filter_candidate_decisions_total", {"action": "allow"}) == 2
    assert value("filter_candidate_review_copies_total") == 2
    assert value("filter_candidate_forward_seconds_total") > 0


def test_a_failing_candidate_never_holds_up_the_live_decisions():
    def broken(texts):
        raise RuntimeError("CUDA out of memory")

    model, emitted = ScriptedModel(), []
    stage = _stage(model, emitted)
    stage.candidate = Candidate(broken, "cand@1", Router(RULES, HEAD), MessageSettings(), "review", 1.0)
    stage.submit([(item.record, 1) for item in records(3)])
    for _ in range(3):
        stage.poll()
    assert [o.action for group in emitted for o in group] == ["allow"] * 3
    assert stage._metrics.registry.get_sample_value("filter_candidate_failures_total") == 3  # type: ignore[attr-defined]


def test_a_candidate_its_rules_cannot_decide_is_refused_in_one_sentence(tmp_path):
    settings = Settings(candidate={"name": str(tmp_path)})  # the routing in force names sentiment labels
    with pytest.raises(ConfigError, match=r"the candidate's labels \['ham', 'spam'\] cannot be decided under the "):
        check_candidate_rules(settings, HEAD)
    settings = Settings(candidate={"name": str(tmp_path), "routing": RULES.model_dump()})
    check_candidate_rules(settings, HEAD)


def test_run_refuses_a_candidate_the_routing_in_force_cannot_decide(keyword_model, tmp_path):
    """Before joining the group: the live rules name sentiment labels, the candidate has ham and spam."""
    candidate = build_model(tmp_path / "candidate", size="micro", labels=LABELS)
    result = cli(
        "run",
        FILTER_MODEL__NAME=str(keyword_model),
        FILTER_CANDIDATE__NAME=str(candidate),
        FILTER_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1",
    )
    assert result.returncode == ExitCode.CONFIG
    error = result.stderr.splitlines()[-1]  # after the two models' "model loaded" log lines
    assert error.startswith("filter-worker: FILTER_CANDIDATE__NAME=")
    assert "cannot be decided under the routing in force" in error
    assert "Traceback" not in result.stderr


def test_the_candidate_loads_as_the_live_model_does_but_one_pass_at_a_time(tmp_path):
    # Its passes run on the Kafka loop's thread, one after the other: a share of the threads each would
    # hold the loop up that many times longer.
    live = load_settings(model={"backend": "openvino", "dtype": "bfloat16", "streams": 2}).model
    settings = load_settings(candidate={"name": str(tmp_path)}).candidate.model_settings(live)
    assert (settings.name, settings.backend, settings.dtype, settings.streams) == (
        str(tmp_path),
        "openvino",
        "bfloat16",
        1,
    )
