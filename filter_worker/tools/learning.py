"""What ``model train`` learns from: labeled data or reviewers' verdicts, checked, split, and described.

Two sources, one shape (texts, labels, which rows are held out):

- **Labeled data**, the files ``eval`` reads. Rows with an empty text are skipped and counted; the
  held-out part is drawn at random within each label.
- **Verdicts** joined with the texts they judged. A verdict names its record by ``source``
  (``topic/partition/offset``); the output and review topics carry each record's value under the same
  ``filter.source`` header. Each source counts once, its latest verdict winning, as for
  ``calibrate --from-feedback``. Verdicts on what the rules took are a biased sample (nothing the
  rules allowed is in it), so the held-out part is drawn from the verdicts on records drawn at random
  for review (``FILTER_REVIEW__*``) where there are any; without them the report says plainly that the
  held-out data is only what the rules took.

The checks turn every way the data cannot train a classifier into one sentence (exit 2).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from filter_worker.config import ConfigError, KafkaSettings, MessageSettings
from filter_worker.model.training import stratified_split
from filter_worker.moderation.verdicts import latest_per_source, read_records, read_verdicts
from filter_worker.pipeline.decode import DecodeFailure, decode
from filter_worker.tools.evaluation import Example, load_training_examples

SOURCE_HEADER = "filter.source"
RANDOM_HELD_OUT = "a random part of each label, never trained on"
DRAWN_HELD_OUT = (
    "a random part of the verdicts on records drawn at random for review (FILTER_REVIEW__*), never trained on"
)
TAKEN_HELD_OUT = (
    "a random part of the verdicts, never trained on; there were no verdicts on randomly drawn records, so the "
    "held-out data is only what the rules took (quarantined or dropped): the figures say nothing about what the "
    "rules allowed"
)


@dataclass(slots=True)
class TrainingData:
    """Examples with a held-out mask, and what the card says about where they came from."""

    examples: list[Example]
    held_out: np.ndarray  # bool per example
    held_out_note: str
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out

    @property
    def digest(self) -> str:
        """sha256 of the (text, label) pairs in order: the same data gives the same digest, whatever its file format."""
        pairs = [[e.text, e.label] for e in self.examples]
        return hashlib.sha256(orjson.dumps(pairs)).hexdigest()

    def counts(self, held_out: bool) -> dict[str, int]:
        return dict(Counter(e.label for e, h in zip(self.examples, self.held_out, strict=True) if h == held_out))


def from_labeled(
    path: str, text_field: str, label_field: str, label_map: Mapping[str, str], held_out: float, seed: int
) -> TrainingData:
    examples, empty = load_training_examples(path, text_field, label_field, label_map)
    _, held = stratified_split([e.label for e in examples], held_out, seed)
    mask = np.zeros(len(examples), dtype=bool)
    mask[held] = True
    return TrainingData(examples, mask, RANDOM_HELD_OUT, path, {"empty_text": empty} if empty else {})


def from_verdicts(
    verdict_source: str,
    text_sources: Sequence[str],
    kafka: KafkaSettings,
    message: MessageSettings,
    abuse_label: str,
    ok_label: str,
    model: str | None,
    held_out: float,
    seed: int,
) -> TrainingData:
    """Verdicts (one per source, the latest winning) with the text of the record each judged."""
    verdicts, invalid = read_verdicts(verdict_source, kafka)
    latest = latest_per_source(v for v in verdicts if model is None or v.model == model)
    texts: dict[str, str] = {}
    skipped: Counter[str] = Counter({f"invalid_verdict_{reason}": n for reason, n in invalid.items()})
    for source in text_sources:
        for headers, value in read_records(source, kafka, option="--texts"):
            origin = next((raw for key, raw in reversed(headers) if key == SOURCE_HEADER), None)
            if origin is None:
                continue  # not a decided record (a dead letter has its own headers)
            decoded = decode(value, message.format, message.text_field)
            if not isinstance(decoded, DecodeFailure):
                texts[origin.decode("utf-8", "replace")] = decoded.text
    examples: list[Example] = []
    drawn: list[bool] = []
    for verdict in latest:
        text = texts.get(verdict.source)
        if text is None:
            skipped["no_text_found"] += 1
            continue
        if not text.strip():
            skipped["empty_text"] += 1
            continue
        examples.append(Example(text, abuse_label if verdict.abuse else ok_label))
        drawn.append(verdict.sample is not None)
    # Held out: a random part of the drawn verdicts (the rest of them are trained on: verdicts on what
    # the rules allowed are often the only examples of the label the rules do not take).
    pool = [i for i, was_drawn in enumerate(drawn) if was_drawn] or list(range(len(examples)))
    note = DRAWN_HELD_OUT if any(drawn) else TAKEN_HELD_OUT
    mask = np.zeros(len(examples), dtype=bool)
    if pool:
        _, held = stratified_split([examples[i].label for i in pool], held_out, seed)
        mask[np.array(pool)[held]] = True
    return TrainingData(examples, mask, note, f"{verdict_source} joined with {', '.join(text_sources)}", dict(skipped))


def check(data: TrainingData, labels: Sequence[str], min_examples: int) -> None:
    """One sentence for each way ``data`` cannot train a classifier of ``labels``."""
    where = data.source
    if len(labels) != len(set(labels)):
        raise ConfigError(f"--labels {','.join(labels)}: a label is named twice")
    if len(labels) < 2:
        raise ConfigError(f"--labels {','.join(labels)}: a classifier needs at least two labels")
    found = Counter(e.label for e in data.examples)
    if not found:
        raise ConfigError(f"{where}: no examples with a text ({_skipped(data.skipped)})")
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise ConfigError(
            f"{where}: label(s) {unknown} are in the data but not in --labels {list(labels)}; add them to --labels, "
            f'or map them with --label-map, e.g. \'{{"{unknown[0]}": "{labels[0]}"}}\''
        )
    if len(found) < 2:
        raise ConfigError(
            f"{where}: every example is labeled {next(iter(found))!r}; a classifier needs examples of at least two "
            "labels"
        )
    trained = data.counts(held_out=False)
    for label in labels:
        if trained.get(label, 0) < min_examples:
            raise ConfigError(
                f"{where}: label {label!r} has {trained.get(label, 0)} training examples (after the held-out part); "
                f"at least {min_examples} are needed (--min-examples)"
            )


def _skipped(skipped: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in skipped.items()) or "none"


def card(
    *,
    name: str,
    base: str,
    labels: Sequence[str],
    data: TrainingData,
    mode: str,
    max_length: int,
    held_out_fraction: float,
    seed: int,
    evaluation: Mapping[str, Any],
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    """The model card's facts (``training.json``); ``card_markdown`` is the same for people."""
    return {
        "model": name,
        "base_encoder": base,
        "labels": list(labels),
        "problem_type": "single_label_classification",
        "training": mode,
        "max_length": max_length,
        "data": {
            "source": data.source,
            "examples_sha256": data.digest,
            "examples": len(data.examples),
            "skipped": data.skipped,
            "train_per_label": data.counts(held_out=False),
            "held_out_per_label": data.counts(held_out=True),
        },
        "split": {"held_out": data.held_out_note, "fraction": held_out_fraction, "seed": seed},
        "held_out_metrics": {
            key: evaluation[key] for key in ("examples", "accuracy", "macro_f1", "labels") if key in evaluation
        },
        "seconds": dict(seconds),
    }


def card_markdown(facts: Mapping[str, Any]) -> str:
    data, metrics = facts["data"], facts["held_out_metrics"]
    lines = [
        f"# {facts['model']}",
        "",
        f"A `{facts['problem_type']}` classifier for the labels {', '.join(facts['labels'])}, trained by "
        f"`filter-worker model train` ({facts['training']}; texts read up to {facts['max_length']} tokens).",
        "",
        f"- **Base encoder:** `{facts['base_encoder']}`",
        f"- **Data:** {data['source']}; {data['examples']} examples, sha256 of the (text, label) pairs "
        f"`{data['examples_sha256']}`; skipped: {_skipped(data['skipped'])}",
        f"- **Held out:** {facts['split']['held_out']} (seed {facts['split']['seed']})",
        "",
        "| label | trained on | held out | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    per_label = metrics.get("labels", {})
    for label in facts["labels"]:
        m = per_label.get(label)
        scores = f"{m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f}" if m else "- | - | -"
        lines.append(
            f"| {label} | {data['train_per_label'].get(label, 0)} | {data['held_out_per_label'].get(label, 0)} | "
            f"{scores} |"
        )
    lines += [
        "",
        f"Held-out accuracy {metrics.get('accuracy', 0.0):.3f}, macro-F1 {metrics.get('macro_f1', 0.0):.3f} over "
        f"{metrics.get('examples', 0)} examples (the full `eval` report: `evaluation.json`).",
        "",
    ]
    return "\n".join(lines)
