"""Kernels: one Triton kernel per file with its pure-torch reference, and a C kernel for CPU decode attention.

The public functions below dispatch on where the tensors live: CUDA tensors go to
the Triton kernel when Triton imports, everything else (CPU, or no Triton) to
the torch reference. On CPU, decode attention and the KV store have C kernels
(cpu_native.py, cpu_fused.py), built on first use; the references stand in for
them where they cannot be built. Triton is
optional here: importing `pdkernels` never needs it or a GPU. Tests call the
`*_triton` functions directly on CPU tensors under TRITON_INTERPRET=1 (set before
this package is imported) and compare them with the references.
"""
from pdkernels._triton import HAS_TRITON
from pdkernels import cpu_fused, cpu_native
from pdkernels.block_copy import gather_blocks_ref, gather_blocks_triton, scatter_blocks_ref, scatter_blocks_triton
from pdkernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from pdkernels.store_kv import store_kv_ref, store_kv_triton

__all__ = ["HAS_TRITON", "decode_attention_fn", "gather_blocks", "paged_decode_attention", "scatter_blocks",
           "store_kv"]


def _on_triton(tensor):
    return HAS_TRITON and tensor.is_cuda


def store_kv(key, value, k_cache, v_cache, slot_mapping):
    # key, value: [num_tokens, kv_heads, head_dim] -> k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    if _on_triton(k_cache):
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    elif not cpu_fused.store_kv(key, value, k_cache, v_cache, slot_mapping):
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    # q: [batch, heads, head_dim] -> [batch, heads, head_dim]
    fn = decode_attention_fn(q, k_cache, v_cache, block_tables, context_lens)
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale)


def decode_attention_fn(q, k_cache, v_cache, block_tables, context_lens):
    """The decode-attention function `paged_decode_attention` picks for tensors like these. Every
    layer of a step has the same kinds of tensors: a caller may pick once per step."""
    if _on_triton(q):
        return paged_decode_attention_triton
    if cpu_native.supports(q, k_cache, v_cache, block_tables, context_lens):
        return cpu_native.paged_decode_attention_cpu
    return paged_decode_attention_ref


def gather_blocks(cache, block_ids, out=None):
    # cache: [slabs, num_blocks, block_numel]; block_ids: [n] -> [slabs, n, block_numel]
    fn = gather_blocks_triton if _on_triton(cache) else gather_blocks_ref
    return fn(cache, block_ids, out)


def scatter_blocks(buffer, cache, block_ids):
    # buffer: [slabs, n, block_numel] -> cache[:, block_ids[i]] = buffer[:, i], in place
    fn = scatter_blocks_triton if _on_triton(cache) else scatter_blocks_ref
    fn(buffer, cache, block_ids)
