"""The CPU kernels in C, built here on first use: decode attention (cpu_decode_attention.c), the
causal softmax of prefill attention (cpu_causal_softmax.c) and the small fused ops of a layer
(cpu_fused.c: RMSNorm with the residual add, rotary, KV store).

Built with the system C compiler (`$CC`, else `cc`) for this CPU (`-march=native`), about a
second, into `$PDCLUSTER_CACHE_DIR/native` (default ~/.cache/pdcluster/native) under a name
that hashes the source, the flags and the CPU model, and loaded with ctypes (which releases
the GIL during the call). Where there is no compiler, or PDCLUSTER_NATIVE_KERNELS=0, `load()`
and `load_fused()` return None and callers keep the torch code: the same results up to
rounding (decode attention) or the same bits (the fused ops but RMSNorm's sum order), slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC")
SOFTMAX_SOURCE = Path(__file__).with_name("cpu_causal_softmax.c")
# The fused ops reproduce torch's rounding step by step: no reassociation, no FMA contraction.
FUSED_SOURCE = Path(__file__).with_name("cpu_fused.c")
FUSED_FLAGS = ("-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fPIC")
# Linked apart from compiling, without the flags above: gcc links crtfastmath.o into anything linked
# with -ffast-math, whose constructor sets flush-to-zero and denormals-are-zero for the whole process
# as the library loads (every later float op in Python, torch and numpy would lose subnormals).
LINK_FLAGS = ("-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
_FUNCTIONS = {torch.bfloat16: "paged_decode_attention_bf16", torch.float32: "paged_decode_attention_f32"}


def _cache_dir() -> Path:
    env = os.environ.get("PDCLUSTER_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "pdcluster") / "native"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(compiler: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]   # what the sources include
    parts = [source.read_text(), *headers, compiler, *flags, *LINK_FLAGS, _cpu_model(), platform.machine()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return _cache_dir() / f"{source.stem}-{key}.so"


def _build(compiler: str, path: Path, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name, then renamed: processes that build at once never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    try:
        for cmd in ([compiler, *flags, "-c", str(source), "-o", obj],
                    [compiler, *LINK_FLAGS, obj, "-o", tmp, "-lm"]):
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _load_library(source: Path, flags: tuple[str, ...], what: str):
    if os.environ.get("PDCLUSTER_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        path = library_path(compiler, source, flags)
        if not path.exists():
            _build(compiler, path, source, flags)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        log.warning("%s unavailable (%s: %s%s); using the torch code", what, type(e).__name__, e,
                    f"\n{detail}" if detail else "")
        return None


@functools.lru_cache(maxsize=None)
def load():
    """The decode-attention library, or None (disabled, no compiler, or the build failed: logged once)."""
    lib = _load_library(SOURCE, FLAGS, "CPU decode-attention kernel")
    if lib is None:
        return None
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float]
    return lib


@functools.lru_cache(maxsize=None)
def load_fused():
    """The fused-ops library (cpu_fused.c), or None as for `load()`."""
    lib = _load_library(FUSED_SOURCE, FUSED_FLAGS, "CPU fused-op kernels")
    if lib is None:
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {"add_rmsnorm": [p, i64, p, i64, p, i64, p, p, i64, i64, i64, f32],
                  "rope": [p, i64, i64, i64, i64, p, p, p, i64]}
    for base, argtypes in signatures.items():
        for suffix in ("bf16", "f32"):
            fn = getattr(lib, f"{base}_{suffix}")
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
    lib.store_kv.restype = ctypes.c_int
    lib.store_kv.argtypes = [p, i64, p, i64, p, p, p, i64, i64, i64, i64]
    return lib


@functools.lru_cache(maxsize=None)
def load_softmax():
    """The causal-softmax library (cpu_causal_softmax.c), or None as for `load()`."""
    lib = _load_library(SOFTMAX_SOURCE, FLAGS, "CPU causal-softmax kernel")
    if lib is None:
        return None
    for suffix in ("bf16", "f32"):
        fn = getattr(lib, f"causal_softmax_{suffix}")
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p] + [ctypes.c_int64] * 4
    return lib


_SOFTMAX = {torch.bfloat16: "causal_softmax_bf16", torch.float32: "causal_softmax_f32"}


def causal_softmax_(scores: torch.Tensor, kv_heads: int, rows: int, group: int, start: int) -> bool:
    """In place: scores [kv_heads, rows * group, start + rows] of a block of queries from `start` ->
    each row's causal softmax (zeros past its query's position). False where the C code does not
    apply (nothing done)."""
    lib = load_softmax() if scores.is_cpu and scores.dtype in _SOFTMAX and scores.is_contiguous() else None
    if lib is None or scores.shape != (kv_heads, rows * group, start + rows):
        return False
    if getattr(lib, _SOFTMAX[scores.dtype])(scores.data_ptr(), kv_heads, rows, group, start) != 0:
        raise MemoryError("the CPU causal-softmax kernel could not allocate its scratch memory")
    return True


def supports(q, k_cache, v_cache, block_tables, context_lens) -> bool:
    """Whether the kernel takes these tensors as they are (else: the torch reference)."""
    return (q.device.type == "cpu" and q.dtype in _FUNCTIONS and q.dtype == k_cache.dtype == v_cache.dtype
            and q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.shape[2] == k_cache.shape[3] and q.shape[1] % k_cache.shape[2] == 0
            and block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
            and block_tables.dim() == 2 and block_tables.shape[0] == q.shape[0] == context_lens.shape[0]
            and load() is not None)


def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale):
    """[batch, heads, head_dim] decode attention by the C kernel; `supports(...)` must hold."""
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    batch, heads, head_dim = q.shape
    out = torch.empty_like(q)
    if batch == 0:
        return out
    rc = getattr(load(), _FUNCTIONS[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), batch, heads, k_cache.shape[2], head_dim, k_cache.shape[1], block_tables.shape[1],
        k_cache.shape[0], float(scale))
    if rc == -2:
        raise ValueError(f"decode attention: a context length ({context_lens.tolist()}) is < 1 or needs more "
                         f"blocks than its block-table row ({block_tables.shape[1]}) holds, or a block id is "
                         f"outside the cache ({k_cache.shape[0]} blocks)")
    if rc != 0:
        raise MemoryError("the CPU decode-attention kernel could not allocate its scratch memory")
    return out
