"""Classifiers built offline: random weights, weights set so keywords decide the label, and stand-ins of
every common family with public models' label sets and problem types.

Tests, the benchmark and air-gapped trials need a model without reaching a model hub. These are real
``transformers`` checkpoints (safetensors weights, a WordPiece tokenizer trained on the built-in
multilingual samples), loaded through exactly the code path a downloaded model takes.

- ``build_model``: random weights; predictions are meaningless, but shapes and speed are real when
  ``size="base"`` (the shape of distilbert-base-multilingual-cased). For benchmarks; ``size="micro"``
  is as close to free as a real checkpoint gets, for measuring everything but the model.
- ``build_keyword_model``: weights set by hand so that chosen words push a text towards chosen labels
  and everything else is the default label. For tests that must know the right answer.
- ``build_family``: a random-weight stand-in of a family in ``FAMILIES`` (DistilBERT, BERT, RoBERTa,
  XLM-RoBERTa, DeBERTa-v2/v3, ELECTRA, ModernBERT) with its kind of tokenizer and a public model's
  labels and head (multi-label, single-label, a single output, unnamed outputs). For checking that the
  worker scores each as transformers' pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filter_worker.model.samples import corpus
from filter_worker.tools.synthetic_tokenizers import (
    BERT_SPECIALS,
    ROBERTA_SPECIALS,
    Specials,
    TokenizerKind,
    train_tokenizer,
)

DEFAULT_LABELS: tuple[str, ...] = ("Very Negative", "Negative", "Neutral", "Positive", "Very Positive")

# Keywords of the offline demo model (``filter-worker model synth``), taken from the built-in samples
# so the demo shows every action without the real model.
DEMO_KEYWORDS: dict[str, list[str]] = {
    "Very Negative": ["idiot", "loser", "worthless", "Vollidiot", "idiota", "nul", "inútil"],
    "Negative": ["annoying", "broke", "déçu", "delusione", "rozczarowany", "Berbat", "garbage", "Slechtste"],
    "Very Positive": ["Thanks", "Great", "Merci", "Danke", "Grazie", "Adorei", "encanta"],
}

# distilbert-base-multilingual-cased, the architecture of the default model.
_BASE = {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072, "vocab_size": 119547}
_TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "vocab_size": 0}
# One layer, the fewest ops a forward pass can have: what the plumbing measurement runs.
_MICRO = {"dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32, "vocab_size": 0}
_SHAPES = {"tiny": _TINY, "micro": _MICRO, "base": _BASE}


def _train_tokenizer(out: Path, texts: list[str]) -> int:
    """Train and save a WordPiece tokenizer with BERT's special tokens; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(out)
    return backend.get_vocab_size()


def _config(shape: dict[str, int], labels: Sequence[str]) -> Any:
    from transformers import DistilBertConfig

    # The config's keyword arguments are typed per transformers release; the shape is plain ints.
    options: dict[str, Any] = {**shape, "num_labels": len(labels)}
    return DistilBertConfig(
        **options,
        max_position_embeddings=512,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def build_model(
    path: str | Path,
    size: Literal["micro", "tiny", "base"] = "tiny",
    labels: Sequence[str] = DEFAULT_LABELS,
    seed: int = 0,
) -> Path:
    """Write a random-weight sequence classifier to ``path`` and return the path.

    Micro and tiny size their vocabulary to the trained tokenizer; base keeps the real multilingual
    vocabulary size so the embedding matrix has its true shape.
    """
    import torch
    from transformers import DistilBertForSequenceClassification

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(out, list(corpus()))
    shape = dict(_SHAPES[size])
    shape["vocab_size"] = max(shape["vocab_size"], vocab)
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(_config(shape, labels)).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_keyword_model(
    path: str | Path,
    keywords: Mapping[str, Sequence[str]],
    labels: Sequence[str] = DEFAULT_LABELS,
    default_label: str = "Neutral",
) -> Path:
    """Write a classifier whose label is decided by keywords: ``{"Very Negative": ["idiot"], ...}``.

    A text with no keyword gets ``default_label`` with probability ~0.9; one keyword of label L gives
    L a probability above 0.95 in short texts. How it works: attention is made uniform, so the first
    token's state is the mean of the token embeddings; keyword tokens carry a large component on
    "their" label's dimension, every other token carries none; the head reads those dimensions.
    """
    import torch
    from transformers import DistilBertForSequenceClassification

    n = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    unknown = [label for label in [*keywords, default_label] if label not in index]
    if unknown:
        raise ValueError(f"unknown labels {unknown}; labels are {list(labels)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    words = [w for group in keywords.values() for w in group]
    # Repetition makes every keyword a whole-word token of the trained vocabulary.
    vocab = _train_tokenizer(out, [*corpus(), *(" ".join(words) for _ in range(50))])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    shape = dict(_TINY, n_layers=1, vocab_size=vocab)
    dim = shape["dim"]
    model = DistilBertForSequenceClassification(_config(shape, labels)).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # Every token: a constant pattern outside the label dimensions (so layer norms are defined).
        background = torch.zeros(dim)
        background[n:] = torch.linspace(-1.0, 1.0, dim - n)
        params["distilbert.embeddings.word_embeddings.weight"][:] = background
        for label, group in keywords.items():
            for word in group:
                token = tokenizer.convert_tokens_to_ids(word)
                if token == tokenizer.unk_token_id:
                    raise ValueError(f"keyword {word!r} is not a single token")
                params["distilbert.embeddings.word_embeddings.weight"][token, index[label]] = 40.0
        for name in (
            "distilbert.embeddings.LayerNorm",
            "distilbert.transformer.layer.0.sa_layer_norm",
            "distilbert.transformer.layer.0.output_layer_norm",
        ):
            params[f"{name}.weight"].fill_(1.0)
        layer = "distilbert.transformer.layer.0.attention"
        params[f"{layer}.v_lin.weight"].copy_(torch.eye(dim))
        params[f"{layer}.out_lin.weight"].copy_(torch.eye(dim) * 100.0)  # q, k stay zero: uniform attention
        params["pre_classifier.weight"].copy_(torch.eye(dim))
        params["classifier.weight"][:, :n].copy_(torch.eye(n) * 8.0)
        params["classifier.bias"][index[default_label]] = 3.5
    model.save_pretrained(out, safe_serialization=True)
    return out


# ---- stand-ins for the families of public classifiers ----

TOXIC_BERT_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
TEXT_MODERATION_LABELS = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2", "OK")


@dataclass(frozen=True, slots=True)
class Family:
    """A model family's stand-in: its config class and tiny shape, tokenizer kind, and a public model's
    label set and problem type (``labels`` None: the config's generated ``LABEL_N`` names)."""

    name: str
    model_type: str
    tokenizer: TokenizerKind
    specials: Specials
    inputs: tuple[str, ...]
    labels: tuple[str, ...] | None
    problem_type: str | None
    like: str  # the public model whose labels and head it carries
    shape: tuple[tuple[str, Any], ...] = ()
    num_labels: int = 2


_SPREAD = 0.3
_BERT_SHAPE = (("hidden_size", 32), ("num_hidden_layers", 2), ("num_attention_heads", 2), ("intermediate_size", 64))
_WITH_TYPES = ("input_ids", "token_type_ids", "attention_mask")
_WITHOUT_TYPES = ("input_ids", "attention_mask")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "distilbert",
            "distilbert",
            "wordpiece",
            BERT_SPECIALS,
            _WITHOUT_TYPES,
            DEFAULT_LABELS,
            "single_label_classification",
            "tabularisai/multilingual-sentiment-analysis",
            (("dim", 32), ("n_layers", 2), ("n_heads", 2), ("hidden_dim", 64)),
        ),
        Family(
            "bert",
            "bert",
            "wordpiece",
            BERT_SPECIALS,
            _WITH_TYPES,
            TOXIC_BERT_LABELS,
            "multi_label_classification",
            "unitary/toxic-bert",
            _BERT_SHAPE,
        ),
        Family(
            "bert-unnamed",
            "bert",
            "wordpiece",
            BERT_SPECIALS,
            _WITH_TYPES,
            None,
            None,
            "mrm8488/bert-tiny-finetuned-sms-spam-detection",
            _BERT_SHAPE,
        ),
        Family(
            "roberta",
            "roberta",
            "bpe",
            ROBERTA_SPECIALS,
            _WITHOUT_TYPES,
            ("neutral", "toxic"),
            None,
            "s-nlp/roberta_toxicity_classifier",
            _BERT_SHAPE,
        ),
        Family(
            "xlm-roberta",
            "xlm-roberta",
            "unigram",
            ROBERTA_SPECIALS,
            _WITHOUT_TYPES,
            ("negative", "neutral", "positive"),
            None,
            "cardiffnlp/twitter-xlm-roberta-base-sentiment",
            _BERT_SHAPE,
        ),
        Family(
            "deberta-v2",
            "deberta-v2",
            "unigram",
            BERT_SPECIALS,
            _WITH_TYPES,
            TEXT_MODERATION_LABELS,
            "multi_label_classification",
            "KoalaAI/Text-Moderation",
            (
                *_BERT_SHAPE,
                ("relative_attention", True),
                ("pos_att_type", ["p2c", "c2p"]),
                ("position_biased_input", False),
                ("max_relative_positions", -1),
                ("position_buckets", 64),
                ("norm_rel_ebd", "layer_norm"),
                ("share_att_key", True),
                ("type_vocab_size", 0),
            ),
        ),
        Family(
            "electra",
            "electra",
            "wordpiece",
            BERT_SPECIALS,
            _WITH_TYPES,
            ("ham", "spam"),
            None,
            "an SMS spam head (ham, spam) on google/electra-small-discriminator",
            (*_BERT_SHAPE, ("embedding_size", 16)),
        ),
        Family(
            "modernbert",
            "modernbert",
            "bpe",
            BERT_SPECIALS,
            _WITHOUT_TYPES,
            ("spam",),
            None,
            "a single spam-probability output on answerdotai/ModernBERT-base",
            (*_BERT_SHAPE, ("local_attention", 16), ("global_attn_every_n_layers", 2)),
            num_labels=1,
        ),
    )
}


def build_family(path: str | Path, family: str, seed: int = 0, problem_type: str | None = "config") -> Path:
    """Write a random-weight stand-in of ``family`` (a ``FAMILIES`` key) to ``path`` and return the path.

    Built from the family's transformers config with a public model's labels and problem type, and a
    tokenizer of the family's kind trained on the built-in samples; ``problem_type`` other than
    ``"config"`` replaces the family's (None: unset, as many multi-label models on the Hub leave it).
    The weights are drawn wider than transformers' initialization (``_SPREAD``): at its 0.02 every text
    gets nearly the same scores (a standard deviation of logits near 0.001), so no threshold would
    split records the way a trained model's scores do; at 0.3 the logits spread by about 0.6.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = FAMILIES[family]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    ids = train_tokenizer(out, list(corpus()), spec.tokenizer, spec.specials, spec.inputs)
    num_labels = len(spec.labels) if spec.labels is not None else spec.num_labels
    options: dict[str, Any] = dict(spec.shape)
    if spec.labels is not None:
        options["id2label"] = dict(enumerate(spec.labels))
        options["label2id"] = {label: i for i, label in enumerate(spec.labels)}
    chosen = spec.problem_type if problem_type == "config" else problem_type
    if chosen is not None:
        options["problem_type"] = chosen
    padded = spec.model_type in ("roberta", "xlm-roberta")  # positions start after the padding index
    config = AutoConfig.for_model(
        spec.model_type,
        vocab_size=ids["vocab_size"],
        num_labels=num_labels,
        max_position_embeddings=514 if padded else 512,
        pad_token_id=ids[spec.specials.pad],
        bos_token_id=ids[spec.specials.cls],
        eos_token_id=ids[spec.specials.sep],
        cls_token_id=ids[spec.specials.cls],
        sep_token_id=ids[spec.specials.sep],
        **options,
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                module.weight.normal_(0.0, _SPREAD)
    model.save_pretrained(out, safe_serialization=True)
    return out
