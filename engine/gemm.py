"""How the linear layers multiply on CPU: a path per row count, chosen by a measurement.

Paths, all computing x @ Wᵀ (+ bias) for x [rows, in] and W [out, in]:
  linear        F.linear on the plain weight (oneDNN, or MKL in fp32);
  weight_left   (W @ xᵀ)ᵀ: oneDNN with the weight as the left operand (faster at 2-32 rows
                on the AMX Xeon, 0.6x as fast on the EPYC: DESIGN.md);
  gemv          F.linear with oneDNN off, ATen's own kernel (one row only; the model runner
                turns oneDNN off around such a step: engine/cpu_tuning.py);
  packed        oneDNN on a copy of the weight reordered once, at start-up, into the blocked
                layout its kernels read (`mkldnn._reorder_linear_weight`), as vLLM's CPU build
                does: no per-call reorder. Measured on the EPYC (one thread, the default
                model's 120 linears): 1.2x (1 row) to 2.7x (8 rows) faster than the best plain
                path; see docs/benchmarks.md.
The packed copy replaces the plain weight (no second copy of the model is kept), so a model
either packs all of its linears, for every row count, or none: packed is chosen when it is no
slower than the best plain path at any row count measured (within 5%) and faster over all.

Only bf16 and fp16 models are tuned; fp32 keeps F.linear (the path the fp32 equality tests
against transformers run on).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import autotune

BUCKETS = (1, 2, 8, 32, 128, 512)
PLAIN_PATHS = ("linear", "weight_left", "gemv")
TUNED_DTYPES = (torch.bfloat16, torch.float16)
# Weights measured per row count: enough to stream from memory as a step does (more than any
# L3), few enough that a large model's start-up stays short.
MEASURE_BYTES = 256 << 20
PACKED_SLACK = 1.05


@dataclass(frozen=True)
class GemmPlan:
    packed: bool = False
    plain: tuple[tuple[int, str], ...] = ()   # (up to rows, path), ascending; beyond: "linear"

    def path(self, rows: int) -> str:
        if self.packed:
            return "packed"
        for max_rows, path in self.plain:
            if rows <= max_rows:
                return path
        return "linear"


DEFAULT = GemmPlan()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's blocked layout, for `packed_linear` (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [rows, in] (or [..., in]) -> [rows, out]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, path: str) -> torch.Tensor:
    if path == "weight_left" and bias is None and x.dim() == 2:
        return torch.mm(weight, x.t()).t()
    return F.linear(x, weight, bias)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in TUNED_DTYPES and weight.dim() == 2
            and torch.backends.mkldnn.is_available())


def choose_plan(weights: list[torch.Tensor], dtype: torch.dtype) -> GemmPlan:
    """The plan for a model whose linear weights are `weights` (measured here once per machine and shapes)."""
    if not weights or dtype not in TUNED_DTYPES or weights[0].device.type != "cpu" or not autotune.enabled():
        return DEFAULT
    shapes = sorted({tuple(w.shape) for w in weights})
    detail = f"{dtype} threads={torch.get_num_threads()} shapes={shapes} buckets={BUCKETS} code={autotune.source_hash(__file__)}"
    result = autotune.cached_choice("gemm", detail, lambda: _measure(_sample(weights), dtype))
    return GemmPlan(packed=result["packed"], plain=tuple((int(r), p) for r, p in result["plain"]))


def _sample(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    taken, total = [], 0
    for w in weights:
        taken.append(w)
        total += w.numel() * w.element_size()
        if total >= MEASURE_BYTES:
            break
    return taken


def _measure(weights: list[torch.Tensor], dtype: torch.dtype) -> dict:
    packed = [pack(w) for w in weights] if can_pack(weights[0]) else None
    timings: dict[int, dict[str, float]] = {}
    for rows in BUCKETS:
        xs = {n: torch.randn(rows, n).to(dtype) for n in {w.shape[1] for w in weights}}
        candidates: dict[str, Callable[[], object]] = {
            "linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights]}
        if rows <= 64:
            candidates["weight_left"] = lambda: [plain_linear(xs[w.shape[1]], w, None, "weight_left")
                                                 for w in weights]
        if rows == 1:
            candidates["gemv"] = lambda: _without_onednn(lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
        if packed is not None:
            candidates["packed"] = lambda: [packed_linear(xs[w.shape[1]], p) for w, p in zip(weights, packed)]
        timings[rows] = autotune.time_interleaved(candidates, rounds=3)
    return decide(timings) | {"ms": {str(r): {p: round(s * 1e3, 3) for p, s in t.items()}
                                     for r, t in timings.items()}}


def decide(timings: dict[int, dict[str, float]]) -> dict:
    """From seconds per path per row count: packed or not, and the best plain path per row count."""
    best_plain = {r: min((t[p], p) for p in PLAIN_PATHS if p in t) for r, t in timings.items()}
    use_packed = all("packed" in t and t["packed"] <= PACKED_SLACK * best_plain[r][0]
                     for r, t in timings.items()) and \
        sum(t["packed"] for t in timings.values()) < sum(b[0] for b in best_plain.values())
    return {"packed": use_packed, "plain": [(r, best_plain[r][1]) for r in sorted(timings)]}


def _without_onednn(fn: Callable[[], object]) -> object:
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return fn()
    finally:
        torch.backends.mkldnn.enabled = previous
