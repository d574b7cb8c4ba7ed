"""The CPU decode-attention kernel in C (cpu_decode_attention.c), built here on first use.

Built with the system C compiler (`$CC`, else `cc`) for this CPU (`-march=native`), about a
second, into `$PDCLUSTER_CACHE_DIR/native` (default ~/.cache/pdcluster/native) under a name
that hashes the source, the flags and the CPU model, and loaded with ctypes (which releases
the GIL during the call). Where there is no compiler, or PDCLUSTER_NATIVE_KERNELS=0, `load()`
returns None and callers keep the torch reference: the same results up to rounding, slower.
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
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-shared")
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


def library_path(compiler: str) -> Path:
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, _cpu_model(), platform.machine()])
                         .encode()).hexdigest()[:16]
    return _cache_dir() / f"cpu_decode_attention-{key}.so"


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name, then renamed: processes that build at once never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=COMPILE_TIMEOUT_S)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def load():
    """The kernel library, or None (disabled, no compiler, or the build failed: logged once)."""
    if os.environ.get("PDCLUSTER_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or ""
        log.warning("CPU decode-attention kernel unavailable (%s: %s%s); using the torch reference",
                    type(e).__name__, e, f"\n{detail}" if detail else "")
        return None
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float]
    return lib


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
