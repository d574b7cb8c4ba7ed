"""Attention over the paged KV cache, for a packed prefill or a decode step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (built once by the model runner)."""

    is_prefill: bool
    slot_mapping: torch.Tensor            # [tokens] int64 cache slot of each new token, -1 = none
    seq_bounds: list[tuple[int, int]]     # prefill: each sequence's [start, end) in the packed batch
    block_tables: torch.Tensor | None     # decode: [batch, max_blocks] int32
    context_lens: torch.Tensor | None     # decode: [batch] int32, the new token included


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Store the new K/V in the cache, then attend.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim];
    kv_cache: (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim].
    Returns [tokens, heads, head_dim].
    """
    if kv_cache is not None:
        kernels.store_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
    if meta.is_prefill:
        return _packed_causal_attention(q, k, v, meta.seq_bounds, scale)
    assert kv_cache is not None, "decode needs the KV cache"
    return kernels.paged_decode_attention(q, kv_cache[0], kv_cache[1], meta.block_tables,
                                          meta.context_lens, scale)


def _packed_causal_attention(q, k, v, seq_bounds, scale):
    """Causal attention of each prompt over its own tokens: packed, no padding."""
    gqa = q.shape[1] != k.shape[1]
    if len(seq_bounds) == 1:
        return _causal(q, k, v, scale, gqa)
    out = torch.empty_like(q)
    for start, end in seq_bounds:
        out[start:end] = _causal(q[start:end], k[start:end], v[start:end], scale, gqa)
    return out


def _causal(q, k, v, scale, gqa):
    # [len, heads, dim] -> [heads, len, dim] for SDPA and back
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       is_causal=True, scale=scale, enable_gqa=gqa)
    return o.transpose(0, 1)
