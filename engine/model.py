"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Tokens of all sequences in a step are packed along one axis: every tensor is
[tokens, ...], never [batch, seq, ...]. Tensor parallelism splits heads and MLP
columns (q/k/v and gate/up are column-parallel, o and down are row-parallel
and followed by an all-reduce); pipeline parallelism builds only this stage's
layer range. Both come from `ParallelContext`; the default is one rank.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.gemm import DEFAULT, GemmPlan, pack, packed_linear
from engine.layers import Linear, RMSNorm, RotaryEmbedding, empty_param, linear
from engine.model_config import ModelConfig
from engine.parallel import ParallelContext

KVLayer = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.par = par
        # whole GQA groups per rank, possibly uneven (see engine.parallel)
        self.q_heads = par.q_heads(cfg.num_heads, cfg.num_kv_heads)
        self.kv_heads = par.kv_heads(cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads = len(self.q_heads), len(self.kv_heads)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, dtype)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, False, dtype)
        self.rotary = rotary

    def forward(self, positions, x, kv_cache: KVLayer | None, meta: AttentionMetadata,
                last_only: bool = False):
        # x: [tokens, hidden] -> [tokens, hidden], or [seqs, hidden] with last_only
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, last_only)  # [rows, heads, head_dim]
        return self.par.all_reduce(self.o_proj(o.reshape(o.shape[0], self.q_size)))

    __call__ = forward   # no nn.Module call machinery (engine/layers.py, MODULE_CALL)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.par = par
        self.columns = par.columns(cfg.intermediate_size, "intermediate_size")
        self.inter = len(self.columns)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, False, dtype)
        self.down_proj = Linear(self.inter, cfg.hidden_size, False, dtype)

    def forward(self, x):
        # x: [tokens, hidden]. Long prompts run gate and up as two GEMMs on the
        # halves of the fused weight: oneDNN is faster on the narrower outputs there.
        if x.shape[0] >= _SPLIT_GATE_UP_TOKENS and self.gate_up_proj.packed is None:
            w = self.gate_up_proj.weight
            gate = nn.functional.linear(x, w[:self.inter])
            up = nn.functional.linear(x, w[self.inter:])
        else:
            gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        # silu() makes a fresh contiguous tensor; multiplying into it in place is
        # ~3x faster on CPU than `silu(gate) * up` over two strided halves.
        return self.par.all_reduce(self.down_proj(nn.functional.silu(gate).mul_(up)))

    __call__ = forward   # no nn.Module call machinery (engine/layers.py, MODULE_CALL)


_SPLIT_GATE_UP_TOKENS = 128


class DecoderLayer(nn.Module):
    def __init__(self, cfg, par, rotary, dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, par, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, par, dtype)

    def forward(self, positions, h, kv_cache, meta, last_rows=None, delta=None):
        """The hidden state coming in is h + delta (delta: the previous layer's MLP output, still to
        be added: the add is fused into this layer's first norm); returns (h, delta) the same way.
        With `last_rows` (prefill, last layer) only those rows go past attention."""
        h, x = self.input_layernorm.add_and_norm(h, delta)
        a = self.self_attn(positions, x, kv_cache, meta, last_rows is not None)
        h, x = self.post_attention_layernorm.add_and_norm(h if last_rows is None else h[last_rows], a)
        return h, self.mlp(x)

    __call__ = forward   # no nn.Module call machinery (engine/layers.py, MODULE_CALL)


class CausalLM(nn.Module):
    """One pipeline stage of the model (the whole model at pp_size = 1)."""

    def __init__(self, cfg: ModelConfig, par: ParallelContext, dtype: torch.dtype,
                 max_positions: int) -> None:
        super().__init__()
        self.cfg, self.par, self.dtype = cfg, par, dtype
        self.layer_range = par.layer_range(cfg.num_layers)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_params, max_positions)
        self.rotary = rotary
        needs_embed = par.is_first_stage or (par.is_last_stage and cfg.tie_word_embeddings)
        self.embed_tokens = empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype) if needs_embed else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, par, rotary, dtype) for _ in self.layer_range)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if par.is_last_stage else None
        self.lm_head = (empty_param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
                        if par.is_last_stage and not cfg.tie_word_embeddings else None)
        self.gemm_plan = DEFAULT
        self.logits_packed: torch.Tensor | None = None   # the LM head packed (engine/gemm.py)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                kv_caches: list[KVLayer] | None, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None, last_rows: list[int] | None = None,
                on_layer=None) -> torch.Tensor:
        """input_ids: [tokens] on the first stage, else hidden: [tokens, hidden].

        On the last stage of a prefill, `last_rows` (each sequence's last token)
        trims the final layer: it still stores every token's K/V, but attention
        output, MLP and norm run for those rows only, and only they are returned.
        `on_layer(i)`, if given, runs once local layer i has stored its K/V (layer-wise
        KV streaming sends it while the later layers compute).
        """
        h = nn.functional.embedding(input_ids, self.embed_tokens) if self.par.is_first_stage else hidden
        delta = None
        last = len(self.layers) - 1
        trim = last_rows if self.par.is_last_stage and meta.is_prefill else None
        for i, layer in enumerate(self.layers):
            kv = kv_caches[i] if kv_caches is not None else None
            h, delta = layer(positions, h, kv, meta, trim if i == last else None, delta)
            if on_layer is not None:
                on_layer(i)
        if self.norm is not None:
            return self.norm.add_and_norm(h, delta)[1]
        return h if delta is None else h + delta

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [rows, hidden] -> [rows, vocab] in fp32
        if self.logits_packed is not None:
            return packed_linear(hidden, self.logits_packed).float()
        return linear(hidden, self._logits_weight(), plan=self.gemm_plan).float()

    def _logits_weight(self) -> torch.Tensor | None:
        if not self.par.is_last_stage:
            return None
        return self.lm_head if self.lm_head is not None else self.embed_tokens

    def linear_weights(self) -> list[torch.Tensor]:
        """The weights a step multiplies by, in the order it does (what engine.gemm measures)."""
        weights = [m.weight for m in self.modules() if isinstance(m, Linear) and m.weight is not None]
        logits = self._logits_weight()
        return weights + ([logits] if logits is not None else [])

    def use_gemm_plan(self, plan: GemmPlan) -> None:
        """Multiply by `plan` from now on; a packed plan packs every linear weight and the LM head."""
        self.gemm_plan = plan
        for m in self.modules():
            if isinstance(m, Linear):
                m.plan = plan
                if plan.packed and m.packed is None:
                    m.pack_weight()
        logits = self._logits_weight()
        if plan.packed and logits is not None:
            # a tied head stays the embedding too: packed, it is a second copy (the embedding's lookups
            # need the plain one); an untied one is only ever multiplied by
            self.logits_packed = pack(logits)
            if self.lm_head is not None:
                self.lm_head = None
