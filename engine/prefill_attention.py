"""Causal attention of a prompt over itself (prefill), by a kernel chosen by a measurement.

Kernels, for one sequence (q: [n, heads, head_dim]; k, v: [n, kv_heads, head_dim]):
  sdpa         torch's scaled_dot_product_attention (its flash kernel with 4-D inputs);
  blocked-B    query blocks of B rows, each attending only to the keys up to its own end
               (the causal half of the work, plus the diagonal block's triangle), as two
               batched GEMMs per block over every query head of a kv head at once (GQA
               without repeating K/V) and one softmax. The GEMMs are oneDNN's: on the EPYC,
               a 512-token prompt's attention takes ~2.4 ms per layer against SDPA's ~7.2.
               The causal mask and the softmax are one pass of a C kernel on CPU
               (pdkernels/cpu_causal_softmax.c). Scores are rounded to the model dtype
               before the (fp32) softmax, as in transformers' eager attention; SDPA keeps
               them in fp32.
Which one is fastest depends on the processor and the prompt's length, so each length bucket
gets the kernel that measured fastest on this machine (engine/autotune.py, cached).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import autotune
from pdkernels import cpu_native

KERNELS = ("sdpa", "blocked-64", "blocked-128", "blocked-256")
LENGTHS = (128, 512, 2048)   # measured buckets: a prompt takes the first bucket it fits, else the last


@dataclass(frozen=True)
class PrefillPlan:
    by_length: tuple[tuple[int, str], ...] = ()    # (up to length, kernel), ascending; else sdpa

    def kernel(self, n: int) -> str:
        for max_len, kernel in self.by_length:
            if n <= max_len:
                return kernel
        return self.by_length[-1][1] if self.by_length else "sdpa"


DEFAULT = PrefillPlan()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     plan: PrefillPlan = DEFAULT) -> torch.Tensor:
    """q: [n, heads, head_dim]; k, v: [n, kv_heads, head_dim] -> [n, heads, head_dim]."""
    kernel = plan.kernel(q.shape[0])
    if kernel == "sdpa":
        return sdpa(q, k, v, scale, causal=True)
    return blocked_causal(q, k, v, scale, int(kernel.split("-")[1]))


def sdpa(q, k, v, scale, causal):
    # [len, heads, dim] -> [1, heads, len, dim] for SDPA and back. The batch axis matters: with
    # 3-D inputs CPU SDPA takes its unfused math path, 3x slower.
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], is_causal=causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def blocked_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads                    # query heads per kv head (h reads kv head h // group)
    qg = q.view(n, kv_heads, group, d).permute(1, 0, 2, 3)   # [kv_heads, n, group, d]
    kt = k.permute(1, 2, 0)                                  # [kv_heads, d, n]
    vh = v.transpose(0, 1)                                   # [kv_heads, n, d]
    out = torch.empty(n, kv_heads, group, d, dtype=q.dtype, device=q.device)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)   # key after query
    zero = q.new_zeros(1, 1, 1)
    for start in range(0, n, block):
        end = min(n, start + block)
        rows = end - start
        qb = qg[:, start:end].reshape(kv_heads, rows * group, d)
        # scores: [kv_heads, rows * group, end], only the keys up to this block's end
        scores = torch.baddbmm(zero, qb, kt[:, :, :end], beta=0, alpha=scale)
        if cpu_native.causal_softmax_(scores, kv_heads, rows, group, start):   # mask + softmax, one pass
            probs = scores
        else:
            diagonal = scores.view(kv_heads, rows, group, end)[..., start:end]
            diagonal.masked_fill_(above[:rows, :rows][None, :, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)            # fp32 inside, model dtype out
        out[start:end] = torch.bmm(probs, vh[:, :end]).view(kv_heads, rows, group, d).transpose(0, 1)
    return out.view(n, heads, d)


def choose_plan(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> PrefillPlan:
    """The kernel per length bucket for this attention shape (measured once per machine, cached)."""
    if torch.device(device).type != "cpu" or not autotune.enabled():
        return DEFAULT
    detail = (f"{num_heads}/{num_kv_heads}x{head_dim} {dtype} threads={torch.get_num_threads()} lengths={LENGTHS} "
              f"code={autotune.source_hash(__file__, cpu_native.SOFTMAX_SOURCE)}")
    result = autotune.cached_choice("prefill-attention", detail,
                                    lambda: _measure(num_heads, num_kv_heads, head_dim, dtype))
    return PrefillPlan(tuple((int(n), kernel) for n, kernel in result["by_length"]))


def _measure(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    by_length, ms = [], {}
    for n in LENGTHS:
        q = torch.randn(n, num_heads, head_dim, generator=g).to(dtype)
        k, v = (torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
        plans = {kernel: PrefillPlan(((n, kernel),)) for kernel in KERNELS}
        times = autotune.time_interleaved(
            {kernel: (lambda p=p: causal_attention(q, k, v, head_dim ** -0.5, p)) for kernel, p in plans.items()},
            rounds=3)
        by_length.append((n, min(times, key=times.get)))
        ms[str(n)] = {kernel: round(t * 1e3, 3) for kernel, t in times.items()}
    return {"by_length": by_length, "ms": ms}
