"""Write the K/V of new tokens into the paged cache.

slot = block_id * block_size + offset_in_block; slot -1 marks a token that is
not cached (padding), which both versions skip.
"""
import torch

from pdkernels._triton import tl, triton


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping):
    # key, value: [num_tokens, kv_heads, head_dim]
    # k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    # slot_mapping: [num_tokens] int64, -1 = skip
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_ids, offsets = slots // block_size, slots % block_size
    k_cache[block_ids, offsets] = key[keep].to(k_cache.dtype)
    v_cache[block_ids, offsets] = value[keep].to(v_cache.dtype)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_vt,  # token strides of key / value
    stride_cb, stride_cs,  # block and slot strides of the caches
    block_size, row_numel,  # row = kv_heads * head_dim, contiguous everywhere
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    cache_off = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    offs = tl.arange(0, BLOCK)
    mask = offs < row_numel
    k = tl.load(key_ptr + token.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(value_ptr + token.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + cache_off + offs, k, mask=mask)
    tl.store(v_cache_ptr + cache_off + offs, v, mask=mask)


def store_kv_triton(key, value, k_cache, v_cache, slot_mapping):
    # key, value: [num_tokens, kv_heads, head_dim]
    # k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    # slot_mapping: [num_tokens] int64, -1 = skip
    num_tokens, kv_heads, head_dim = key.shape
    num_blocks, block_size = k_cache.shape[:2]
    row_numel = kv_heads * head_dim
    assert value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert k_cache.shape == v_cache.shape == (num_blocks, block_size, kv_heads, head_dim), (
        f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit key {tuple(key.shape)}")
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, (
        f"dtypes differ: key {key.dtype}, value {value.dtype}, caches {k_cache.dtype}, {v_cache.dtype}")
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64, (
        f"slot_mapping must be int64 [{num_tokens}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    assert key.stride()[1:] == value.stride()[1:] == (head_dim, 1), (
        "key/value must be contiguous within a token (strides [*, head_dim, 1])")
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must have the same strides"
    assert k_cache.stride()[1:] == (row_numel, head_dim, 1), (
        "caches must be contiguous within a block (only the block stride is free), "
        f"got strides {k_cache.stride()}")
    assert slot_mapping.is_contiguous(), "slot_mapping must be contiguous"
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0), k_cache.stride(0), k_cache.stride(1),
        block_size, row_numel, BLOCK=triton.next_power_of_2(row_numel),
    )
