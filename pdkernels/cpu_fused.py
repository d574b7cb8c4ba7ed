"""Python side of the fused CPU ops in cpu_fused.c (built by cpu_native.load_fused()).

Each function returns None where the C code does not take its tensors as they are (another
device or dtype, a layout it does not handle, no compiler): the caller then runs its torch code,
which computes the same thing.
"""
from __future__ import annotations

import torch

from pdkernels import cpu_native

_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
# Process-wide switch for side-by-side measurements (benchmarks/experiments/engine_ab.py) and tests:
# False sends every caller to its torch code. PDCLUSTER_NATIVE_KERNELS=0 turns every C kernel off.
ENABLED = True
_FNS: dict = {}   # (name, dtype) -> the ctypes function or None, looked up once


def _fn(name: str, dtype: torch.dtype):
    """The C function `name`_<dtype>, or None (another dtype, switched off, no library)."""
    fn = _FNS.get((name, dtype), False)
    if fn is False:
        lib = cpu_native.load_fused() if dtype in _SUFFIX else None
        fn = _FNS[(name, dtype)] = getattr(lib, f"{name}_{_SUFFIX[dtype]}") if lib is not None else None
    return fn if ENABLED else None


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """h, delta: [rows, dim] -> (s = h + delta (h itself if delta is None), rms_norm(s) * weight)."""
    # Checked in this order, cheapest first: at decode batch sizes this wrapper's own cost counts.
    fn = _fn("add_rmsnorm", h.dtype) if h.is_cpu else None
    if fn is None or h.dim() != 2 or h.stride(1) != 1 or weight.dtype != h.dtype or not weight.is_contiguous() \
            or weight.shape[0] != h.shape[1]:
        return None
    rows, dim = h.shape
    if delta is None:
        s, delta_ptr, delta_stride = h, None, 0
    else:
        if delta.dtype != h.dtype or delta.shape != h.shape or delta.stride(1) != 1 or not delta.is_cpu:
            return None
        s, delta_ptr, delta_stride = torch.empty(rows, dim, dtype=h.dtype), delta.data_ptr(), delta.stride(0)
    out = torch.empty(rows, dim, dtype=h.dtype)
    fn(h.data_ptr(), h.stride(0), delta_ptr, delta_stride, s.data_ptr(), dim, weight.data_ptr(), out.data_ptr(),
       dim, rows, dim, eps)
    return s, out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotary in place on x: [tokens, heads, head_dim]; cos, sin: [positions, head_dim] in x's dtype.
    False where the C code does not apply (nothing done)."""
    fn = _fn("rope", x.dtype) if x.is_cpu else None
    if fn is None or cos.dtype != x.dtype or sin.dtype != x.dtype or x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2] \
            or positions.dtype != torch.int64 or not positions.is_contiguous() \
            or not cos.is_contiguous() or not sin.is_contiguous() or cos.shape[1] != x.shape[2] \
            or positions.shape != x.shape[:1]:
        return False
    rc = fn(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], x.shape[2],
                                                positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0])
    if rc != 0:
        raise IndexError(f"rotary: a position in {positions.tolist()} is outside the table ({cos.shape[0]})")
    return True


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> bool:
    """k_cache[slot] = key[t] (and v) for every slot >= 0; False where the C code does not apply."""
    lib = cpu_native.load_fused() if ENABLED and key.is_cpu and k_cache.is_cpu else None
    row = key.shape[1] * key.shape[2] if key.dim() == 3 else -1
    if lib is None or not key.dtype == value.dtype == k_cache.dtype == v_cache.dtype or key.shape != value.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4 \
            or key.stride()[1:] != (key.shape[2], 1) or value.stride()[1:] != (key.shape[2], 1) \
            or not k_cache.is_contiguous() or not v_cache.is_contiguous() \
            or k_cache.shape[2] * k_cache.shape[3] != row or slot_mapping.dtype != torch.int64 \
            or not slot_mapping.is_contiguous() or slot_mapping.shape != key.shape[:1]:
        return False
    elem = key.element_size()
    rc = lib.store_kv(key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), k_cache.data_ptr(),
                      v_cache.data_ptr(), slot_mapping.data_ptr(), key.shape[0], row * elem,
                      k_cache.shape[0] * k_cache.shape[1], elem)
    if rc != 0:
        raise IndexError(f"store_kv: a slot is past the cache ({k_cache.shape[0] * k_cache.shape[1]} slots)")
    return True
