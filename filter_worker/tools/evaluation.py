"""How well the model does on labeled data: loading the data, and the metrics (pure functions).

A model card's numbers were measured on someone else's data; what matters is how the model and the
routing rules behave on yours. Metrics follow scikit-learn's conventions (a ratio with a zero
denominator is 0; macro averages run over the labels that occur in the gold labels or predictions),
so the numbers can be cross-checked with it. The predicted label is the top label, as a model card
counts it; the action rates show what the routing rules would do with the same records.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from filter_worker.config import DEFAULT_SCOPE, ConfigError, RoutingSettings
from filter_worker.pipeline.routing import ACTIONS, Router, ScopeMatcher

UNKNOWN_LANGUAGE = "unknown"


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    label: str  # after the label map: a model label
    lang: str | None = None
    scope: str = DEFAULT_SCOPE  # the routing scope the row's columns select (``scope_of_row``)


def parse_label_map(text: str | None) -> dict[str, str]:
    """``--label-map '{"spam": "toxic", "ham": "non-toxic"}'``: data label -> model label."""
    if not text:
        return {}
    try:
        mapping = orjson.loads(text)
    except orjson.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ConfigError('--label-map must be a JSON object of data label to model label, e.g. \'{"spam": "toxic"}\'')
    return {str(k): v for k, v in mapping.items()}


def _rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    """(line number, row) pairs from a CSV file with a header line, or a JSON-lines file.

    CSV has no nesting, so a column named like a dotted path (``meta.lang``) becomes the nested field
    a routing scope looks up, as in a JSON value.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _csv_rows(path)
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl_rows(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    raise ConfigError(f"{path}: the data must be a .csv file with a header line or a .jsonl file")


# Texts far longer than the model reads are still data (the model cuts them): the csv module's
# default field limit (128 KiB) would refuse them. The limit is process-wide; this only raises it.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024
_EXTRA = object()  # the key DictReader files surplus fields under


def _csv_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, restkey=_EXTRA)  # type: ignore[call-overload]  # any hashable restkey works
        try:
            for row in reader:
                extra = row.pop(_EXTRA, None)
                if extra is not None:
                    header = reader.fieldnames or []
                    raise ConfigError(
                        f"{path} line {reader.line_num}: {len(header) + len(extra)} fields, but the header names "
                        f"{len(header)} ({', '.join(header)}); a comma in an unquoted field? Quote fields that hold "
                        "commas"
                    )
                rows.append((reader.line_num, _nested(row)))
        except csv.Error as exc:
            raise ConfigError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    return rows


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:  # orjson: nesting is limited (json.loads recursed until Python's stack ran out), lone surrogates refused
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ConfigError(f"{path} line {n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path} line {n}: not a JSON object")
        rows.append((n, row))
    return rows


def _nested(row: dict[str, object]) -> dict[str, object]:
    """``{"meta.lang": "de"}`` also as ``{"meta": {"lang": "de"}}``; flat columns stay as they are."""
    nested: dict[str, object] = dict(row)
    for key, value in row.items():
        if "." not in key:
            continue
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break  # a flat column of that name wins
            node = child
        else:
            node.setdefault(last, value)
    return nested


def scope_of_row(row: dict[str, object], scopes: ScopeMatcher) -> str:
    """A data row's routing scope: header scopes read the column named like the header, field scopes
    the (dotted) field, topic scopes the column ``topic``. A row without them gets ``default``, as a
    live record without them would."""
    headers = [(name, str(row[name]).encode()) for name in scopes.header_names if row.get(name) not in (None, "")]
    topic = row.get("topic")
    return scopes.scope_of(headers, row, str(topic) if topic not in (None, "") else None)


def _read(path: str | Path) -> list[tuple[int, dict[str, object]]]:
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"{path}: no such file")
    rows = _rows(source)
    if not rows:
        raise ConfigError(f"{path}: no examples")
    return rows


def _required(path: str | Path, line: int, row: dict[str, object], name: str) -> object:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{path} line {line}: no value for field '{name}' (fields: {sorted(row)})")
    return value


def _text(path: str | Path, line: int, row: dict[str, object], name: str) -> str:
    text = _required(path, line, row, name)
    if not isinstance(text, str):
        raise ConfigError(f"{path} line {line}: field '{name}' is not text")
    return text


def load_examples(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    lang_field: str | None = None,
    label_map: Mapping[str, str] | None = None,
    scopes: ScopeMatcher | None = None,
) -> list[Example]:
    """Read labeled examples, mapping data labels onto model labels. Errors name the file, line and field.

    A row without the language field counts as language ``unknown``; a row without text or label is
    an error, since silently skipping it would change the metrics. With ``scopes`` each example gets
    the routing scope its columns select.
    """
    mapping = dict(label_map or {})
    examples = []
    for line, row in _read(path):
        text = _text(path, line, row, text_field)
        label = _required(path, line, row, label_field)
        lang = row.get(lang_field) if lang_field else None
        examples.append(
            Example(
                text,
                mapping.get(str(label), str(label)),
                (str(lang) if lang not in (None, "") else UNKNOWN_LANGUAGE) if lang_field else None,
                scope_of_row(row, scopes) if scopes is not None else DEFAULT_SCOPE,
            )
        )
    return examples


def load_training_examples(
    path: str | Path, text_field: str, label_field: str, label_map: Mapping[str, str] | None = None
) -> tuple[list[Example], int]:
    """Labeled examples for training, and how many rows had an empty or missing text (skipped: a model
    learns nothing from them, and the count is reported). A row without a label is still an error."""
    mapping = dict(label_map or {})
    examples, empty = [], 0
    for line, row in _read(path):
        text = row.get(text_field)
        if text is None or (isinstance(text, str) and not text.strip()):
            empty += 1
            continue
        if not isinstance(text, str):
            raise ConfigError(f"{path} line {line}: field '{text_field}' is not text")
        label = _required(path, line, row, label_field)
        examples.append(Example(text, mapping.get(str(label), str(label))))
    return examples, empty


def load_texts(path: str | Path, text_field: str, scopes: ScopeMatcher) -> list[tuple[str, str]]:
    """(text, scope) per row of labeled or unlabeled data: a sample of traffic, for drift references."""
    return [(_text(path, line, row, text_field), scope_of_row(row, scopes)) for line, row in _read(path)]


def check_labels(examples: Sequence[Example], labels: Sequence[str], path: str | Path) -> None:
    """Every gold label must be one of the model's, or the metrics would silently count it as wrong."""
    unknown = sorted({e.label for e in examples} - set(labels))
    if unknown:
        raise ConfigError(
            f"{path}: label(s) {unknown} are not labels of the model {list(labels)}; map them with "
            f'--label-map, e.g. \'{{"{unknown[0]}": "{labels[0]}"}}\''
        )


@dataclass(frozen=True, slots=True)
class LabelScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, slots=True)
class Scores:
    """Classification metrics over one set of examples. ``confusion[gold][predicted]``, model label order."""

    examples: int
    accuracy: float
    macro_f1: float
    per_label: dict[str, LabelScores]
    labels: list[str]
    confusion: np.ndarray


@dataclass(frozen=True, slots=True)
class Curve:
    """Precision and recall when everything scoring at least ``thresholds[i]`` is taken; thresholds descending."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


@dataclass(frozen=True, slots=True)
class Evaluation:
    overall: Scores
    by_language: dict[str, Scores]
    # action -> count under the routing rules; gold label -> action -> count; scope -> action -> count
    # (every scope of the routing, so one the data never selects shows with zero examples)
    actions: dict[str, int]
    actions_by_label: dict[str, dict[str, int]]
    actions_by_scope: dict[str, dict[str, int]]
    curves: dict[str, Curve]  # per label with gold examples: that label's probability as the score


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def confusion_matrix(gold: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """Counts, rows gold and columns predicted, both as label indices."""
    matrix = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(matrix, (gold, predicted), 1)
    return matrix


def scores(gold: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> Scores:
    """Accuracy, macro-F1 and per-label precision/recall/F1 from label indices."""
    matrix = confusion_matrix(gold, predicted, len(labels))
    per_label = {}
    for i, label in enumerate(labels):
        tp, predicted_i, support = matrix[i, i], matrix[:, i].sum(), matrix[i, :].sum()
        if predicted_i == 0 and support == 0:
            continue  # not in play: neither in the data nor predicted
        precision, recall = _ratio(tp, predicted_i), _ratio(tp, support)
        per_label[label] = LabelScores(
            precision, recall, _ratio(2 * precision * recall, precision + recall), int(support)
        )
    macro_f1 = float(np.mean([s.f1 for s in per_label.values()])) if per_label else 0.0
    return Scores(len(gold), _ratio(np.trace(matrix), len(gold)), macro_f1, per_label, list(labels), matrix)


def pr_curve(score: np.ndarray, positive: np.ndarray) -> Curve:
    """Precision/recall at every distinct score used as a ``>=`` threshold (exactly how a rule's min_score acts)."""
    if len(score) == 0:
        empty = np.array([], dtype=np.float64)
        return Curve(empty, empty, empty)
    order = np.argsort(-score, kind="stable")
    ranked, hits = score[order], positive[order].astype(np.int64)
    last_of_run = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]
    tp = np.cumsum(hits)[last_of_run]
    total = int(hits.sum())
    recall = tp / total if total else np.zeros(len(tp))
    return Curve(ranked[last_of_run], tp / (last_of_run + 1), recall)


def evaluate(examples: Sequence[Example], probs: np.ndarray, labels: Sequence[str], router: Router) -> Evaluation:
    """All metrics for ``examples`` given the model's probabilities (one row per example, model label order)."""
    index = {label: i for i, label in enumerate(labels)}
    gold = np.array([index[e.label] for e in examples], dtype=np.int64)
    predicted = probs.argmax(axis=1)
    by_language = {}
    languages = sorted({e.lang for e in examples if e.lang is not None})
    for lang in languages:
        rows = np.array([e.lang == lang for e in examples])
        by_language[lang] = scores(gold[rows], predicted[rows], labels)
    actions = dict.fromkeys(ACTIONS, 0)
    by_label: dict[str, dict[str, int]] = {}
    by_scope = {scope: dict.fromkeys(ACTIONS, 0) for scope in router.scopes}
    for example, decision in zip(examples, router.decide_batch(probs, [e.scope for e in examples]), strict=True):
        actions[decision.action] += 1
        by_label.setdefault(example.label, dict.fromkeys(ACTIONS, 0))[decision.action] += 1
        by_scope[decision.scope][decision.action] += 1
    curves = {
        label: pr_curve(probs[:, i].astype(np.float64), gold == i)
        for i, label in enumerate(labels)
        if (gold == i).any()
    }
    return Evaluation(scores(gold, predicted, labels), by_language, actions, by_label, by_scope, curves)


def _scores_json(s: Scores) -> dict[str, object]:
    return {
        "examples": s.examples,
        "accuracy": s.accuracy,
        "macro_f1": s.macro_f1,
        "labels": {
            label: {"precision": x.precision, "recall": x.recall, "f1": x.f1, "support": x.support}
            for label, x in s.per_label.items()
        },
        "confusion_matrix": {
            "labels": s.labels,
            "rows": "gold",
            "columns": "predicted",
            "counts": s.confusion.tolist(),
        },
    }


def _action_rates(counts: Mapping[str, int]) -> dict[str, dict[str, float]]:
    total = sum(counts.values())
    return {a: {"count": c, "rate": _ratio(c, total)} for a, c in counts.items()}


def evaluation_json(result: Evaluation, model: str, data: str, routing: RoutingSettings) -> dict[str, object]:
    """The machine-readable form (``--out-json``); curves are left to the HTML report."""
    return {
        "model": model,
        "data": data,
        **_scores_json(result.overall),
        "by_language": {lang: _scores_json(s) for lang, s in result.by_language.items()},
        "actions": {
            "rules": [r.model_dump(exclude_none=True) for r in routing.rules],
            "scopes": [s.model_dump(exclude_none=True) for s in routing.scopes],
            "overall": _action_rates(result.actions),
            "by_label": {label: _action_rates(counts) for label, counts in sorted(result.actions_by_label.items())},
            "by_scope": {
                scope: {"examples": sum(counts.values()), "actions": _action_rates(counts)}
                for scope, counts in result.actions_by_scope.items()
            },
        },
    }
