"""Evaluation and calibration results for people: a terminal summary, and a self-contained HTML report.

The HTML file embeds its charts as base64 PNGs (drawn with matplotlib's object API, no display or
global backend needed), so it can be attached to a ticket or a model review as one file. matplotlib
is an optional extra (``pip install 'filter-worker[eval]'``): worker images do not need it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from filter_worker.config import ConfigError
from filter_worker.moderation.windows import Estimate
from filter_worker.tools.calibration import Calibration
from filter_worker.tools.evaluation import Curve, Evaluation, Scores
from filter_worker.tools.verdict_calibration import GRID, LEVEL, VerdictCalibration


def require_matplotlib() -> None:
    """Fail before the model is loaded, not after minutes of classification."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--report needs matplotlib: pip install 'filter-worker[eval]'") from None


# ---- terminal ----


def _rate(count: int, total: int) -> str:
    return f"{count} ({100.0 * count / total:.1f}%)" if total else str(count)


def _scores_text(s: Scores) -> list[str]:
    width = max([len(label) for label in s.labels] + [7])
    lines = [
        f"accuracy {s.accuracy:.4f}   macro-F1 {s.macro_f1:.4f}   ({s.examples} examples)",
        "",
        f"{'label':<{width}}  precision  recall     f1  support",
    ]
    for label, x in s.per_label.items():
        lines.append(f"{label:<{width}}  {x.precision:9.4f}  {x.recall:6.4f}  {x.f1:.4f}  {x.support:7d}")
    lines += ["", "confusion matrix (rows: gold, columns: predicted)"]
    cell = max(width, 6)
    lines.append(" " * width + "".join(f"  {label[:cell]:>{cell}}" for label in s.labels))
    for label, row in zip(s.labels, s.confusion, strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"  {int(v):>{cell}}" for v in row))
    return lines


def evaluation_text(result: Evaluation, model: str, data: str) -> str:
    """The terminal table of ``filter-worker eval``."""
    lines = [f"model {model}", f"data  {data}", "", *_scores_text(result.overall)]
    if result.by_language:
        lines += ["", "per language"]
        for lang, s in result.by_language.items():
            lines.append(
                f"  {lang:<10} accuracy {s.accuracy:.4f}   macro-F1 {s.macro_f1:.4f}   ({s.examples} examples)"
            )
    total = sum(result.actions.values())
    lines += ["", "actions under the routing rules"]
    lines.append("  " + "   ".join(f"{a} {_rate(c, total)}" for a, c in result.actions.items()))
    for label, counts in sorted(result.actions_by_label.items()):
        n = sum(counts.values())
        lines.append(f"  gold {label}: " + "   ".join(f"{a} {_rate(c, n)}" for a, c in counts.items()))
    if len(result.actions_by_scope) > 1:
        lines += ["", "actions by scope (each row's scope from its columns, as FILTER_ROUTING__SCOPES matches records)"]
        for scope, counts in result.actions_by_scope.items():
            n = sum(counts.values())
            rates = "   ".join(f"{a} {_rate(c, n)}" for a, c in counts.items()) if n else "no row selects this scope"
            lines.append(f"  {scope} ({n} examples): {rates}")
    return "\n".join(lines) + "\n"


def _interval(value: tuple[float, float] | None) -> str:
    return f"[{value[0]:.4f}, {value[1]:.4f}]" if value else "n/a"


def calibration_text(result: Calibration, action: str, labels: Sequence[str], unit: str = "examples") -> str:
    """The readable part of ``filter-worker calibrate`` (the rule itself is printed after it); ``unit``
    names what was counted (labeled examples, or reviewers' verdicts)."""
    level = f"{100 * result.confidence:.0f}%"
    head = (
        f"{action} when {' + '.join(labels)} >= min_score; {result.positives} of {result.examples} {unit} "
        f"are positive; target precision {result.target_precision}"
    )
    if not result.meets_target:
        return (
            f"{head}\nno min_score reaches precision {result.target_precision} on this data; the best is "
            f"{result.precision:.4f} (recall {result.recall:.4f}) at min_score {result.threshold:.6f}\n"
        )
    return (
        f"{head}\n"
        f"min_score {result.threshold:.6f}: "
        f"precision {result.precision:.4f} {level} {_interval(result.precision_interval)}, "
        f"recall {result.recall:.4f} {level} {_interval(result.recall_interval)}, takes {result.taken} {unit}\n"
        f"bootstrap ({result.resamples} resamples): min_score {level} {_interval(result.threshold_interval)}, "
        f"target reached in {100 * result.reached_share:.1f}% of resamples\n"
    )


def _estimate(estimate: Estimate) -> str:
    return f"{estimate.value:.4f} 95% [{estimate.low:.4f}, {estimate.high:.4f}]"


def verdict_calibration_text(result: VerdictCalibration, action: str, labels: Sequence[str], unit: str) -> str:
    """What ``calibrate --from-feedback`` found, line by line, after its first line (the verdicts counted)
    and before its advice; ``unit`` is "verdicts"."""
    target = result.target_precision
    lines = [
        f"{action} when {' + '.join(labels)} >= min_score (in force: {result.current}); {result.abuse} of "
        f"{result.reviewed} {unit} are abuse; target precision {target}"
    ]
    if result.refused:
        lines.append(
            f"{result.reviewed} {unit} at or above the min_score in force: {result.needed} {unit} at or above the "
            f"min_score in force are needed to show precision {target} even if every one is abuse (at the "
            f"{100 * LEVEL:g}% level each threshold of the scan is tested at); {result.needed - result.reviewed} more"
        )
    if result.taken:
        where = "proposed" if result.threshold is not None else "closest to the target"
        shown = result.threshold if result.threshold is not None else result.best
        lines.append(
            f"min_score {shown:.6f} ({where}): precision {_estimate(result.precision)} (Clopper-Pearson), recall "
            f"among the reviewed {_estimate(result.recall)}, takes {result.taken} {unit}"
        )
    lines.append(
        f"A min_score is proposed only where the lower end of its precision interval reaches the target at the "
        f"{100 * LEVEL:g}% level: the lowest such one of {GRID} at or above the min_score in force (every tenth of "
        f"the {unit} by score), so that all {GRID} together claim a target the truth misses at most "
        f"{100 * LEVEL * GRID:g}% of the time."
    )
    if result.resamples and result.reviewed:
        spread = f"min_score 95% {_interval(result.threshold_interval)}; " if result.threshold_interval else ""
        lines.append(
            f"bootstrap: {result.resamples} resamples of the {result.reviewed} {unit} (drawn with replacement), the "
            f"whole choice repeated on each: {spread}some min_score passed in {100 * result.passed_share:.1f}% of them"
        )
    return "\n".join(lines) + "\n"


# ---- HTML ----


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return '<img alt="chart" src="data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode() + '">'


def _confusion_image(s: Scores) -> str:
    from matplotlib.figure import Figure

    n = len(s.labels)
    figure = Figure(figsize=(1.1 * n + 2.5, 1.0 * n + 1.8))
    ax = figure.add_subplot()
    totals = s.confusion.sum(axis=1, keepdims=True)
    shares = np.divide(s.confusion, totals, out=np.zeros(s.confusion.shape), where=totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(s.confusion):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), s.labels, rotation=30, ha="right")
    ax.set_yticks(range(n), s.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    figure.colorbar(image, ax=ax, label="share of the gold row")
    return _png(figure)


def _pr_image(result: Evaluation) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.add_subplot()
    for label, curve in result.curves.items():
        ax.plot(curve.recall, curve.precision, marker="o", markersize=3, label=label)  # one point per threshold
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(title="label (its probability as the score)", fontsize="small")
    return _png(figure)


class ThresholdChart(Protocol):
    """What the threshold chart draws: both calibrations (labeled data, reviewers' verdicts) have it."""

    @property
    def curve(self) -> Curve: ...

    @property
    def target_precision(self) -> float: ...

    @property
    def proposed(self) -> float | None: ...


def _threshold_image(result: ThresholdChart) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.add_subplot()
    curve = result.curve
    # A value holds from the next lower threshold up to its own (selection is score >= min_score):
    # ascending thresholds with "steps-pre" draw exactly that.
    ax.plot(curve.thresholds[::-1], curve.precision[::-1], drawstyle="steps-pre", label="precision")
    ax.plot(curve.thresholds[::-1], curve.recall[::-1], drawstyle="steps-pre", label="recall")
    ax.axhline(result.target_precision, color="grey", linestyle=":", label="target precision")
    if result.proposed is not None:
        ax.axvline(result.proposed, color="black", linestyle="--", label=f"min_score {result.proposed:.4f}")
    ax.set_xlabel("min_score (rule score >= min_score is taken)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(figure)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
code, pre { background: #f4f4f4; padding: 0.1em 0.3em; }
"""


def _page(title: str, body: list[str]) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = [f"<table><tr>{cells}</tr>"]
    for row in rows:
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return "".join(lines) + "</table>"


def _scores_html(s: Scores) -> list[str]:
    return [
        f"<p>accuracy <b>{s.accuracy:.4f}</b>, macro-F1 <b>{s.macro_f1:.4f}</b> on {s.examples} examples</p>",
        _table(
            ["label", "precision", "recall", "F1", "support"],
            [[k, f"{v.precision:.4f}", f"{v.recall:.4f}", f"{v.f1:.4f}", v.support] for k, v in s.per_label.items()],
        ),
    ]


def write_evaluation_html(path: str | Path, result: Evaluation, model: str, data: str) -> None:
    overall = result.overall
    total = sum(result.actions.values())
    body = [
        f"<p>model <code>{html.escape(model)}</code>, data <code>{html.escape(data)}</code></p>",
        *_scores_html(overall),
        "<h2>Confusion matrix</h2>",
        _confusion_image(overall),
        "<h2>Precision and recall per label</h2>",
        "<p>Each label's probability used as a score: the curve a rule on that label alone moves along.</p>",
        _pr_image(result),
    ]
    if result.by_language:
        body += ["<h2>Per language</h2>"]
        for lang, s in result.by_language.items():
            body += [f"<h3>{html.escape(lang)}</h3>", *_scores_html(s)]
    body += [
        "<h2>Actions under the routing rules</h2>",
        _table(
            ["gold label", *result.actions],
            [["all", *(_rate(c, total) for c in result.actions.values())]]
            + [
                [label, *(_rate(c, sum(counts.values())) for c in counts.values())]
                for label, counts in sorted(result.actions_by_label.items())
            ],
        ),
    ]
    if len(result.actions_by_scope) > 1:
        body += [
            "<h2>Actions by scope</h2>",
            _table(
                ["scope", "examples", *result.actions],
                [
                    [scope, sum(counts.values()), *(_rate(c, sum(counts.values())) for c in counts.values())]
                    for scope, counts in result.actions_by_scope.items()
                ],
            ),
        ]
    Path(path).write_text(_page("filter-worker evaluation", body), encoding="utf-8")


def write_calibration_html(
    path: str | Path, result: ThresholdChart, rule: dict[str, object] | None, model: str, data: str, text: str
) -> None:
    body = [
        f"<p>model <code>{html.escape(model)}</code>, data <code>{html.escape(data)}</code></p>",
        f"<pre>{html.escape(text)}</pre>",
    ]
    if rule is not None:
        body.append(f"<p>Rule for <code>FILTER_ROUTING__RULES</code>:</p><pre>{html.escape(json.dumps(rule))}</pre>")
    body += ["<h2>Precision and recall against the threshold</h2>", _threshold_image(result)]
    Path(path).write_text(_page("filter-worker calibration", body), encoding="utf-8")
