"""Attention over the paged KV cache, for a packed prefill or a decode step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import pdkernels
from engine.prefill_attention import DEFAULT as DEFAULT_PREFILL
from engine.prefill_attention import PrefillPlan, causal_attention, sdpa
from engine.sequence import StepKind


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (built once by the model runner).

    `attend` is the step's attention over the cache; a step of another kind
    (chunked prefill's mixed step, engine.chunked_prefill) brings its own
    metadata subclass with its own `attend`."""

    kind: StepKind                        # PREFILL or DECODE here
    slot_mapping: torch.Tensor            # [tokens] int64 cache slot of each new token, -1 = none
    seq_bounds: list[tuple[int, int]]     # prefill: each sequence's [start, end) in the packed batch
    block_tables: torch.Tensor | None     # decode: [batch, max_blocks] int32
    context_lens: torch.Tensor | None     # decode: [batch] int32, the new token included
    prefill_plan: PrefillPlan = DEFAULT_PREFILL   # prefill: the causal kernel per prompt length
    # decode: the kernel, picked at the first layer (every layer's tensors are alike; its checks
    # cost more than a small batch's attention arithmetic)
    decode_fn: object = field(default=None, repr=False, compare=False)

    @property
    def is_prefill(self) -> bool:
        return self.kind is StepKind.PREFILL

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: tuple[torch.Tensor, torch.Tensor] | None, scale: float,
               last_only: bool = False) -> torch.Tensor:
        """Attention of this step's queries once their K/V is in the cache (see paged_attention)."""
        if self.is_prefill:
            if last_only:
                return _last_token_attention(q, k, v, self.seq_bounds, scale)
            return _packed_causal_attention(q, k, v, self.seq_bounds, scale, self.prefill_plan)
        if kv_cache is None:
            raise ValueError("a decode step needs the KV cache")
        if self.decode_fn is None:
            self.decode_fn = pdkernels.decode_attention_fn(q, kv_cache[0], kv_cache[1], self.block_tables,
                                                           self.context_lens)
        return self.decode_fn(q, kv_cache[0], kv_cache[1], self.block_tables, self.context_lens, scale)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
                    meta: AttentionMetadata, scale: float, last_only: bool = False) -> torch.Tensor:
    """Store the new K/V in the cache, then attend.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim];
    kv_cache: (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim].
    Returns [tokens, heads, head_dim], or with `last_only` (prefill) only each
    sequence's last token: [seqs, heads, head_dim].
    """
    if kv_cache is not None:
        pdkernels.store_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
    return meta.attend(q, k, v, kv_cache, scale, last_only)


def _packed_causal_attention(q, k, v, seq_bounds, scale, plan):
    """Causal attention of each prompt over its own tokens: packed, no padding."""
    if len(seq_bounds) == 1:
        return causal_attention(q, k, v, scale, plan)
    out = torch.empty_like(q)
    for start, end in seq_bounds:
        out[start:end] = causal_attention(q[start:end], k[start:end], v[start:end], scale, plan)
    return out


def _last_token_attention(q, k, v, seq_bounds, scale):
    """Each sequence's last query over all its keys (the causal row of that token)."""
    rows = [sdpa(q[end - 1:end], k[start:end], v[start:end], scale, causal=False) for start, end in seq_bounds]
    return torch.cat(rows)
