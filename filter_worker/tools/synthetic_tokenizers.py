"""The three kinds of tokenizer public classifiers use, trained offline on the built-in samples.

WordPiece (BERT, DistilBERT, ELECTRA), byte-level BPE (RoBERTa, ModernBERT) and SentencePiece unigram
(XLM-RoBERTa, DeBERTa-v2/v3), each with its family's special tokens in their usual places and its
family's template around a text, saved as a ``tokenizer.json`` that ``AutoTokenizer`` loads like a
downloaded one. The stand-ins' scores are only as comparable with transformers' pipeline as their
tokenizers are real, so each is a genuine ``tokenizers`` model of its kind, not a shared stub.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TokenizerKind = Literal["wordpiece", "bpe", "unigram"]

_VOCAB = 2000


@dataclass(frozen=True, slots=True)
class Specials:
    """A family's special tokens; ``ids`` maps each to its id in the trained vocabulary."""

    cls: str
    sep: str
    pad: str
    unk: str
    mask: str

    def ordered(self) -> list[str]:
        return list(dict.fromkeys([self.cls, self.pad, self.sep, self.unk, self.mask]))


BERT_SPECIALS = Specials("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")
ROBERTA_SPECIALS = Specials("<s>", "</s>", "<pad>", "<unk>", "<mask>")


def train_tokenizer(
    out: Path, texts: Sequence[str], kind: TokenizerKind, specials: Specials, inputs: Sequence[str]
) -> dict[str, int]:
    """Train, save into ``out`` and return the special tokens' ids (plus ``vocab_size``).

    ``inputs`` are the model's input names the tokenizer returns, as the family's own tokenizer does:
    ``token_type_ids`` only for the models that take them (BERT, ELECTRA, DeBERTa), so the pipeline
    passes them exactly where a downloaded tokenizer would.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    names = specials.ordered()
    backend: Any
    if kind == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token=specials.unk))
        backend.normalizer = normalizers.BertNormalizer(lowercase=False)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=_VOCAB, special_tokens=names, show_progress=False)
    elif kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB,
            special_tokens=names,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        backend = Tokenizer(models.Unigram())
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=_VOCAB, special_tokens=names, unk_token=specials.unk, show_progress=False
        )
    backend.train_from_iterator(texts, trainer)
    ids = {name: backend.token_to_id(name) for name in names}
    cls, sep = (specials.cls, ids[specials.cls]), (specials.sep, ids[specials.sep])
    if kind == "bpe" and specials == ROBERTA_SPECIALS:
        backend.post_processor = processors.RobertaProcessing(sep, cls, add_prefix_space=False)
    else:
        pair = f"{cls[0]} $A {sep[0]} $B {sep[0]}"
        if specials == ROBERTA_SPECIALS:  # XLM-R: <s> A </s></s> B </s>
            pair = f"{cls[0]} $A {sep[0]} {sep[0]} $B {sep[0]}"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls[0]} $A {sep[0]}", pair=pair, special_tokens=[cls, sep]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=specials.unk,
        pad_token=specials.pad,
        cls_token=specials.cls,
        sep_token=specials.sep,
        mask_token=specials.mask,
        bos_token=specials.cls,
        eos_token=specials.sep,
        model_max_length=512,
        model_input_names=list(inputs),
    )
    tokenizer.save_pretrained(out)
    return {**ids, "vocab_size": backend.get_vocab_size()}
