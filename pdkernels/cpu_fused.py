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


def _lib(*tensors: torch.Tensor):
    t = tensors[0]
    if not ENABLED or t.device.type != "cpu" or t.dtype not in _SUFFIX or any(x.dtype != t.dtype for x in tensors):
        return None
    return cpu_native.load_fused()


def _rows_ok(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(1) == 1


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """h, delta: [rows, dim] -> (s = h + delta (h itself if delta is None), rms_norm(s) * weight)."""
    parts = (h, weight) if delta is None else (h, delta, weight)
    lib = _lib(*parts)
    if lib is None or not _rows_ok(h) or not weight.is_contiguous() or weight.shape != h.shape[1:] \
            or (delta is not None and (not _rows_ok(delta) or delta.shape != h.shape)):
        return None
    rows, dim = h.shape
    out = torch.empty(rows, dim, dtype=h.dtype)
    s = h if delta is None else torch.empty(rows, dim, dtype=h.dtype)
    getattr(lib, f"add_rmsnorm_{_SUFFIX[h.dtype]}")(
        h.data_ptr(), h.stride(0), None if delta is None else delta.data_ptr(),
        0 if delta is None else delta.stride(0), s.data_ptr(), s.stride(0), weight.data_ptr(),
        out.data_ptr(), dim, rows, dim, eps)
    return s, out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotary in place on x: [tokens, heads, head_dim]; cos, sin: [positions, head_dim] in x's dtype.
    False where the C code does not apply (nothing done)."""
    lib = _lib(x, cos, sin)
    if lib is None or x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2] \
            or positions.dtype != torch.int64 or not positions.is_contiguous() \
            or not cos.is_contiguous() or not sin.is_contiguous() or cos.shape[1] != x.shape[2] \
            or positions.shape != x.shape[:1]:
        return False
    rc = getattr(lib, f"rope_{_SUFFIX[x.dtype]}")(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], x.shape[2],
                                                positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0])
    if rc != 0:
        raise IndexError(f"rotary: a position in {positions.tolist()} is outside the table ({cos.shape[0]})")
    return True


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> bool:
    """k_cache[slot] = key[t] (and v) for every slot >= 0; False where the C code does not apply."""
    lib = _lib(key, value, k_cache, v_cache)
    row = key.shape[1] * key.shape[2] if key.dim() == 3 else -1
    if lib is None or key.shape != value.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4 \
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
