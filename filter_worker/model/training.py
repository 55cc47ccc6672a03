"""Train a classification head for an operator's own labels on a pretrained encoder.

A model card's label set decides what a model can catch; fitting a classifier to an operator's labels
(spam / ham, their abuse categories) means training its classification head on their data, as
``sa-learn`` trains SpamAssassin's Bayes database on a site's own mail.

- **Head only** (the default): the base is loaded as a sequence classifier for the new labels, and the
  input of its final linear layer (the pooled representation the head reads, whatever the
  architecture) is computed once per text. A new linear head is then fitted on those features as a
  class-weighted logistic regression: seconds, whatever the number of epochs, because the encoder
  never runs again. Tens of thousands of texts take minutes on a CPU, almost all of it features.
- **Full fine-tuning** (``full=True``): every weight is trained with AdamW; the time estimate comes
  from one measured training step before the run.

The result is written as any other model directory: safetensors weights, the tokenizer, a config with
``id2label``, ``label2id`` and ``problem_type``, so every command loads it with the usual code path
(``Classifier.load``) and its lock file (``lockfile.lock_directory``). Evaluation and the model card
are the command's (``cli/model.py``), which reads the data with the ``eval`` readers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filter_worker.config import ConfigError

# done, total, seconds elapsed: what a progress bar needs.
Progress = Callable[[int, int, float], None]
# Module names that hold a classification head, not encoder weights: absent from a bare encoder
# (BertModel, DistilBertModel, ...), and initialised fresh for the new labels.
_HEAD_PARTS = ("classifier", "pre_classifier", "pooler", "score")
PROBLEM_TYPE = "single_label_classification"


@dataclass(frozen=True, slots=True)
class Head:
    """A fitted final linear layer: ``weight`` (labels x features), ``bias`` (labels), and its training loss."""

    weight: np.ndarray
    bias: np.ndarray
    loss: float


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): ``fraction`` of each label drawn at random (at least one of each), so a
    rare label is in both parts and the held-out counts follow the data's."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    held: list[int] = []
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label):
        members = np.array(by_label[label])
        rng.shuffle(members)
        n_held = max(1, round(fraction * len(members)))
        held.extend(members[:n_held].tolist())
        train.extend(members[n_held:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def class_weights(targets: np.ndarray, n_labels: int) -> np.ndarray:
    """``n / (labels x count)`` per label: each label weighs as much in the loss as the others, so a head
    trained on 5 % spam does not learn to say ham."""
    counts = np.bincount(targets, minlength=n_labels).astype(np.float64)
    return np.where(counts > 0, len(targets) / (n_labels * np.maximum(counts, 1)), 0.0)


def fit_head(features: np.ndarray, targets: np.ndarray, n_labels: int, l2: float = 1e-3, max_iter: int = 500) -> Head:
    """Class-weighted multinomial logistic regression with an L2 penalty, by L-BFGS on the whole set.

    The features are standardised while fitting (L-BFGS converges in a few dozen steps then) and the
    scaling is folded back into the weights, so the head reads the encoder's raw features as the
    saved model will give them.
    """
    import torch

    x = torch.from_numpy(features.astype(np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    y = torch.from_numpy(targets.astype(np.int64))
    weights = torch.from_numpy(class_weights(targets, n_labels).astype(np.float32))
    linear = torch.nn.Linear(x.shape[1], n_labels)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(linear(z), y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        final = float(closure().item())
    with torch.no_grad():
        weight = linear.weight / std
        bias = linear.bias - (weight * mean).sum(1)
    return Head(weight.numpy().copy(), bias.numpy().copy(), final)


class Base:
    """The base encoder loaded as a sequence classifier for the new labels, its head fresh.

    ``head`` is the final linear layer (out_features = number of labels): its input is the feature a
    head-only training fits on, whatever sits before it in this architecture (BERT's pooler,
    DistilBERT's pre-classifier, RoBERTa's dense layer).
    """

    def __init__(self, model: Any, tokenizer: Any, head: Any, device: str, max_length: int, source: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.head = head
        self.device = device
        self.max_length = max_length
        self.source = source

    @classmethod
    def load(cls, base: str, labels: Sequence[str], device: str, max_length: int) -> Base:
        """Load ``base`` (a local directory, safetensors only, no remote code) with a head for ``labels``.

        Refuses, in one sentence, a directory that is not an encoder: no config, no fast tokenizer, an
        architecture transformers cannot put a classification head on, or weights that do not fill the
        encoder (another architecture's file, or none at all).
        """
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        where = Path(base)
        if not where.is_dir():
            raise ConfigError(f"--base {base}: not a directory; give a local encoder or model directory")
        problem = "no config.json" if not (where / "config.json").is_file() else None
        if problem is None and not any(where.glob("*.safetensors")):
            problem = "no safetensors weights (only safetensors are loaded: pickle files can run code)"
        if problem is not None:
            raise ConfigError(f"--base {base} is not an encoder directory: {problem}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                problem_type=PROBLEM_TYPE,
                ignore_mismatched_sizes=True,  # the base's own head (other labels) is replaced
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
        except (OSError, ValueError, KeyError) as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--base {base} is not an encoder directory: {cause}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"--base {base} is not an encoder directory: it has no fast tokenizer (tokenizer.json)")
        missing = [key for key in info.get("missing_keys", []) if not any(p in key.split(".") for p in _HEAD_PARTS)]
        if missing:
            raise ConfigError(
                f"--base {base} is not an encoder directory: its weights do not fill the "
                f"{type(model).__name__} encoder ({len(missing)} tensors missing, e.g. {missing[0]})"
            )
        head = _final_linear(model, len(labels))
        positions = getattr(model.config, "max_position_embeddings", max_length)
        model.to(device).eval()
        return cls(model, tokenizer, head, device, min(max_length, positions), base)

    def _batches(self, texts: Sequence[str], batch_size: int) -> list[list[int]]:
        """Index batches of texts of similar length (less padding), longest first so the first batch
        timed is the slowest and the estimate errs long."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def _encode(self, texts: Sequence[str]) -> dict[str, Any]:
        batch = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def features(self, texts: Sequence[str], batch_size: int = 32, progress: Progress | None = None) -> np.ndarray:
        """The head's input for every text (in input order), computed once, batch by batch."""
        import torch

        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        out = np.zeros((len(texts), self.head.in_features), dtype=np.float32)
        start = time.monotonic()
        done = 0
        try:
            with torch.inference_mode():
                for indices in self._batches(texts, batch_size):
                    captured.clear()
                    self.model(**self._encode([texts[i] for i in indices]))
                    out[indices] = captured[-1].float().cpu().numpy()
                    done += len(indices)
                    if progress is not None:
                        progress(done, len(texts), time.monotonic() - start)
        finally:
            hook.remove()
        return out

    def set_head(self, head: Head) -> None:
        import torch

        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(head.weight))
            self.head.bias.copy_(torch.from_numpy(head.bias))

    def seconds_per_step(self, texts: Sequence[str], batch_size: int) -> float:
        """One measured training step (forward and backward) on the longest texts: the full fine-tuning
        estimate's unit. The weights are not changed."""
        import torch

        batch = self._encode(sorted(texts, key=len, reverse=True)[:batch_size])
        self.model.train()
        start = time.monotonic()
        with torch.enable_grad():
            logits = self.model(**batch).logits
            logits.sum().backward()
        self.model.zero_grad(set_to_none=True)
        self.model.eval()
        return time.monotonic() - start

    def fine_tune(
        self,
        texts: Sequence[str],
        targets: np.ndarray,
        epochs: int,
        learning_rate: float,
        batch_size: int,
        seed: int,
        progress: Progress | None = None,
    ) -> float:
        """Train every weight (class-weighted cross-entropy, AdamW); returns the last epoch's mean loss."""
        import torch

        torch.manual_seed(seed)
        n_labels = self.head.out_features
        loss_fn = torch.nn.CrossEntropyLoss(
            weight=torch.from_numpy(class_weights(targets, n_labels).astype(np.float32)).to(self.device)
        )
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate)
        rng = np.random.default_rng(seed)
        steps = epochs * math.ceil(len(texts) / batch_size)
        done, start, mean_loss = 0, time.monotonic(), 0.0
        self.model.train()
        try:
            with torch.enable_grad():
                for _ in range(epochs):
                    order = rng.permutation(len(texts))
                    losses = []
                    for at in range(0, len(order), batch_size):
                        indices = order[at : at + batch_size]
                        logits = self.model(**self._encode([texts[i] for i in indices])).logits
                        loss = loss_fn(logits, torch.from_numpy(targets[indices]).to(self.device))
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        losses.append(float(loss.item()))
                        done += 1
                        if progress is not None:
                            progress(done, steps, time.monotonic() - start)
                    mean_loss = float(np.mean(losses))
        finally:
            self.model.eval()
        return mean_loss

    def save(self, out: Path) -> None:
        """Weights (safetensors), tokenizer and config with the new labels; ``problem_type`` says softmax."""
        self.model.config.problem_type = PROBLEM_TYPE
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)


def _final_linear(model: Any, n_labels: int) -> Any:
    """The last ``nn.Linear`` with one output per label: what turns the pooled features into logits."""
    import torch

    found = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n_labels]
    if not found:
        raise ConfigError(f"{type(model).__name__}: no final linear layer with {n_labels} outputs")
    return found[-1]


def eta(done: int, total: int, elapsed: float) -> str:
    """``"1,200/5,000 (24 %), 12 s elapsed, about 38 s left"``: the progress line's text."""
    left = elapsed / done * (total - done) if done else float("nan")
    share = done / total if total else 1.0
    rest = f", about {left:,.0f} s left" if done < total and math.isfinite(left) else ""
    return f"{done:,}/{total:,} ({share:.0%}), {elapsed:,.0f} s elapsed{rest}"
