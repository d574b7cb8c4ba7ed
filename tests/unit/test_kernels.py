"""Kernels: every Triton kernel (run by the interpreter on CPU, TRITON_INTERPRET=1
from tests/conftest.py) against its torch reference, and every reference against
a naive loop written independently here."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pdkernels
from pdkernels.block_copy import gather_blocks_ref, gather_blocks_triton, scatter_blocks_ref, scatter_blocks_triton
from pdkernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from pdkernels.store_kv import store_kv_ref, store_kv_triton
from pdkernels import cpu_native
from pdkernels.cpu_native import paged_decode_attention_cpu

CONTEXT_LENS = [1, 15, 16, 17, 33, 100]  # one token, block edges, partial last blocks
HEAD_CONFIGS = [(9, 3, 64), (4, 4, 32), (8, 2, 20), (16, 1, 64)]  # (heads, kv_heads, head_dim): default model, MHA,
# GQA + odd dim, a group too wide for the AVX512-BF16 kernel's registers (its generic fallback)


# --- naive versions, written without the references' tricks ---------------------

def naive_store_kv(key, value, k_cache, v_cache, slot_mapping):
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[token]
            v_cache[slot // block_size, slot % block_size] = value[token]


def naive_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    # float64, one sequence and one head at a time, explicit softmax
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1:3]
    out = torch.empty(batch, num_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        positions = range(int(context_lens[b]))
        blocks = [int(block_tables[b, p // block_size]) for p in positions]
        for h in range(num_heads):
            kv_head = h // (num_heads // kv_heads)
            k = torch.stack([k_cache[blk, p % block_size, kv_head] for blk, p in zip(blocks, positions)]).double()
            v = torch.stack([v_cache[blk, p % block_size, kv_head] for blk, p in zip(blocks, positions)]).double()
            scores = (k @ q[b, h].double()) * scale
            weights = torch.exp(scores - scores.max())
            out[b, h] = (weights / weights.sum()) @ v
    return out


def naive_gather(cache, block_ids):
    return torch.stack([cache[:, i] for i in block_ids.tolist()], dim=1)


# --- inputs ---------------------------------------------------------------------

def paged_inputs(context_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """q, caches and block tables for one decode step. Cache slots no sequence
    owns hold NaN, so any read past a sequence's length shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    max_blocks = max(blocks_per_seq) + 2  # padded columns, as the engine's tables are
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    block_tables = torch.zeros(batch, max_blocks, dtype=torch.int32)  # padding entries: block 0
    free = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled, non-contiguous blocks
    for b, n in enumerate(context_lens):
        ids = [free.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        for p in range(n):
            k_cache[ids[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[ids[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


def shuffled_slots(num_tokens, num_blocks, block_size, num_skipped, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:num_skipped]] = -1
    return slots


# --- store_kv -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,head_dim", [(3, 64), (4, 32), (2, 20)])
@pytest.mark.parametrize("block_size", [16, 8])
def test_store_kv_triton_matches_ref(dtype, kv_heads, head_dim, block_size):
    num_tokens, num_blocks = 37, 9
    gen = torch.Generator().manual_seed(1)
    # key/value are slices of one fused projection; the caches are K and V halves of one
    # [num_blocks, 2, block_size, ...] tensor: both only strided along their leading dim.
    kv = torch.randn(num_tokens, 3, kv_heads, head_dim, generator=gen).to(dtype)
    key, value = kv[:, 1], kv[:, 2]
    slots = shuffled_slots(num_tokens, num_blocks, block_size, num_skipped=6)
    caches = torch.randn(2, num_blocks, 2, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    ref, tri = caches[0], caches[1].clone().copy_(caches[0])
    store_kv_ref(key, value, ref[:, 0], ref[:, 1], slots)
    store_kv_triton(key, value, tri[:, 0], tri[:, 1], slots)
    assert torch.equal(ref, tri)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_ref_matches_naive(dtype):
    num_tokens, num_blocks, block_size = 50, 8, 8
    key, value = torch.randn(2, num_tokens, 3, 64).to(dtype)
    slots = shuffled_slots(num_tokens, num_blocks, block_size, num_skipped=9)
    ref = torch.zeros(2, num_blocks, block_size, 3, 64, dtype=dtype)
    naive = ref.clone()
    store_kv_ref(key, value, ref[0], ref[1], slots)
    naive_store_kv(key, value, naive[0], naive[1], slots)
    assert torch.equal(ref, naive)
    assert (ref != 0).any(dim=(-1, -2)).sum() == 2 * (num_tokens - 9)  # skipped tokens wrote nothing


def test_store_kv_all_skipped_and_empty():
    k_cache = torch.zeros(2, 4, 1, 8)
    for num_tokens in (0, 3):
        key = torch.randn(num_tokens, 1, 8)
        slots = torch.full((num_tokens,), -1, dtype=torch.int64)
        store_kv_triton(key, key, k_cache, k_cache.clone(), slots)
        store_kv_ref(key, key, k_cache, k_cache.clone(), slots)
    assert not k_cache.any()


# --- paged decode attention ---------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_CONFIGS)
@pytest.mark.parametrize("block_size", [16, 8])
def test_paged_attention_triton_matches_ref(dtype, tol, heads, kv_heads, head_dim, block_size):
    q, k_cache, v_cache, block_tables, lens = paged_inputs(CONTEXT_LENS, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, scale)
    tri = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, scale)
    assert tri.dtype == ref.dtype == dtype and tri.shape == q.shape
    assert torch.isfinite(tri).all(), "read a slot past a sequence's length"
    torch.testing.assert_close(tri.float(), ref.float(), atol=tol, rtol=tol)


def test_paged_attention_triton_strided_q():
    # q sliced out of a fused qkv projection: token stride != heads * head_dim
    _, k_cache, v_cache, block_tables, lens = paged_inputs([5, 40], 9, 3, 64, 16, torch.float32)
    qkv = torch.randn(2, 9 + 3 + 3, 64)
    q = qkv[:, :9]
    tri = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.125)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_CONFIGS)
@pytest.mark.parametrize("block_size", [16, 8])
def test_paged_attention_ref_matches_naive(dtype, tol, heads, kv_heads, head_dim, block_size):
    q, k_cache, v_cache, block_tables, lens = paged_inputs(CONTEXT_LENS, heads, kv_heads, head_dim, block_size, dtype)
    scale = 0.3  # not head_dim ** -0.5, so a dropped or doubled scale shows
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, scale)
    naive = naive_attention(q, k_cache, v_cache, block_tables, lens, scale)
    # relative to the output's magnitude: bf16 matmuls round scores to 8 bits
    torch.testing.assert_close(ref.double(), naive, atol=tol * naive.abs().max().item(), rtol=tol)


def test_length_groups_partition_the_batch_and_bound_the_padding():
    from pdkernels.paged_attention import GROUP_MIN_TOKENS, PAD_SLACK, length_groups
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        lens = torch.randint(1, 1500, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng).tolist()
        groups = length_groups(lens, 16)
        assert sorted(i for g in groups for i in g) == list(range(len(lens)))
        for g in groups:
            blocks = [-(-lens[i] // 16) for i in g]
            padded = len(g) * max(blocks)
            assert padded <= (1 + PAD_SLACK) * sum(blocks) or padded * 16 <= GROUP_MIN_TOKENS
    assert length_groups([1000, 30, 990, 20], 16) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_ref_grouped_by_length_equals_each_sequence_alone(dtype):
    """A batch of very different lengths runs in several padded passes; every sequence's
    output is exactly what it gets alone (no cross-talk, nothing left unwritten)."""
    from pdkernels.paged_attention import length_groups
    lens = [900, 17, 640, 33, 1000, 250, 5, 260]
    assert len(length_groups(lens, 16)) > 1
    q, k_cache, v_cache, block_tables, ctx = paged_inputs(lens, 9, 3, 64, 16, dtype)
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, ctx, 0.125)
    for i in range(len(lens)):
        alone = paged_decode_attention_ref(q[i:i + 1], k_cache, v_cache, block_tables[i:i + 1], ctx[i:i + 1], 0.125)
        torch.testing.assert_close(out[i:i + 1], alone)   # padding to a longer context adds exact zeros
    naive = naive_attention(q, k_cache, v_cache, block_tables, ctx, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), naive, atol=tol * naive.abs().max().item(), rtol=tol)


def test_paged_attention_ref_single_token_returns_its_value():
    q, k_cache, v_cache, block_tables, lens = paged_inputs([1, 1, 1], 4, 2, 16, 16, torch.float32)
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 1.0)
    first = v_cache[block_tables[:, 0].long(), 0]  # [batch, kv_heads, head_dim]
    torch.testing.assert_close(out, first.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("attention", [paged_decode_attention_ref, paged_decode_attention_triton,
                                       paged_decode_attention_cpu])
def test_paged_attention_empty_batch(attention):
    q, k_cache, v_cache, block_tables, lens = paged_inputs([4], 4, 2, 16, 8, torch.float32)
    out = attention(q[:0], k_cache, v_cache, block_tables[:0], lens[:0], 0.25)
    assert out.shape == (0, 4, 16)


# --- the C kernel for CPU decode attention (pdkernels/cpu_native.py) -------------------

def test_c_kernel_builds_where_there_is_a_compiler():
    # without this, every test below would pass on the torch reference's behalf
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: the torch reference serves")
    assert cpu_native.load() is not None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_CONFIGS)
@pytest.mark.parametrize("block_size", [16, 8])
def test_c_kernel_matches_naive(dtype, tol, heads, kv_heads, head_dim, block_size):
    # unowned cache slots hold NaN (paged_inputs): a read past a sequence's length shows
    q, k_cache, v_cache, block_tables, lens = paged_inputs(CONTEXT_LENS, heads, kv_heads, head_dim, block_size, dtype)
    assert cpu_native.supports(q, k_cache, v_cache, block_tables, lens)
    out = paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lens, 0.3)
    naive = naive_attention(q, k_cache, v_cache, block_tables, lens, 0.3)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive, atol=tol * naive.abs().max().item(), rtol=tol)


def test_c_kernel_is_closer_to_exact_than_the_bf16_reference():
    # it accumulates in fp32 and rounds once; the reference rounds scores and weights to bf16
    lens = [700, 33, 410, 1, 256, 999]
    q, k_cache, v_cache, block_tables, ctx = paged_inputs(lens, 9, 3, 64, 16, torch.bfloat16, seed=4)
    naive = naive_attention(q, k_cache, v_cache, block_tables, ctx, 0.125)
    c_err = (paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, ctx, 0.125).double() - naive).abs().max()
    ref_err = (paged_decode_attention_ref(q, k_cache, v_cache, block_tables, ctx, 0.125).double() - naive).abs().max()
    assert c_err < ref_err


def test_c_kernel_takes_a_strided_q():
    # q sliced out of a fused qkv projection: token stride != heads * head_dim
    _, k_cache, v_cache, block_tables, lens = paged_inputs([5, 40], 9, 3, 64, 16, torch.float32)
    q = torch.randn(2, 9 + 3 + 3, 64)[:, :9]
    out = paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lens, 0.125)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.125),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", ["block id past the cache", "negative block id", "context past the table",
                                 "empty context"])
def test_c_kernel_refuses_bad_tables_instead_of_reading_out_of_bounds(bad):
    q, k_cache, v_cache, block_tables, lens = paged_inputs([20, 3], 4, 2, 16, 8, torch.float32)
    if bad == "block id past the cache":
        block_tables[0, 1] = k_cache.shape[0]
    elif bad == "negative block id":
        block_tables[1, 0] = -1
    elif bad == "context past the table":
        lens[0] = block_tables.shape[1] * 8 + 1
    else:
        lens[1] = 0
    with pytest.raises(ValueError, match="block"):
        paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lens, 0.25)


@pytest.mark.parametrize("env", [{"PDCLUSTER_NATIVE_KERNELS": "0"}, {"CC": "/nonexistent/cc"}])
def test_without_the_c_kernel_attention_falls_back_to_the_reference(env, tmp_path):
    # switched off, or no compiler (in a fresh cache, so nothing built earlier is found)
    code = (
        "import torch, pdkernels\n"
        "from pdkernels import cpu_native\n"
        "assert cpu_native.load() is None\n"
        "q, k, v = torch.randn(2, 4, 16), torch.randn(6, 8, 2, 16), torch.randn(6, 8, 2, 16)\n"
        "tables, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([9, 16], dtype=torch.int32)\n"
        "out = pdkernels.paged_decode_attention(q, k, v, tables, lens, 0.25)\n"
        "assert torch.equal(out, pdkernels.paged_decode_attention_ref(q, k, v, tables, lens, 0.25))\n"
    )
    run_env = {**os.environ, "PDCLUSTER_CACHE_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], cwd=pdkernels.__path__[0] + "/..", env=run_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if "CC" in env:
        assert "CPU decode-attention kernel unavailable" in done.stderr
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.so.*"))


def test_c_kernel_builds_once_when_processes_race(tmp_path):
    # Ray starts several workers at once on a fresh machine: each builds to a temporary name
    # and renames it, so none loads a half-written library
    code = ("from pdkernels import cpu_native\n"
            "assert cpu_native.load() is not None\n")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine")
    env = {**os.environ, "PDCLUSTER_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=pdkernels.__path__[0] + "/..", env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()
    built = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("cpu_decode_attention-") and built[0].endswith(".so")


def test_loading_the_c_kernels_keeps_subnormal_floats(tmp_path):
    # gcc links crtfastmath.o into a library linked with -ffast-math; its constructor sets
    # flush-to-zero / denormals-are-zero for the whole process, and every float after that (numpy,
    # torch, Python's own, hypothesis's strategies) loses its subnormals
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine")
    code = ("import torch\n"
            "from pdkernels import cpu_native\n"
            "tiny = 5e-324\n"
            "assert tiny * 1.0 > 0 and torch.tensor([1e-40]).mul(1.0).item() > 0\n"
            "libs = [cpu_native.load(), cpu_native.load_fused(), cpu_native.load_softmax()]\n"
            "assert all(lib is not None for lib in libs), libs\n"
            "assert tiny * 1.0 > 0, 'a C kernel set flush-to-zero for the process'\n"
            "assert torch.tensor([1e-40]).mul(1.0).item() > 0, 'a C kernel set denormals-are-zero'\n")
    env = {**os.environ, "PDCLUSTER_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=pdkernels.__path__[0] + "/..", env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr


# --- block copy ---------------------------------------------------------------------

BLOCK_SHAPES = [(4, 16 * 3 * 64), (1, 40)]  # (slabs, block_numel): several chunks; one masked chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_slabs,block_numel", BLOCK_SHAPES)
def test_gather_blocks_triton_matches_ref(dtype, num_slabs, block_numel):
    gen = torch.Generator().manual_seed(2)
    num_blocks = 13
    # a cache strided along its leading dims: [num_blocks, slabs, numel] viewed slab-first
    cache = torch.randn(num_blocks, num_slabs, block_numel, generator=gen).to(dtype).transpose(0, 1)
    block_ids = torch.tensor([7, 2, 11, 0, 5])
    ref = gather_blocks_ref(cache, block_ids)
    tri = gather_blocks_triton(cache, block_ids)
    assert tri.is_contiguous() and tri.shape == (num_slabs, 5, block_numel)
    assert torch.equal(ref, tri) and torch.equal(ref, naive_gather(cache, block_ids))
    out = torch.empty_like(tri)
    assert gather_blocks_triton(cache, block_ids, out=out) is out and torch.equal(out, ref)
    assert gather_blocks_ref(cache, block_ids, out=torch.empty_like(tri)).equal(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_slabs,block_numel", BLOCK_SHAPES)
def test_scatter_blocks_triton_matches_ref(dtype, num_slabs, block_numel):
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(num_slabs, 13, block_numel, generator=gen).to(dtype)
    block_ids = torch.tensor([9, 3, 12, 1])
    buffer = torch.randn(num_slabs, 4, block_numel, generator=gen).to(dtype)
    ref, tri, naive = cache.clone(), cache.clone(), cache.clone()
    scatter_blocks_ref(buffer, ref, block_ids)
    scatter_blocks_triton(buffer, tri, block_ids)
    for i, block_id in enumerate(block_ids.tolist()):
        naive[:, block_id] = buffer[:, i]
    assert torch.equal(ref, tri) and torch.equal(ref, naive)


def test_blocks_round_trip_between_caches():
    # prefill's blocks [3, 8, 1] land in decode's blocks [0, 6, 2]: what moved is equal, the rest untouched
    layers, num_blocks, shape = 2, 10, (16, 3, 64)
    src = torch.randn(layers, 2, num_blocks, *shape, dtype=torch.bfloat16)
    dst = torch.zeros_like(src)
    buffer = gather_blocks_triton(src.view(layers * 2, num_blocks, -1), torch.tensor([3, 8, 1]))
    scatter_blocks_triton(buffer, dst.view(layers * 2, num_blocks, -1), torch.tensor([0, 6, 2]))
    assert torch.equal(dst[:, :, [0, 6, 2]], src[:, :, [3, 8, 1]])
    assert not dst[:, :, [1, 3, 4, 5, 7, 8, 9]].any()


# --- dispatcher -----------------------------------------------------------------------

def test_dispatcher_on_cpu_uses_the_c_kernel_for_attention_and_references_for_the_rest():
    q, k_cache, v_cache, block_tables, lens = paged_inputs([3, 20], 4, 2, 16, 8, torch.float32)
    out = pdkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25)
    assert torch.equal(out, paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lens, 0.25))
    half = [t.half() if t.is_floating_point() else t for t in (q, k_cache, v_cache)]
    assert not cpu_native.supports(*half, block_tables, lens)   # fp16: the reference
    assert torch.equal(pdkernels.paged_decode_attention(*half, block_tables, lens, 0.25),
                       paged_decode_attention_ref(*half, block_tables, lens, 0.25))
    cache = torch.randn(2, 6, 10)
    buffer = pdkernels.gather_blocks(cache, torch.tensor([4, 1]))
    assert torch.equal(buffer, cache[:, [4, 1]])
    pdkernels.scatter_blocks(buffer, cache, torch.tensor([0, 2]))
    assert torch.equal(cache[:, [0, 2]], buffer)
    key = torch.randn(2, 2, 16)
    pdkernels.store_kv(key, -key, k_cache, v_cache, torch.tensor([0, -1]))
    assert torch.equal(k_cache[0, 0], key[0]) and torch.equal(v_cache[0, 0], -key[0])


def test_kernels_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, pdkernels\n"
        "assert not pdkernels.HAS_TRITON\n"
        "out = pdkernels.gather_blocks(torch.arange(6.).view(1, 3, 2), torch.tensor([2, 0]))\n"
        "assert out.tolist() == [[[4., 5.], [0., 1.]]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pdkernels.__path__[0] + "/..")



def test_paged_attention_ref_works_in_and_out_of_inference_mode():
    """The reference reuses a scratch buffer: one made under inference_mode (the
    engine's steps) must not break a later call outside it, or the reverse."""
    q, k_cache, v_cache, tables, lens = paged_inputs([5, 33], 9, 3, 64, 16, torch.float32)
    with torch.inference_mode():
        inside = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
    outside = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
    with torch.inference_mode():
        again = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(outside, inside.clone())
    torch.testing.assert_close(again.clone(), outside)
