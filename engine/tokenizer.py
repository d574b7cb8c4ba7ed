"""A model directory's tokenizer (transformers'), loaded without importing torch up front."""
from __future__ import annotations

import os


def load_tokenizer(path: str):
    """The model directory's tokenizer, or None when it has none (token ids only)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer   # here: transformers imports torch, ~1 s
    return AutoTokenizer.from_pretrained(path)
