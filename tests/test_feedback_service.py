"""The feedback service's judgement of verdicts, without a broker: what becomes a series, what leaves one.

Records are handed to ``FeedbackService.judge`` as the loop hands them over; the clock is moved by
hand. The statistical tests simulate reviewers with a known truth (fixed seeds).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml

from filter_worker.config import ConfigError, RoutingSettings, load_settings
from filter_worker.moderation.sequential import Cusum, design, run_length
from filter_worker.moderation.stats import clopper_pearson
from filter_worker.pipeline.records import InputRecord
from filter_worker.service.feedback import FeedbackService, RuleIndex
from tests.clock import ManualClock

MODEL = "acme/m@0123#sha256:00112233aabbccdd"
RULES = [
    {"action": "drop", "labels": ["Very Negative"], "min_score": 0.9, "name": "very-negative"},
    {"action": "quarantine", "labels": ["Very Negative", "Negative"], "min_score": 0.75, "name": "negative"},
]
ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "moderation-alerts.yml"


def service_for(clock: ManualClock, rules: list[dict] = RULES, window: int = 50, **feedback: object) -> FeedbackService:
    settings = load_settings(
        routing={"rules": rules}, feedback={"window": window, "models": ["acme/m"], "metrics_port": 0, **feedback}
    )
    return FeedbackService(settings, reload_routing=lambda: settings.routing, wall_clock=clock)


def record(
    n: int,
    verdict: str,
    score: float,
    rule: str = "negative",
    action: str = "quarantine",
    model: str = MODEL,
    at: float = 0.0,
    **extra: bytes,
) -> InputRecord:
    headers = [
        ("filter.action", action.encode()),
        ("filter.rule", rule.encode()),
        ("filter.scope", b"default"),
        ("filter.score", f"{score:.6f}".encode()),
        ("filter.model", model.encode()),
        *((k.replace("_", "."), v) for k, v in extra.items()),
    ]
    value = orjson.dumps({"source": f"messages/0/{n}", "verdict": verdict})
    return InputRecord("verdicts", 0, n, None, value, headers, int(at * 1000))


def sample(service: FeedbackService, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


def series(service: FeedbackService, name: str) -> list[dict[str, str]]:
    return [s.labels for f in service.metrics.registry.collect() for s in f.samples if s.name == name]


NEGATIVE = {"scope": "default", "rule": "negative", "action": "quarantine", "model": MODEL}


def test_a_window_below_50_verdicts_is_refused_at_start_up():
    with pytest.raises(ConfigError, match=r"FILTER_FEEDBACK__WINDOW \(feedback.window\).*greater than or equal to 50"):
        load_settings(feedback={"window": 49})
    assert load_settings(feedback={"window": 50}).feedback.window == 50


def test_unnamed_rules_are_refused_when_feedback_runs():
    """An unnamed rule is called rules[N] by its place: reordering the rules would mix two rules' verdicts."""
    unnamed = [{k: v for k, v in rule.items() if k != "name"} if i else rule for i, rule in enumerate(RULES)]
    with pytest.raises(ConfigError, match=r"FILTER_ROUTING__RULES: rule rules\[1\] has no name"):
        service_for(ManualClock(0.0), rules=unnamed)


def test_precision_is_exported_with_its_exact_interval():
    service = service_for(ManualClock(0.0))
    for n in range(6):
        service.judge(record(n, "abuse", 0.95))
    assert sample(service, "filter_feedback_precision", **NEGATIVE) == 1.0
    assert sample(service, "filter_feedback_precision_lower", **NEGATIVE) == pytest.approx(0.025 ** (1 / 6))
    assert sample(service, "filter_feedback_precision_upper", **NEGATIVE) == 1.0
    assert sample(service, "filter_feedback_window_verdicts", **NEGATIVE) == 6


def test_invented_model_strings_are_skipped_and_never_evict_the_real_model():
    """Four verdicts with made-up filter.model values used to become four models, the fourth evicting
    the real model's window and series."""
    service = service_for(ManualClock(0.0))
    service.judge(record(0, "abuse", 0.9))
    for n in range(1, 5):
        service.judge(record(n, "ok", 0.9, model=f"made-up-{n}@x"))
    assert sample(service, "filter_feedback_invalid_total", reason="unknown_model") == 4
    assert {labels["model"] for labels in series(service, "filter_feedback_precision")} == {MODEL}
    assert sample(service, "filter_feedback_window_verdicts", **NEGATIVE) == 1


def test_a_rule_removed_by_a_reload_loses_its_series():
    clock = ManualClock(0.0)
    service = service_for(clock)
    service.judge(record(0, "abuse", 0.95, rule="very-negative", action="drop"))
    service.judge(record(1, "abuse", 0.8))
    assert {labels["rule"] for labels in series(service, "filter_feedback_precision")} == {"very-negative", "negative"}
    renamed = RoutingSettings.model_validate({"rules": [RULES[0], {**RULES[1], "name": "negative-v2"}]})
    service._reload_routing = lambda: renamed
    service.request_reload()
    service._maybe_reload()
    for name in ("filter_feedback_precision", "filter_feedback_precision_upper", "filter_feedback_window_verdicts"):
        assert {labels["rule"] for labels in series(service, name)} == {"very-negative"}, name
    assert {labels["rule"] for labels in series(service, "filter_feedback_last_verdict_timestamp_seconds")} == {
        "very-negative"
    }


def test_a_raised_min_score_keeps_only_the_verdicts_the_rule_still_takes_and_later_ones_below_it_are_skipped():
    service = service_for(ManualClock(0.0))
    for n, (verdict, score) in enumerate([("ok", 0.76), ("ok", 0.8), ("abuse", 0.86), ("abuse", 0.92)]):
        service.judge(record(n, verdict, score))
    assert sample(service, "filter_feedback_precision", **NEGATIVE) == 0.5
    raised = RoutingSettings.model_validate({"rules": [RULES[0], {**RULES[1], "min_score": 0.85}]})
    service._reload_routing = lambda: raised
    service.request_reload()
    service._maybe_reload()
    assert sample(service, "filter_feedback_precision", **NEGATIVE) == 1.0
    assert sample(service, "filter_feedback_window_verdicts", **NEGATIVE) == 2
    service.judge(record(9, "ok", 0.8))  # decided under 0.75, reviewed after the change
    assert sample(service, "filter_feedback_invalid_total", reason="below_threshold") == 1
    assert sample(service, "filter_feedback_window_verdicts", **NEGATIVE) == 2

    lowered = RoutingSettings.model_validate({"rules": [RULES[0], {**RULES[1], "min_score": 0.6}]})
    service._reload_routing = lambda: lowered
    service.request_reload()
    service._maybe_reload()
    assert sample(service, "filter_feedback_precision", **NEGATIVE) is None, (
        "a lowered threshold takes records no verdict covers: the old window would overstate the precision"
    )


def test_a_quiet_model_is_forgotten_with_its_series_and_the_newest_verdict_time_is_exported():
    clock = ManualClock(1000.0)
    service = service_for(clock, model_idle_s=3600)
    service.judge(record(0, "abuse", 0.9, at=990.0))
    stamp = {"scope": "default", "rule": "negative", "action": "quarantine"}
    assert sample(service, "filter_feedback_last_verdict_timestamp_seconds", **stamp) == 990.0
    clock.now = 990.0 + 3000
    service.expire()
    assert sample(service, "filter_feedback_precision", **NEGATIVE) == 1.0
    clock.now = 990.0 + 3601
    service.expire()
    assert series(service, "filter_feedback_precision") == []
    assert series(service, "filter_feedback_window_verdicts") == []
    assert sample(service, "filter_feedback_last_verdict_timestamp_seconds", **stamp) == 990.0, (
        "the rule's newest verdict is still that old: the alert on reviews that stopped needs it"
    )


def test_replayed_verdicts_refill_the_windows_without_counting_or_skipping_twice():
    service = service_for(ManualClock(0.0))
    service.judge(record(0, "abuse", 0.9), replayed=True)
    service.judge(record(1, "ok", 0.9, model="made-up@1"), replayed=True)
    assert sample(service, "filter_feedback_window_verdicts", **NEGATIVE) == 1
    assert sample(service, "filter_feedback_verdicts_total", **NEGATIVE, verdict="abuse") is None
    assert sample(service, "filter_feedback_invalid_total", reason="unknown_model") == 0


# ---- the precision alerts against reviewers of known precision ----

DROP = design(0.9, 20_000)  # the defaults: FILTER_FEEDBACK__DROP_FLOOR, FILTER_FEEDBACK__FALSE_PAGE_VERDICTS


def alert_expression(action: str) -> str:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return next(r["expr"] for r in rules if "precision" in r["expr"] and f'action="{action}"' in r["expr"])


def cusum_pages(precision: np.ndarray, verdicts: int, streams: int, seed: int, cusum: Cusum = DROP) -> np.ndarray:
    """Per stream, the verdict after which the CUSUM first pages (0: never within ``verdicts``). Each
    verdict is abuse with ``precision[t]`` (one value per verdict, or one for all)."""
    rng = np.random.default_rng(seed)
    precision = np.broadcast_to(precision, (verdicts,))
    value, first = np.zeros(streams), np.zeros(streams, dtype=np.int64)
    for t in range(verdicts):
        abuse = rng.random(streams) < precision[t]
        value = np.maximum(0.0, value + np.where(abuse, cusum.down, cusum.up))
        first[(value >= cusum.limit) & (first == 0)] = t + 1
    return first


def interval_pages(precision: np.ndarray, verdicts: int, streams: int, seed: int) -> np.ndarray:
    """The old alert, looked at after every verdict: the upper end of the 95 % interval over the last
    200 verdicts below 0.9, over at least 50. Per stream, the verdict after which it first paged (0: never)."""
    rng = np.random.default_rng(seed)
    abuse = (rng.random((streams, verdicts)) < np.broadcast_to(precision, (verdicts,))).astype(np.int64)
    total = np.cumsum(abuse, axis=1)
    in_window = total - np.pad(total, ((0, 0), (200, 0)))[:, :verdicts]
    size = np.minimum(np.arange(1, verdicts + 1), 200)
    upper = np.array([[clopper_pearson(k, n)[1] if k <= n else 1.0 for k in range(201)] for n in range(201)])
    paged = (size >= 50) & (upper[size, in_window] < 0.9)
    return np.where(paged.any(axis=1), np.argmax(paged, axis=1) + 1, 0)


def test_the_precision_alerts_page_on_the_sequential_evidence():
    for action in ("drop", "quarantine"):
        assert re.fullmatch(
            rf'filter_feedback_precision_evidence{{action="{action}"}} >= 1\s*', alert_expression(action)
        )


def test_a_rule_at_its_floor_pages_within_the_weekly_budget_however_often_it_is_looked_at():
    """A drop rule exactly at its 0.90 floor, 100 verdicts a day: the interval alert paged at least once
    a week in 14.7 % of weeks looked at every minute (the issue); looked at after every verdict, in 25 %
    of 400 here. The CUSUM: 2.05 % of 2000 (budget: 1 - exp(-700 / 20 000) = 3.4 %). At 500 a day: 14.5 %
    (budget 16 %; the interval: 30.6 %); at a true 0.91 and 500 a day: 2.4 % (the interval: 7.7 %)."""
    old = interval_pages(np.array(0.90), 700, 400, seed=40)
    assert np.mean(old > 0) > 0.10, "the old alert, on a week at the floor"
    week = cusum_pages(np.array(0.90), 700, 2000, seed=41)
    assert np.mean(week > 0) <= 1 - np.exp(-700 / 20_000)
    busy = cusum_pages(np.array(0.90), 3500, 2000, seed=42)
    assert np.mean(busy > 0) <= 1 - np.exp(-3500 / 20_000)
    above = cusum_pages(np.array(0.91), 3500, 2000, seed=43)
    assert np.mean(above > 0) <= 0.05


def test_the_computed_run_length_is_the_simulated_one():
    """At the floor a page comes once in 20 000 verdicts on average: 1 - exp(-1) of streams within
    20 000 (a run length is about geometric), 63 %, measured over 600 streams."""
    paged = np.mean(cusum_pages(np.array(0.90), 20_000, 600, seed=44) > 0)
    assert abs(paged - (1 - np.exp(-1))) < 0.06, paged
    assert run_length(DROP.up, DROP.down, 1, 0.1) == pytest.approx(1 / 0.1, rel=0.01), "one ok verdict pages"


def test_a_drop_is_seen_as_fast_as_before_and_a_healthy_rule_is_left_alone():
    """0.95 for 300 verdicts, then 0.85: the deployed interval alert's median delay was 75 h at 100
    verdicts a day (312.5 verdicts; the issue's simulation). The CUSUM's: 312.5 over these 1000 streams,
    bounded here by 320 (the median's sampling error over 1000 streams is about 6). Looked at after every
    verdict and without its 30 minutes, the old condition paged sooner (193), at the price of paging 86 %
    of streams at the floor within 5000 verdicts. A rule at 0.95 throughout pages within 5000 verdicts in
    at most 1 % (none of 1000 measured), and one that fell to 0.80 within 300 verdicts in 90 % or more
    (98 % measured)."""
    precision = np.r_[np.full(300, 0.95), np.full(3000, 0.85)]
    first = cusum_pages(precision, len(precision), 1000, seed=45)
    assert np.mean((first > 0) & (first <= 300)) <= 0.005
    delay = np.median(np.where(first > 300, first - 300, 10**9))
    assert delay <= 320, delay
    assert np.mean(cusum_pages(np.array(0.95), 5000, 1000, seed=46) > 0) <= 0.01
    fell = cusum_pages(np.r_[np.full(300, 0.95), np.full(300, 0.80)], 600, 1000, seed=47)
    assert np.mean((fell > 300) & (fell <= 600)) >= 0.9


def test_the_service_exports_the_cusum_as_a_share_of_the_sum_that_pages():
    """Each new source steps its rule's CUSUM once; a repeat does not; a raised threshold starts it afresh."""
    service = service_for(ManualClock(0.0), rules=RULES)
    very = {"scope": "default", "rule": "very-negative", "action": "drop", "model": MODEL}
    expected = 0.0
    for n, verdict in enumerate(["ok", "ok", "abuse", "ok"] * 5):
        service.judge(record(n, verdict, 0.95, rule="very-negative", action="drop"))
        expected = DROP.step(expected, verdict == "abuse")
    service.judge(record(0, "ok", 0.95, rule="very-negative", action="drop"))  # delivered twice
    assert sample(service, "filter_feedback_precision_evidence", **very) == pytest.approx(expected / DROP.limit)
    assert expected / DROP.limit >= 1, "15 ok of 20 pages"
    raised = [{**RULES[0], "min_score": 0.92}, RULES[1]]
    service._apply_rules(RuleIndex(RoutingSettings.model_validate({"rules": raised})))
    assert sample(service, "filter_feedback_precision_evidence", **very) == 0.0


def drawn(n: int, verdict: str, negative: float, probability: float, action: str = "allow", rule: str = "default"):
    scores = orjson.dumps({"very-negative": negative / 2, "negative": negative})
    return record(
        n,
        verdict,
        negative,
        rule=rule,
        action=action,
        filter_sampled=b"true",
        **{"filter_sample-probability": str(probability).encode(), "filter_rule-scores": scores},
    )


def test_drawn_verdicts_become_recall_and_prevalence_and_leave_with_their_rule():
    service = service_for(ManualClock(0.0))
    # 10 drawn from the quarantined (1 in 100 drawn), 4 of them abuse; 20 allowed ones (1 in 10), 2 abuse.
    for n in range(10):
        service.judge(drawn(n, "abuse" if n < 4 else "ok", 0.8, 0.01, action="quarantine", rule="negative"))
    for n in range(10, 30):
        service.judge(drawn(n, "abuse" if n < 12 else "ok", 0.5, 0.1))
    scope = {"scope": "default", "model": MODEL}
    # Weighted: abuse 4 x 100 + 2 x 10 = 420 of 10 x 100 + 20 x 10 = 1200 records; negative takes 400 of 420.
    assert sample(service, "filter_feedback_prevalence", **scope) == pytest.approx(420 / 1200)
    assert sample(service, "filter_feedback_recall", **scope, rule="negative") == pytest.approx(400 / 420)
    assert sample(service, "filter_feedback_recall", **scope, rule="very-negative") == 0.0
    assert sample(service, "filter_feedback_scope_recall", **scope) == pytest.approx(400 / 420)
    low = sample(service, "filter_feedback_recall_lower", **scope, rule="negative")
    assert 0.0 < low < 400 / 420 < sample(service, "filter_feedback_recall_upper", **scope, rule="negative")
    assert sample(service, "filter_feedback_sample_window_verdicts", **scope) == 30
    assert sample(service, "filter_feedback_sampled_verdicts_total", **scope, verdict="abuse") == 6
    # The quarantined ones are verdicts on the rule's decisions too: its precision.
    assert sample(service, "filter_feedback_precision", **NEGATIVE) == 0.4
    assert sample(service, "filter_feedback_invalid_total", reason="not_moderated") == 0

    # Lowering negative to 0.45 takes the allowed ones too (decided again from their rule scores).
    lowered = RoutingSettings.model_validate({"rules": [RULES[0], {**RULES[1], "min_score": 0.45}]})
    service._reload_routing = lambda: lowered
    service.request_reload()
    service._maybe_reload()
    assert sample(service, "filter_feedback_recall", **scope, rule="negative") == 1.0
    removed = RoutingSettings.model_validate({"rules": [RULES[0]]})
    service._reload_routing = lambda: removed
    service.request_reload()
    service._maybe_reload()
    assert {labels["rule"] for labels in series(service, "filter_feedback_recall")} == {"very-negative"}
