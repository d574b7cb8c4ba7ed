"""Checks a request must pass before it is scheduled. Pure: the router runs them too."""
from __future__ import annotations

from collections.abc import Sequence

from engine.block_manager import blocks_needed
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


def validate_request(ids: Sequence[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                     num_blocks: int | None = None, block_size: int = 16) -> None:
    """Raise InvalidRequestError naming the problem; `num_blocks` is the smallest cache that must hold it."""
    if not ids:
        raise InvalidRequestError("prompt is empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(f"prompt has {len(ids)} tokens; the model's context is {max_model_len}")
    total = len(ids) + params.max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {max_model_len}")
    if num_blocks is not None and blocks_needed(total, block_size) > num_blocks:
        raise InvalidRequestError(
            f"request needs {blocks_needed(total, block_size)} KV blocks; the cache has {num_blocks}")
