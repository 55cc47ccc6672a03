"""Reports: the HTML file is self-contained (charts embedded as PNGs) and escapes what came from the data."""

from __future__ import annotations

import base64
import re

import numpy as np

from filter_worker.config import RoutingSettings
from filter_worker.model.head import Head
from filter_worker.pipeline.routing import Router
from filter_worker.tools.calibration import calibrate
from filter_worker.tools.evaluation import Example, evaluate
from filter_worker.tools.report import calibration_text, evaluation_text, write_calibration_html, write_evaluation_html

LABELS = ["Very Negative", "Negative", "Neutral", "Positive", "Very Positive"]
HEAD = Head(tuple(LABELS), "softmax")
PNG = re.compile(r'<img alt="chart" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def images(path) -> list[bytes]:
    return [base64.b64decode(b) for b in PNG.findall(path.read_text(encoding="utf-8"))]


def test_evaluation_report_embeds_the_heat_map_and_curves(tmp_path):
    examples = [Example("a", "Neutral", "<b>en</b>"), Example("b", "Negative", "<b>en</b>"), Example("c", "Neutral")]
    probs = np.array([[0.0, 0.1, 0.9, 0.0, 0.0], [0.0, 0.8, 0.2, 0.0, 0.0], [0.95, 0.0, 0.05, 0.0, 0.0]], np.float32)
    result = evaluate(examples, probs, LABELS, Router(RoutingSettings(), HEAD))
    path = tmp_path / "eval.html"
    write_evaluation_html(path, result, "m@rev", "data.csv")
    pngs = images(path)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in pngs)
    html = path.read_text(encoding="utf-8")
    assert "&lt;b&gt;en&lt;/b&gt;" in html and "<b>en</b>" not in html
    assert "accuracy <b>0.6667</b>" in html
    text = evaluation_text(result, "m@rev", "data.csv")
    assert "accuracy 0.6667" in text and "drop 1 (33.3%)" in text


def test_calibration_report_embeds_the_threshold_chart(tmp_path):
    result = calibrate(np.array([0.9, 0.8, 0.7]), np.array([True, True, False]), 0.9, resamples=20)
    text = calibration_text(result, "quarantine", ["Negative"])
    assert "min_score 0.800000: precision 1.0000" in text
    path = tmp_path / "cal.html"
    write_calibration_html(path, result, {"action": "quarantine", "min_score": 0.8}, "m@rev", "d.csv", text)
    assert len(images(path)) == 1
    assert "FILTER_ROUTING__RULES" in path.read_text(encoding="utf-8")
