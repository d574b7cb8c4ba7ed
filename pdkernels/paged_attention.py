"""Decode attention over the paged KV cache: one new query token per sequence.

Head h reads kv head h // (num_heads // kv_heads) (grouped-query attention).
block_tables rows list a sequence's cache blocks in order; entries past
cdiv(context_len, block_size) are padding and never read. context_lens >= 1.
"""
import threading

import torch

from pdkernels._triton import tl, triton

_scratch = threading.local()


def _scratch_buffer(name, numel, dtype, device):
    # Reused across calls (one per thread and name, as large as the largest call so far):
    # glibc hands freed multi-MB tensors back to the OS, and page-faulting them in again
    # on every call cost 2-4x the math here.
    # A buffer made under torch.inference_mode cannot be written outside it.
    buf = getattr(_scratch, name, None)
    if (buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device
            or buf.is_inference() != torch.is_inference_mode_enabled()):
        buf = torch.empty(numel, dtype=dtype, device=device)
        setattr(_scratch, name, buf)
    return buf[:numel]


def _gather_blocks(cache, block_tables, out):
    # cache: [num_blocks, block_size, kv_heads, head_dim]; block_tables: [batch, used_blocks]
    # out: [batch * kv_heads, n = used_blocks * block_size, head_dim]
    # Whole blocks are copied (one contiguous run each), then reordered head-major in
    # one strided copy: 35% faster on CPU than gathering 128-byte head rows.
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    batch, used = block_tables.shape
    if cache.stride()[1:] != (kv_heads * head_dim, head_dim, 1):
        cache = cache.contiguous()  # unusual layout: correct, but copies the cache
    blocks = cache.as_strided((num_blocks, block_size * kv_heads * head_dim), (cache.stride(0), 1))
    tmp = _scratch_buffer("blocks", batch * used * blocks.shape[1], cache.dtype, cache.device)
    torch.index_select(blocks, 0, block_tables.reshape(-1).long(), out=tmp.view(batch * used, -1))
    out.view(batch, kv_heads, used, block_size, head_dim).copy_(
        tmp.view(batch, used, block_size, kv_heads, head_dim).permute(0, 3, 1, 2, 4))


# A batch padded to its longest context does batch x longest work; a chatbot's mix of
# contexts made that 2-4x the sum of them, and decode steps grew ~3x faster with batch
# size than `pdcluster profile` (uniform contexts) measured. So sequences are grouped
# by length: a group pads at most PAD_SLACK of its work, or is small enough
# (GROUP_MIN_TOKENS padded) that another group's fixed cost would not pay.
PAD_SLACK = 0.25
GROUP_MIN_TOKENS = 512


def length_groups(context_lens, block_size):
    """Indices of the batch, longest first, in groups that pad little (see PAD_SLACK)."""
    blocks = [-(-int(n) // block_size) for n in context_lens]
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i])
    groups, group, top, total = [], [], 0, 0
    for i in order:
        b = blocks[i]
        if group and ((len(group) + 1) * top > (1 + PAD_SLACK) * (total + b)
                      and (len(group) + 1) * top * block_size > GROUP_MIN_TOKENS):
            groups.append(group)
            group, total = [], 0
        if not group:
            top = b
        group.append(i)
        total += b
    if group:
        groups.append(group)
    return groups


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    # q: [batch, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    # block_tables: [batch, max_blocks] int32; context_lens: [batch] int32 -> [batch, heads, head_dim]
    groups = length_groups(context_lens.tolist(), k_cache.shape[1]) if q.shape[0] > 1 else [[0]]
    if len(groups) == 1:
        return _padded_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(q)
    for group in groups:
        ix = torch.tensor(group, device=q.device)
        out[ix] = _padded_decode_attention(q[ix], k_cache, v_cache, block_tables[ix], context_lens[ix], scale)
    return out


def _padded_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One padded pass over the batch: every sequence gathered to the longest context."""
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1:3]
    group = num_heads // kv_heads
    if batch == 0:
        return torch.empty_like(q)
    used_blocks = -(-int(context_lens.max()) // block_size)  # gather no all-padding columns
    n = used_blocks * block_size
    pad = torch.arange(n, device=q.device) >= context_lens[:, None]  # [batch, n]
    # One K/V gather into a reused buffer: [2, batch * kv_heads, n, head_dim]
    kv = _scratch_buffer("kv", 2 * batch * kv_heads * n * head_dim, k_cache.dtype, q.device)
    kv = kv.view(2, batch * kv_heads, n, head_dim)
    _gather_blocks(k_cache, block_tables[:, :used_blocks], kv[0])
    _gather_blocks(v_cache, block_tables[:, :used_blocks], kv[1])
    # Slots past a sequence's length may hold anything, NaN too: their scores are
    # masked below, but 0 * NaN = NaN in probs @ v, so those V rows are zeroed.
    pad_seq, pad_pos = pad.nonzero(as_tuple=True)
    if pad_seq.numel():
        kv[1].view(batch, kv_heads, n, head_dim)[pad_seq, :, pad_pos] = 0
    # bf16 matmuls (fp32 accumulate) are fast on CPU; fp16 ones are not, so fp16 goes via fp32.
    compute = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    k, v = kv[0].to(compute), kv[1].to(compute)
    qg = q.reshape(batch * kv_heads, group, head_dim).to(compute)
    scores = torch.bmm(qg, k.transpose(1, 2)).view(batch, kv_heads, group, n).float()
    scores.mul_(scale).masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(compute).view(batch * kv_heads, group, n)
    return torch.bmm(probs, v).view(batch, num_heads, head_dim).to(q.dtype)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cb, stride_cs, stride_ch,  # cache strides: block, slot, kv head (head_dim is 1)
    stride_tb, block_size, head_dim, group,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (sequence, kv head): the group's query heads share each K/V load.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    gd_mask = (offs_g < group)[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0)
    q = q.to(tl.float32) * scale  # [BLOCK_G, BLOCK_D]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(0, tl.cdiv(context_len, block_size)):
        block_id = tl.load(block_tables_ptr + seq * stride_tb + i).to(tl.int64)
        n_mask = (offs_n < block_size) & (i * block_size + offs_n < context_len)
        kv_offs = block_id * stride_cb + kv_head * stride_ch + offs_n[:, None] * stride_cs + offs_d[None, :]
        kv_mask = n_mask[:, None] & (offs_d < head_dim)[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every visited block has a valid slot
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / l[:, None]
    out_offs = seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=gd_mask)


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale):
    # q: [batch, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    # block_tables: [batch, max_blocks] int32; context_lens: [batch] int32 -> [batch, heads, head_dim]
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1:3]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (
        f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    assert num_heads % kv_heads == 0, f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}"
    assert q.dtype == k_cache.dtype == v_cache.dtype in (torch.float32, torch.float16, torch.bfloat16), (
        f"q, k_cache, v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == batch, (
        f"block_tables must be int32 [{batch}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    assert context_lens.dtype == torch.int32 and context_lens.shape == (batch,), (
        f"context_lens must be int32 [{batch}], got {context_lens.dtype} {tuple(context_lens.shape)}")
    assert q.stride(2) == 1 and k_cache.stride(3) == 1, "q and the caches need head_dim contiguous"
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must have the same strides"
    assert block_tables.stride(1) == 1 and context_lens.is_contiguous(), "block tables must be row-contiguous"
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // kv_heads
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), block_size, head_dim, group,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=triton.next_power_of_2(block_size),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
