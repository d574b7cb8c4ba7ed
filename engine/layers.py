"""Building blocks of Llama-family decoders: norm, rotary embedding, linear."""
from __future__ import annotations

import math

import torch
from torch import nn


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """A parameter without random init: the weight loader fills it."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


# bf16 on CPU, 2-32 rows (decode steps, short prefills): oneDNN computes the
# product with the weight as the left operand, (W @ x^T)^T, 1.2-1.9x faster than
# F.linear's x @ W^T, and bit-identical to it on this machine's CPU (checked for
# 1-64 rows on every weight shape of the default model; from 33 rows the two
# differ, and F.linear is the faster one from ~64 rows). A decode step at batch
# 2-16 gets 1.1-1.5x faster; see docs/benchmarks.md. One row keeps ATen's GEMV
# (engine/cpu_tuning.py), and a bias keeps F.linear's fused add.
SMALL_MATMUL_MAX_ROWS = 32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for x [rows, in], by the faster CPU path for few bf16 rows."""
    if (bias is None and 2 <= x.shape[0] <= SMALL_MATMUL_MAX_ROWS and x.dim() == 2
            and x.dtype == torch.bfloat16 and x.device.type == "cpu"):
        return torch.mm(weight, x.t()).t()
    return nn.functional.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype)
        self.bias = empty_param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales in the model dtype, as the reference models do."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, dim]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


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
        # positions: [tokens]; q: [tokens, heads, head_dim]; k: [tokens, kv_heads, head_dim]
        cos_table, sin_table = self._tables(q.dtype)
        cos = cos_table[positions].unsqueeze(1)
        sin = sin_table[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _tables(self, dtype: torch.dtype):
        if dtype not in self._cast:
            self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._cast[dtype]


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
