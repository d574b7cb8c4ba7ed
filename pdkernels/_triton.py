"""Triton when it imports; otherwise stand-ins, so that the kernel modules (and
the torch references that live beside each kernel) import anyway.

Without Triton the `@triton.jit` functions stay plain Python functions that
nothing launches: the dispatcher only picks a Triton path when HAS_TRITON.
"""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    import types

    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)  # kernel annotations only
