"""Building blocks of Llama-family decoders: norm, rotary embedding, linear."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.gemm import DEFAULT, GemmPlan, pack, packed_linear, plain_linear
from pdkernels import cpu_fused


# MODULE_CALL: the modules a decode step calls per layer (linears, rotary, attention, MLP, the layer)
# are called straight through `forward`: nn.Module.__call__'s hook and tracing checks cost ~0.8 us
# a call, 8 calls a layer, ~2% of a one-sequence decode step. The model uses no hooks.


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """A parameter without random init: the weight loader fills it."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           plan: GemmPlan = DEFAULT) -> torch.Tensor:
    """x @ weight^T (+ bias) for x [rows, in], by the plan's path for that many rows (engine/gemm.py)."""
    return plain_linear(x, weight, bias, plan.path(x.shape[0]) if x.dim() == 2 else "linear")


class Linear(nn.Module):
    """y = x @ Wᵀ (+ b). `pack_weight` swaps the plain weight for oneDNN's packed copy of it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None
        self.packed: torch.Tensor | None = None
        self.plan = DEFAULT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias, self.plan)

    def pack_weight(self) -> None:
        """From now on multiply by the packed copy; the plain weight is dropped (it is not kept twice)."""
        self.packed = pack(self.weight)
        self.weight = None

    __call__ = forward   # no nn.Module call machinery per call (see MODULE_CALL)


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales in the model dtype, as the reference models do."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, dim]
        return self.add_and_norm(x, None)[1]

    def add_and_norm(self, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) for s = h + delta (the residual add, rounded to the model dtype), or s = h.

        One call of the fused C op on CPU (pdkernels/cpu_fused.c): at decode batch sizes the
        eight torch ops it replaces cost 10-50x its arithmetic in dispatch."""
        fused = cpu_fused.add_rmsnorm(h, delta, self.weight, self.eps)
        if fused is not None:
            return fused
        s = h if delta is None else h + delta
        x = s.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return s, self.weight * x.to(s.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a cos/sin table precomputed per position."""

    def __init__(self, head_dim: int, theta: float, rope: dict, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = _inv_freq(head_dim, theta, rope)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)              # [positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)       # [positions, head_dim]
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # positions: [tokens]; q: [tokens, heads, head_dim]; k: [tokens, kv_heads, head_dim].
        # The fused C op rotates q and k in place (they are views of a fresh projection output),
        # with the torch code's rounding: the same bits.
        cos_table, sin_table = self._tables(q.dtype)
        if cpu_fused.rope_(q, positions, cos_table, sin_table) and cpu_fused.rope_(k, positions, cos_table, sin_table):
            return q, k
        cos = cos_table[positions].unsqueeze(1)
        sin = sin_table[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _tables(self, dtype: torch.dtype):
        if dtype not in self._cast:
            self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._cast[dtype]

    __call__ = forward   # no nn.Module call machinery per call (see MODULE_CALL)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _inv_freq(head_dim: int, theta: float, rope: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rope types Llama-family checkpoints use."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope), 1.0
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
