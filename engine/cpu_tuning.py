"""Process-wide CPU settings that the engine's speed depends on (measured, see docs/benchmarks.md).

* glibc returns freed allocations above its mmap threshold to the OS, so every
  step's multi-MB temporaries were page-faulted in again (2-4x the cost of the
  math in decode attention). Raising the mmap and trim thresholds keeps them.
* oneDNN's bf16 matmul on a plain weight can be slow for one row (a GEMV: ~7 GB/s
  against ~14 GB/s for ATen's own kernel on the AMX Xeon). Where the model's
  measured plan (engine/gemm.py) says so, the model runner turns oneDNN off
  around one-row steps.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys

import torch

from engine.gemm import GemmPlan

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False



def keep_freed_memory(threshold_bytes: int = 1 << 30) -> None:
    """Ask glibc to keep freed blocks below `threshold_bytes` in the heap (once per process)."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
        libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
    except OSError:
        return  # not glibc (musl, ...): nothing to tune
    _applied = True


@contextlib.contextmanager
def matmul_backend(num_rows: int, plan: GemmPlan):
    """A step of `num_rows` rows runs in this: oneDNN off where the plan's path for them is ATen's GEMV."""
    if plan.path(num_rows) != "gemv":
        yield
        return
    # The `enabled` property alone: mkldnn.flags() also resets TF32 and warns.
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous
