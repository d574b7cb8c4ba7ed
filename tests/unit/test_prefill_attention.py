"""engine.prefill_attention: the blocked causal kernel computes SDPA's causal attention, for any
length, block and head grouping; the kernel per length comes from a stored measurement."""
from __future__ import annotations

import json

import pytest
import torch

from engine import prefill_attention
from engine.prefill_attention import PrefillPlan, blocked_causal, causal_attention, sdpa
from pdkernels import cpu_native


def _qkv(n, heads, kv_heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, heads, d, generator=g).to(dtype), torch.randn(n, kv_heads, d, generator=g).to(dtype),
            torch.randn(n, kv_heads, d, generator=g).to(dtype))


def _exact(q, k, v, scale):
    """Causal softmax attention in float64, K/V repeated per query head."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.fixture(params=["C softmax", "torch softmax"])
def softmax(request, monkeypatch):
    """The blocked kernel's mask + softmax: the C pass (pdkernels/cpu_causal_softmax.c) or torch's."""
    if request.param == "torch softmax":
        monkeypatch.setattr(cpu_native, "causal_softmax_", lambda *a: False)
    elif cpu_native.load_softmax() is None:
        pytest.skip("no C compiler: the torch softmax serves")
    return request.param


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 200, 512])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("block", [64, 128])
def test_blocked_matches_exact_attention(n, heads, kv_heads, block, softmax):
    d = 32
    q, k, v = _qkv(n, heads, kv_heads, d, torch.float32)
    want = _exact(q, k, v, d ** -0.5)
    torch.testing.assert_close(blocked_causal(q, k, v, d ** -0.5, block).double(), want, rtol=1e-5, atol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    got = blocked_causal(qb, kb, vb, d ** -0.5, block)
    assert got.dtype == torch.bfloat16 and got.shape == (n, heads, d)
    # bf16 scores and probabilities: within a few bf16 roundings of the exact result, as SDPA is
    err, sdpa_err = ((o.double() - want).abs().max() for o in (got, sdpa(qb, kb, vb, d ** -0.5, causal=True)))
    assert err <= 4 * max(sdpa_err, 2 ** -8), (err, sdpa_err)


def test_strided_inputs_as_the_model_passes_them(softmax):
    # q, k, v are column slices of one qkv projection: views, not contiguous tensors
    n, d = 100, 16
    qkv = torch.randn(n, (6 + 2 * 2) * d)
    q, k, v = qkv.split([6 * d, 2 * d, 2 * d], dim=-1)
    q, k, v = q.view(n, 6, d), k.view(n, 2, d), v.view(n, 2, d)
    torch.testing.assert_close(blocked_causal(q, k, v, 0.25, 32).double(), _exact(q, k, v, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_the_plan_picks_a_kernel_by_length():
    plan = PrefillPlan(((128, "blocked-64"), (512, "sdpa"), (2048, "blocked-128")))
    assert [plan.kernel(n) for n in (1, 128, 129, 512, 2048, 9000)] == \
        ["blocked-64", "blocked-64", "sdpa", "sdpa", "blocked-128", "blocked-128"]
    assert PrefillPlan().kernel(10) == "sdpa"
    q, k, v = _qkv(70, 4, 2, 16, torch.float32)
    torch.testing.assert_close(causal_attention(q, k, v, 0.25, plan).double(), _exact(q, k, v, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_the_choice_is_measured_once_and_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(prefill_attention, "LENGTHS", (16, 40))
    plan = prefill_attention.choose_plan(4, 2, 16, torch.bfloat16)
    assert [n for n, _ in plan.by_length] == [16, 40]
    assert all(kernel in prefill_attention.KERNELS for _, kernel in plan.by_length)
    (stored,) = (tmp_path / "tuning").glob("prefill-attention-*.json")
    assert set(json.loads(stored.read_text())["ms"]["40"]) == set(prefill_attention.KERNELS)
    monkeypatch.setattr(prefill_attention, "_measure", lambda *a: pytest.fail("measured again"))
    assert prefill_attention.choose_plan(4, 2, 16, torch.bfloat16) == plan
    assert prefill_attention.choose_plan(4, 2, 16, torch.bfloat16, device="meta") == prefill_attention.DEFAULT
