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
from filter_worker.moderation.feedback import FeedbackService
from filter_worker.moderation.windows import Key, PrecisionWindows
from filter_worker.pipeline.records import InputRecord
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


def alert_condition(action: str) -> tuple[float, int]:
    """(floor, fewest verdicts) of the deployed precision alert for ``action``, read from its expression."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    expr = next(r["expr"] for r in rules if "precision" in r["expr"] and f'action="{action}"' in r["expr"])
    floor = float(re.search(r"filter_feedback_precision_upper\{[^}]*\}\s*<\s*([0-9.]+)", expr).group(1))
    fewest = int(re.search(r"filter_feedback_window_verdicts\s*>=\s*(\d+)", expr).group(1))
    return floor, fewest


def pages(stream: np.ndarray, window: int, floor: float, fewest: int) -> np.ndarray:
    """After each verdict: whether the alert condition holds on the window's interval (no "for" delay)."""
    windows = PrecisionWindows(window)
    key = Key("default", "r", "drop", "m")
    fired = np.zeros(len(stream), dtype=bool)
    for i, abuse in enumerate(stream):
        windows.add(key, str(i), bool(abuse), 1.0)
        estimate = windows.precision(key)
        fired[i] = estimate.size >= fewest and estimate.high < floor
    return fired


def pages_on_the_point_estimate(stream: np.ndarray, window: int) -> bool:
    """The old alert: precision under 0.9 over at least 50 verdicts, at any point of the stream."""
    total = np.cumsum(stream)
    size = np.minimum(np.arange(1, len(stream) + 1), window)
    abuse = total.copy()
    abuse[window:] -= total[:-window]
    return bool(((size >= 50) & (abuse / size < 0.9)).any())


def test_the_drop_precision_alert_pages_on_evidence_not_on_noise():
    """A 95 %-precise drop rule used to page falsely in about a quarter of 5000-verdict streams (point
    estimate under 0.9 over 50 verdicts; 47 of 200 here). Paging on the interval's upper end: at most
    one stream in a hundred; exactly at the floor, at most the interval's one-sided 2.5 % per look; a
    rule that fell to 80 % pages within a window's worth of verdicts."""
    floor, fewest = alert_condition("drop")
    assert (floor, fewest) == (0.9, 50)
    rng = np.random.default_rng(31)
    streams = [rng.random(5000) < 0.95 for _ in range(200)]
    sound = [pages(stream, 200, floor, fewest).any() for stream in streams]
    assert np.mean(sound) <= 0.01
    point_estimate = [pages_on_the_point_estimate(stream, 200) for stream in streams]
    assert np.mean(point_estimate) > 0.15, "the old condition, on the same streams"
    at_floor = np.concatenate([pages(rng.random(400) < 0.90, 200, floor, fewest)[199::200] for _ in range(400)])
    assert np.mean(at_floor) <= 0.025
    within_200, within_300 = [], []
    for _ in range(200):
        stream = np.concatenate([rng.random(300) < 0.95, rng.random(300) < 0.80])
        fired = pages(stream, 200, floor, fewest)
        assert not fired[:300].any()
        within_200.append(fired[300:500].any())
        within_300.append(fired[300:600].any())
    assert np.mean(within_200) >= 0.95 and np.mean(within_300) >= 0.99


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
