"""Tokenising the texts of a batch: shared by the training data (:mod:`fvlm.data.dataset`) and the model code,
so the data side needs nothing from :mod:`fvlm.model`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tokenize_unique(tokenizer: Any, texts: Sequence[Sequence[str]], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise each distinct text of a batch once, padded to the longest, truncated to ``max_length``.

    Args:
        tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        texts: B rows of A texts (one per anatomy).
    Returns:
        ``input_ids``, ``attention_mask``: int64 (U, L) for the U distinct texts (first-seen order),
        L = min(longest, max_length); ``text_index``: int64 (B, A), row of each text in ``input_ids``.
    """
    unique: dict[str, int] = {}
    index = [[unique.setdefault(t, len(unique)) for t in row] for row in texts]
    tok = tokenizer(list(unique), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "text_index": torch.tensor(index, dtype=torch.int64)}
