"""The mixed step of chunked prefill: decode rows and prefill chunks in one forward pass.

A `MixedStepPlan` (engine/chunked_scheduler.py) packs decode rows first (one
token each) and then prefill chunks, each a run of a prompt's tokens that may
start after a prefix already in the cache. Every row's K/V is stored in the
paged cache first (as in any step); then decode rows use the paged decode
attention kernel, and a chunk's queries attend causally over its request's
cached prefix plus the chunk itself: the prefix K/V is gathered from the
request's blocks. A chunk that starts at position 0 attends over its own
K/V, exactly as a whole-prompt prefill does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pdkernels
from engine.attention import AttentionMetadata
from engine.cpu_tuning import matmul_backend
from engine.chunked_scheduler import NO_TOKEN
from engine.sampler import sample
from engine.sequence import StepKind, StepResult


@dataclass(frozen=True)
class Chunk:
    rows: tuple[int, int]          # [start, end) of the chunk in the packed step
    start_pos: int                 # position of its first token in the request
    block_ids: torch.Tensor        # [blocks] int64, the request's whole block table


@dataclass
class MixedAttentionMetadata(AttentionMetadata):
    """`block_tables` / `context_lens` cover the `num_decodes` leading rows; `chunks` the rest."""

    num_decodes: int = 0
    chunks: tuple[Chunk, ...] = ()

    def attend(self, q, k, v, kv_cache, scale, last_only=False):
        if kv_cache is None:
            raise ValueError("a mixed step needs the KV cache")
        return mixed_attention(q, k, v, kv_cache, self, scale)


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor], meta: MixedAttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim], already in `kv_cache`.

    Returns [tokens, heads, head_dim]."""
    k_cache, v_cache = kv_cache
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = pdkernels.paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables,
                                                  meta.context_lens, scale)
    gqa = q.shape[1] != k.shape[1]
    for c in meta.chunks:
        start, end = c.rows
        if c.start_pos == 0:
            out[start:end] = _sdpa(q[start:end], k[start:end], v[start:end], scale, gqa, None)
            continue
        n, ctx = end - start, c.start_pos + end - start
        keys = _gather_context(k_cache, c.block_ids, ctx)        # [ctx, kv_heads, head_dim]
        values = _gather_context(v_cache, c.block_ids, ctx)
        # query i sits at position start_pos + i and sees keys 0 ..= start_pos + i
        dev = q.device
        query_pos = c.start_pos + torch.arange(n, device=dev)
        mask = torch.arange(ctx, device=dev)[None, :] <= query_pos[:, None]   # [n, ctx]
        out[start:end] = _sdpa(q[start:end], keys, values, scale, gqa, mask)
    return out


def _gather_context(cache: torch.Tensor, block_ids: torch.Tensor, ctx: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, kv_heads, head_dim] -> [ctx, kv_heads, head_dim]
    block_size = cache.shape[1]
    used = -(-ctx // block_size)
    return cache.index_select(0, block_ids[:used].to(cache.device)).flatten(0, 1)[:ctx]


def _sdpa(q, k, v, scale, gqa, mask):
    # [len, heads, dim] -> [1, heads, len, dim] (the batch axis keeps CPU SDPA on its fused path)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                       scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


@torch.inference_mode()
def execute_mixed(runner, plan, on_layer=None) -> StepResult:
    """Run a MixedStepPlan on a ModelRunner: store every row's K/V, attend, sample the rows that end
    their request's prefill or decode (the others get NO_TOKEN)."""
    bs = runner.block_size
    nd = 0
    while nd < len(plan.seqs) and len(plan.seqs[nd].token_ids) == 1 and plan.seqs[nd].start_pos > 0:
        nd += 1   # the leading single-token rows over a cached context: paged decode attention
    ids, pos, slots, chunks = [], [], [], []
    for i, s in enumerate(plan.seqs):
        n = len(s.token_ids)
        positions = torch.arange(s.start_pos, s.start_pos + n)
        table = torch.tensor(s.block_ids, dtype=torch.int64)
        ids.extend(s.token_ids)
        pos.append(positions)
        slots.append(table[positions // bs] * bs + positions % bs)
        if i >= nd:
            chunks.append(Chunk((len(ids) - n, len(ids)), s.start_pos, table))
    tables, lens = None, None
    if nd:
        decodes = plan.seqs[:nd]
        tables = torch.zeros(nd, max(len(s.block_ids) for s in decodes), dtype=torch.int32)
        for i, s in enumerate(decodes):
            tables[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        lens = torch.tensor([s.context_len for s in decodes], dtype=torch.int32)
    dev = runner.device   # built on the CPU, then moved (a no-op there)
    meta = MixedAttentionMetadata(StepKind.MIXED, torch.cat(slots).to(dev), [],
                                  None if tables is None else tables.to(dev), None if lens is None else lens.to(dev),
                                  num_decodes=nd, chunks=tuple(chunks))
    with matmul_backend(len(ids), runner.model.gemm_plan):
        hidden = runner.model(torch.tensor(ids).to(dev), torch.cat(pos).to(dev), runner.kv_layers, meta,
                              on_layer=on_layer)   # [tokens, hidden]
        rows = [i for i, ok in enumerate(plan.samples) if ok]
        if not rows:
            return StepResult((NO_TOKEN,) * len(plan.seqs))
        ends = [c.rows[1] - 1 for c in chunks]
        last = [i if i < nd else ends[i - nd] for i in rows]      # each sampled seq's last row
        logits = runner.model.compute_logits(hidden[last])
        picked = sample(logits, [plan.seqs[i].sampling for i in rows],
                        [plan.seqs[i].context_len for i in rows], runner.generator)
    tokens = [NO_TOKEN] * len(plan.seqs)
    for i, t in zip(rows, picked):
        tokens[i] = t
    return StepResult(tuple(tokens))
