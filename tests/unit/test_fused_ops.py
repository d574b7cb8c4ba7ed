"""pdkernels/cpu_fused.c: the fused CPU ops give the torch code's results (bit for bit where the
torch code's rounding can be reproduced: the residual add, rotary, the KV store, RMSNorm in bf16),
and callers fall back to the torch code wherever the C code does not apply."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import pdkernels
from engine.layers import RMSNorm, RotaryEmbedding
from pdkernels import cpu_fused, cpu_native

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None
                                or os.environ.get("PDCLUSTER_NATIVE_KERNELS") == "0",
                                reason="no C compiler (or native kernels off): the torch code serves")


@pytest.fixture
def torch_only(monkeypatch):
    """Runs a block with the fused ops off: the torch code's answer."""
    def run(fn):
        monkeypatch.setattr(cpu_fused, "ENABLED", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(cpu_fused, "ENABLED", True)
    return run


def test_the_library_builds():
    assert cpu_native.load_fused() is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dim", [576, 64, 37])
def test_add_rmsnorm_matches_torch(dtype, rows, dim, torch_only):
    g = torch.Generator().manual_seed(rows * dim)
    norm = RMSNorm(dim, 1e-5, dtype)
    norm.weight.data.copy_(torch.randn(dim, generator=g))
    h, delta = (torch.randn(rows, dim, generator=g).to(dtype) * 3 for _ in range(2))
    s, out = norm.add_and_norm(h, delta)
    s_ref, out_ref = torch_only(lambda: norm.add_and_norm(h, delta))
    assert torch.equal(s, s_ref)                           # the residual add: the same rounding
    if dtype == torch.bfloat16:
        assert torch.equal(out, out_ref)                    # the sum's order is hidden by bf16
    else:
        torch.testing.assert_close(out, out_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(norm(h), torch_only(lambda: norm(h)), rtol=2e-6 if dtype == torch.float32 else 0,
                               atol=2e-6 if dtype == torch.float32 else 0)


def test_add_rmsnorm_takes_row_strided_inputs_and_leaves_them_alone(torch_only):
    norm = RMSNorm(32, 1e-6, torch.bfloat16)
    norm.weight.data.fill_(1.5)
    big = torch.randn(4, 64).bfloat16()
    h, delta = big[:, :32], big[:, 32:]                      # views with row stride 64
    before = big.clone()
    s, out = norm.add_and_norm(h, delta)
    assert torch.equal(big, before)
    s_ref, out_ref = torch_only(lambda: norm.add_and_norm(h, delta))
    assert torch.equal(s, s_ref) and torch.equal(out, out_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_in_place_is_the_torch_rotary_bit_for_bit(dtype, torch_only):
    rope = RotaryEmbedding(64, 10000.0, {}, 600)
    qkv = torch.randn(11, (9 + 3 + 3) * 64).to(dtype)
    positions = torch.tensor([0, 1, 5, 17, 100, 599, 3, 3, 42, 511, 7])

    def split(t):
        return t[:, :576].view(11, 9, 64), t[:, 576:768].view(11, 3, 64)
    q_ref, k_ref = torch_only(lambda: rope(positions, *split(qkv.clone())))
    fused = qkv.clone()
    q, k = rope(positions, *split(fused))
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(fused[:, 768:], qkv[:, 768:])            # v untouched
    with pytest.raises(IndexError):
        rope(torch.tensor([600] * 11), *split(qkv.clone()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_matches_the_reference(dtype):
    k_cache = torch.zeros(6, 4, 2, 8, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    kv = torch.randn(5, 2 * 2 * 8 + 8).to(dtype)
    key, value = kv[:, :16].view(5, 2, 8), kv[:, 16:32].view(5, 2, 8)   # strided, as the model's
    slots = torch.tensor([3, -1, 23, 0, 9])
    assert cpu_fused.store_kv(key, value, k_cache, v_cache, slots)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    pdkernels.store_kv_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with pytest.raises(IndexError):
        cpu_fused.store_kv(key, value, k_cache, v_cache, torch.tensor([0, 1, 2, 3, 24]))


def test_what_the_c_code_does_not_take_goes_to_the_torch_code():
    half = torch.randn(2, 8).half()
    assert cpu_fused.add_rmsnorm(half, None, torch.ones(8).half(), 1e-6) is None          # fp16
    assert cpu_fused.add_rmsnorm(torch.randn(8, 2).t(), None, torch.ones(8), 1e-6) is None  # column-strided
    assert cpu_fused.add_rmsnorm(torch.randn(2, 8), None, torch.ones(8).bfloat16(), 1e-6) is None  # mixed
    x = torch.randn(3, 2, 8)
    assert not cpu_fused.rope_(x, torch.tensor([0, 1, 2], dtype=torch.int32), torch.ones(4, 8), torch.ones(4, 8))
    assert not cpu_fused.rope_(x.transpose(0, 1), torch.tensor([0, 1]), torch.ones(4, 8), torch.ones(4, 8))
    assert not cpu_fused.store_kv(x, x, torch.zeros(2, 2, 2, 8, dtype=torch.bfloat16),
                                  torch.zeros(2, 2, 2, 8, dtype=torch.bfloat16), torch.tensor([0, 1, 2]))
    assert cpu_fused.add_rmsnorm(torch.randn(2, 8, device="meta"), None, torch.ones(8, device="meta"), 1e-6) is None
