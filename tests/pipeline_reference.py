"""The reference the worker's scores are judged by: transformers' own text-classification pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pipeline_scores(directory: Path, texts: Sequence[str], model: Any = None) -> np.ndarray:
    """Every label's score per text (rows x labels, the config's label order) as
    ``pipeline("text-classification", top_k=None)`` gives them, one text at a time (no padding).

    ``model``: a model object to run in the pipeline instead of the directory's (the int8 module).
    """
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(directory)
    classify = pipeline(
        "text-classification", model=model or str(directory), tokenizer=tokenizer, top_k=None, device="cpu"
    )
    config = classify.model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    rows = classify(list(texts), truncation=True)
    return np.array([[{r["label"]: r["score"] for r in row}[label] for label in labels] for row in rows])
