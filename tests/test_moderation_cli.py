"""Scopes, verdicts and drift through the console script: real processes, output and exit codes."""

from __future__ import annotations

import csv
import json

import orjson
import pytest

from filter_worker.pipeline.drift import SCORE_EDGES, histogram, load_reference
from filter_worker.pipeline.routing import Router
from tests.test_cli import cli

KIDS = {
    "name": "kids",
    "match": {"header": "tenant", "values": ["kids-app"]},
    "rules": [{"action": "drop", "labels": ["Negative"], "min_score": 0.5, "name": "no-negativity"}],
}
GERMAN = {
    "name": "de",
    "match": {"field": "lang", "values": ["de"]},
    "rules": [{"action": "quarantine", "labels": ["Very Negative"], "min_score": 0.5, "name": "de-hostile"}],
}
SCOPES = json.dumps([KIDS, GERMAN])
MODEL_A = "acme/keyword@0123#sha256:00112233aabbccdd"


def test_classify_decides_with_a_scopes_rules(keyword_model):
    result = cli(
        "classify",
        "so annoying",
        "hello",
        "--scope",
        "kids",
        "--model",
        str(keyword_model),
        FILTER_ROUTING__SCOPES=SCOPES,
    )
    assert result.returncode == 0, result.stderr
    annoying, hello = (orjson.loads(line) for line in result.stdout.splitlines())
    assert (annoying["action"], annoying["rule"], annoying["scope"]) == ("drop", "no-negativity", "kids")
    assert set(annoying["rule_scores"]) == {"no-negativity"} and annoying["rule_scores"]["no-negativity"] > 0.5
    assert (hello["action"], hello["scope"]) == ("allow", "kids")
    unknown = cli("classify", "x", "--scope", "adults", "--model", str(keyword_model), FILTER_ROUTING__SCOPES=SCOPES)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert (
        unknown.stderr.strip()
        == "filter-worker: --scope adults: no such scope; FILTER_ROUTING__SCOPES gives ['default', 'kids', 'de']"
    )


def write_rows(path, rows, header=("text", "label", "lang", "tenant")):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [
    ("so annoying", "Negative", "en", "kids-app"),  # kids: drop by no-negativity
    ("hello", "Neutral", "en", "kids-app"),  # kids: allow
    ("das ist ein idiot", "Very Negative", "de", "news"),  # de: quarantine by de-hostile
    ("guten Morgen", "Neutral", "de", ""),  # de: allow
    ("you idiot", "Very Negative", "en", "news"),  # default: drop by very-negative
    ("so broken", "Negative", "en", ""),  # default: quarantine by negative
]


def test_eval_breaks_action_rates_down_by_the_scope_each_row_selects(keyword_model, tmp_path):
    data = write_rows(tmp_path / "d.csv", ROWS)
    out = tmp_path / "eval.json"
    result = cli(
        "eval", str(data), "--model", str(keyword_model), "--out-json", str(out), FILTER_ROUTING__SCOPES=SCOPES
    )
    assert result.returncode == 0, result.stderr
    by_scope = orjson.loads(out.read_bytes())["actions"]["by_scope"]
    counts = {scope: {a: v["count"] for a, v in s["actions"].items()} for scope, s in by_scope.items()}
    assert counts == {
        "default": {"allow": 0, "quarantine": 1, "drop": 1},
        "kids": {"allow": 1, "quarantine": 0, "drop": 1},
        "de": {"allow": 1, "quarantine": 1, "drop": 0},
    }
    assert "actions by scope" in result.stdout and "  kids (2 examples): allow 1 (50.0%)" in result.stdout

    # --scope: the whole file is taken as the kids' traffic.
    forced = cli(
        "eval",
        str(data),
        "--model",
        str(keyword_model),
        "--scope",
        "kids",
        "--out-json",
        str(out),
        FILTER_ROUTING__SCOPES=SCOPES,
    )
    assert forced.returncode == 0, forced.stderr
    by_scope = orjson.loads(out.read_bytes())["actions"]["by_scope"]
    assert {s: v["examples"] for s, v in by_scope.items()} == {"default": 0, "kids": 6, "de": 0}
    assert "  de (0 examples): no row selects this scope" in forced.stdout

    # Without the columns a scope matches on, every row is default: the breakdown says so.
    plain = write_rows(tmp_path / "plain.csv", [r[:2] for r in ROWS], header=("text", "label"))
    result = cli("eval", str(plain), "--model", str(keyword_model), FILTER_ROUTING__SCOPES=SCOPES)
    assert (
        "  default (6 examples)" in result.stdout and "  kids (0 examples): no row selects this scope" in result.stdout
    )


def verdict_line(
    n: int, verdict: str, score: float, model: str = MODEL_A, rule: str = "negative", scope: str = "default"
) -> str:
    headers = {
        "filter.action": "quarantine" if rule == "negative" else "drop",
        "filter.rule": rule,
        "filter.scope": scope,
        "filter.score": f"{score:.6f}",
        "filter.model": model,
    }
    return orjson.dumps({"headers": headers, "value": {"source": f"messages/0/{n}", "verdict": verdict}}).decode()


def calibrate_feedback(path, *extra: str, **env: str):
    return cli("calibrate", "--from-feedback", str(path), "--rule", "negative", "--resamples", "100", *extra, **env)


def test_calibrate_from_a_verdict_export(tmp_path):
    export = tmp_path / "verdicts.jsonl"
    scores = [0.76, 0.8, 0.84, 0.86, 0.9, 0.92, 0.94, 0.96, 0.98]
    lines = [verdict_line(i, "abuse" if s >= 0.86 else "ok", s) for i, s in enumerate(scores)]
    lines += [
        verdict_line(50, "abuse", 0.99, rule="very-negative"),
        verdict_line(51, "abuse", 0.8, scope="kids", rule="no-negativity"),
        verdict_line(52, "ok", 0.55, scope="kids", rule="no-negativity"),
    ]
    lines.append(orjson.dumps({"headers": {}, "value": "not json"}).decode())
    export.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = calibrate_feedback(export, "--target-precision", "0.9")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"9 verdicts on rule negative (scope default, model {MODEL_A}; 'abuse' is positive)")
    assert first.endswith("verdict records skipped: {'not_json': 1}")
    assert "6 of 9 verdicts are positive" in result.stdout and "min_score 0.860000: precision 1.0000" in result.stdout
    assert "never lowering it" in result.stdout
    assert "from 0.75 to 0.860000 stops taking 3 of the reviewed records (3 judged ok)" in result.stdout
    rule = orjson.loads(result.stdout.splitlines()[-1])
    assert rule == {
        "action": "quarantine",
        "labels": ["Very Negative", "Negative"],
        "min_score": 0.86,
        "name": "negative",
    }

    # All verdicts together have precision 6/9 >= 0.6: nothing supports raising the current 0.75.
    keep = calibrate_feedback(export, "--target-precision", "0.6")
    assert keep.returncode == 0, keep.stderr
    assert "All 9 verdicts together reach precision 0.6: keep the current min_score 0.75." in keep.stdout
    assert orjson.loads(keep.stdout.splitlines()[-1])["min_score"] == 0.75

    # A scope's rule: only verdicts of that scope count.
    kids = cli(
        "calibrate",
        "--from-feedback",
        str(export),
        "--scope",
        "kids",
        "--rule",
        "no-negativity",
        "--target-precision",
        "0.9",
        "--resamples",
        "10",
        FILTER_ROUTING__SCOPES=SCOPES,
    )
    assert kids.returncode == 0, kids.stderr
    assert (
        "2 verdicts on rule no-negativity (scope kids" in kids.stdout
        and "in scope kids of FILTER_ROUTING__SCOPES" in kids.stdout
    )


def test_calibrate_from_feedback_refuses_what_it_cannot_judge(tmp_path):
    export = tmp_path / "verdicts.jsonl"
    export.write_text(verdict_line(1, "abuse", 0.9) + "\n" + verdict_line(2, "ok", 0.8, model="acme/other@1") + "\n")
    mixed = calibrate_feedback(export, "--target-precision", "0.9")
    assert mixed.returncode == 2 and "come from 2 models" in mixed.stderr and "--feedback-model" in mixed.stderr
    one = calibrate_feedback(export, "--target-precision", "0.9", "--feedback-model", MODEL_A)
    assert one.returncode == 0, one.stderr
    for args, message in [
        (
            ["--rule", "nope"],
            "--rule nope: scope default has no such rule; its rules are ['very-negative', 'negative']",
        ),
        (["--action", "drop"], "--action, --labels and --name go with DATA"),
    ]:
        result = cli("calibrate", "--from-feedback", str(export), "--target-precision", "0.9", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    both = cli("calibrate", str(export), "--from-feedback", str(export), "--target-precision", "0.9")
    assert both.returncode == 2 and "either DATA (labeled examples) or --from-feedback" in both.stderr
    norule = cli("calibrate", "--from-feedback", str(export), "--target-precision", "0.9")
    assert norule.returncode == 2 and "needs --rule NAME" in norule.stderr
    export.write_text(verdict_line(1, "abuse", 0.9) + "\n{broken\n")
    broken = calibrate_feedback(export, "--target-precision", "0.9")
    assert broken.returncode == 2 and f"--from-feedback {export} line 2: not valid JSON" in broken.stderr
    export.write_text(verdict_line(1, "ok", 0.9) + "\n")
    all_ok = calibrate_feedback(export, "--target-precision", "0.9")
    assert all_ok.returncode == 2 and "every verdict on rule negative is 'ok'" in all_ok.stderr


def test_drift_snapshot_writes_each_scopes_score_distributions(keyword_model, tmp_path):
    data = tmp_path / "sample.jsonl"
    rows = [
        {"text": t, "lang": lang}
        for t, lang in [("you idiot", "en"), ("hello", "en"), ("so broken", "en"), ("idiot", "de"), ("guten Tag", "de")]
    ]
    data.write_text("".join(orjson.dumps(r).decode() + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "ref.json"
    result = cli(
        "drift", "snapshot", str(data), "--out", str(out), "--model", str(keyword_model), FILTER_ROUTING__SCOPES=SCOPES
    )
    assert result.returncode == 0, result.stderr
    assert "scope kids: left out (no row selects it)" in result.stdout
    assert "scope default: 3 records, rules ['very-negative', 'negative']" in result.stdout
    reference = load_reference(out)
    assert reference.records == {"default": 3, "de": 2}
    assert reference.rules["de"]["de-hostile"].labels == ("Very Negative",)

    # The counts are the histogram of exactly the scores the router computes for those rows.
    from filter_worker.config import load_settings
    from filter_worker.model import Classifier

    settings = load_settings(routing={"scopes": [KIDS, GERMAN]})
    model = Classifier.load(settings.model.model_copy(update={"name": str(keyword_model)}))
    router = Router(settings.routing, model.labels)
    probs, _ = model.classify(["you idiot", "hello", "so broken"])
    negative = router.rule_scores(probs, "default")[:, 1]
    assert reference.rules["default"]["negative"].counts.tolist() == histogram(negative, SCORE_EDGES).tolist()
    assert reference.model == model.identity

    unlabeled_scope = cli(
        "drift", "snapshot", str(data), "--out", str(out), "--scope", "nope", "--model", str(keyword_model)
    )
    assert unlabeled_scope.returncode == 2 and "--scope nope: no such scope" in unlabeled_scope.stderr


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["feedback"], "FILTER_FEEDBACK__WINDOW", "0"),
        (["feedback"], "FILTER_FEEDBACK__TOPIC", "messages"),
        (["run"], "FILTER_DRIFT__WINDOW", "10"),
        (
            ["classify", "x"],
            "FILTER_ROUTING__SCOPES",
            '[{"name": "default", "match": {"header": "t", "values": ["a"]}, "rules": []}]',
        ),
    ],
)
def test_bad_moderation_settings_exit_2_naming_the_setting(command, variable, value):
    result = cli(*command, **{variable: value})
    assert result.returncode == 2, result.stderr
    name = "FILTER_FEEDBACK__TOPIC" if value == "messages" else variable
    assert name in result.stderr and "Traceback" not in result.stderr
