"""Copy whole cache blocks between the paged cache and a packed buffer.

cache: [num_slabs, num_blocks, block_numel], where a slab is one layer's K or V
(the engine views [layers, 2, num_blocks, block_size, kv_heads, head_dim] as
[layers * 2, num_blocks, block_size * kv_heads * head_dim]).
buffer: [num_slabs, n, block_numel], row i holding block block_ids[i].
This is how a sequence's KV moves between workers; copies are bit-exact.
block_ids may come in any order; for scatter they must be distinct.
"""
import torch

from pdkernels._triton import tl, triton


def gather_blocks_ref(cache, block_ids, out=None):
    # cache: [slabs, num_blocks, block_numel]; block_ids: [n] int64 -> [slabs, n, block_numel]
    if out is None:
        return cache.index_select(1, block_ids)
    return torch.index_select(cache, 1, block_ids, out=out)


def scatter_blocks_ref(buffer, cache, block_ids):
    # buffer: [slabs, n, block_numel] -> cache[:, block_ids[i]] = buffer[:, i], in place
    cache.index_copy_(1, block_ids, buffer)


@triton.jit
def _copy_blocks_kernel(
    cache_ptr, buffer_ptr, block_ids_ptr,
    stride_cs, stride_cb, stride_bs, stride_bi, block_numel,
    TO_BUFFER: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (buffer row, slab, BLOCK-sized chunk of a cache block).
    i = tl.program_id(0)
    slab = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    block_id = tl.load(block_ids_ptr + i)
    cache_ptrs = cache_ptr + slab * stride_cs + block_id * stride_cb + offs
    buffer_ptrs = buffer_ptr + slab * stride_bs + i.to(tl.int64) * stride_bi + offs
    if TO_BUFFER:
        tl.store(buffer_ptrs, tl.load(cache_ptrs, mask=mask), mask=mask)
    else:
        tl.store(cache_ptrs, tl.load(buffer_ptrs, mask=mask), mask=mask)


def _check(cache, block_ids, buffer, name):
    assert cache.dim() == 3, f"cache must be [slabs, num_blocks, block_numel], got {tuple(cache.shape)}"
    assert block_ids.dtype == torch.int64 and block_ids.dim() == 1 and block_ids.is_contiguous(), (
        f"block_ids must be a contiguous int64 [n], got {block_ids.dtype} {tuple(block_ids.shape)}")
    num_slabs, _, block_numel = cache.shape
    want = (num_slabs, block_ids.shape[0], block_numel)
    assert buffer.shape == want, f"{name} must be {want}, got {tuple(buffer.shape)}"
    assert buffer.dtype == cache.dtype, f"{name} is {buffer.dtype} but cache is {cache.dtype}"
    assert buffer.device == cache.device == block_ids.device, "cache, block_ids and buffer on different devices"
    assert cache.stride(2) == 1 and buffer.stride(2) == 1, "a block's elements must be contiguous"


def _launch(cache, block_ids, buffer, to_buffer):
    num_slabs, n, block_numel = buffer.shape
    if n == 0 or num_slabs == 0:
        return
    block = min(triton.next_power_of_2(block_numel), 1024)
    grid = (n, num_slabs, triton.cdiv(block_numel, block))
    _copy_blocks_kernel[grid](
        cache, buffer, block_ids, cache.stride(0), cache.stride(1), buffer.stride(0), buffer.stride(1),
        block_numel, TO_BUFFER=to_buffer, BLOCK=block,
    )


def gather_blocks_triton(cache, block_ids, out=None):
    # cache: [slabs, num_blocks, block_numel]; block_ids: [n] int64 -> [slabs, n, block_numel]
    if out is None:
        out = torch.empty((cache.shape[0], block_ids.shape[0], cache.shape[2]), dtype=cache.dtype, device=cache.device)
    _check(cache, block_ids, out, "out")
    _launch(cache, block_ids, out, to_buffer=True)
    return out


def scatter_blocks_triton(buffer, cache, block_ids):
    # buffer: [slabs, n, block_numel] -> cache[:, block_ids[i]] = buffer[:, i], in place
    _check(cache, block_ids, buffer, "buffer")
    _launch(cache, block_ids, buffer, to_buffer=False)
