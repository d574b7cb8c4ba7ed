"""engine.layers.linear and engine.gemm: every matmul path computes F.linear's product, and the
path a model takes is chosen by a measurement that is stored and read back."""
from __future__ import annotations

import json

import pytest
import torch

from engine import autotune, gemm
from engine.gemm import GemmPlan, decide, pack, packed_linear, plain_linear
from engine.layers import Linear, linear

# weight shapes of the default model: qkv, o, gate+up, down (in -> out)
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def _weight(n_in: int, n_out: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(n_in * 7 + n_out)
    return (torch.randn(n_out, n_in, generator=g) * 0.02).to(dtype)


def _close_to_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.float() @ w.float().t()
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_every_path_matches_functional_linear_for_every_row_count(n_in, n_out):
    w = _weight(n_in, n_out)
    packed = pack(w)
    for rows in [*range(1, 34), 64, 129]:
        x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows)).bfloat16()
        want = torch.nn.functional.linear(x, w)
        for path in ("linear", "weight_left"):
            got = plain_linear(x, w, None, path)
            assert got.shape == (rows, n_out) and got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3)
            _close_to_exact(got, x, w)
        got = packed_linear(x, packed)
        assert got.shape == (rows, n_out) and got.dtype == torch.bfloat16 and not got.is_mkldnn
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3)
        _close_to_exact(got, x, w)


def test_packed_linear_takes_a_bias_and_strided_rows():
    w, b = _weight(64, 48), torch.randn(48).bfloat16()
    x = torch.randn(6, 128).bfloat16()[:, ::2]          # a strided view, as attention's output can be
    torch.testing.assert_close(packed_linear(x, pack(w), b), torch.nn.functional.linear(x, w, b),
                               rtol=1.6e-2, atol=1e-3)


def test_linear_module_packs_once_and_drops_the_plain_weight():
    layer = Linear(64, 48, True, torch.bfloat16)
    layer.weight.data.copy_(_weight(64, 48))
    layer.bias.data.normal_()
    x = torch.randn(5, 64).bfloat16()
    before = layer(x)
    layer.pack_weight()
    assert layer.weight is None and layer.packed is not None
    torch.testing.assert_close(layer(x), before, rtol=1.6e-2, atol=1e-3)


def test_the_plan_picks_a_path_by_rows():
    plan = GemmPlan(plain=((1, "gemv"), (8, "weight_left"), (32, "linear")))
    assert [plan.path(r) for r in (1, 2, 8, 9, 32, 33, 4096)] == \
        ["gemv", "weight_left", "weight_left", "linear", "linear", "linear", "linear"]
    assert GemmPlan(packed=True).path(3) == "packed"
    w, x = _weight(64, 48), torch.randn(4, 64).bfloat16()
    # a bias or a batch of matrices keeps F.linear's fused add / broadcasting
    b = torch.randn(48).bfloat16()
    assert torch.equal(linear(x, w, b, plan), torch.nn.functional.linear(x, w, b))
    x3 = torch.randn(2, 3, 64).bfloat16()
    assert torch.equal(linear(x3, w, plan=plan), torch.nn.functional.linear(x3, w))
    x32, w32 = x.float(), w.float()
    assert torch.equal(linear(x32, w32), torch.nn.functional.linear(x32, w32))


def test_packed_wins_only_when_it_is_never_much_slower():
    fast = {1: {"linear": 2.0, "gemv": 1.0, "packed": 0.9}, 8: {"linear": 3.0, "weight_left": 4.0, "packed": 1.0}}
    assert decide(fast) == {"packed": True, "plain": [(1, "gemv"), (8, "linear")]}
    one_bad = {1: {"linear": 2.0, "packed": 1.0}, 512: {"linear": 10.0, "packed": 12.0}}   # 20% slower at 512
    assert decide(one_bad)["packed"] is False
    within = {1: {"linear": 2.0, "packed": 1.0}, 512: {"linear": 10.0, "packed": 10.4}}
    assert decide(within)["packed"] is True
    assert decide({1: {"linear": 1.0}})["packed"] is False                                 # nothing to pack


def test_the_choice_is_measured_once_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "BUCKETS", (1, 4))
    weights = [_weight(64, 48), _weight(48, 64)]
    calls = []
    real = gemm._measure
    monkeypatch.setattr(gemm, "_measure", lambda *a: calls.append(1) or real(*a))
    plan = gemm.choose_plan(weights, torch.bfloat16)
    assert calls == [1]
    stored = list((tmp_path / "tuning").glob("gemm-*.json"))
    assert len(stored) == 1
    record = json.loads(stored[0].read_text())
    assert set(record["ms"]) == {"1", "4"} and "packed" in record["ms"]["1"] and "gemv" in record["ms"]["1"]
    assert gemm.choose_plan(weights, torch.bfloat16) == plan and calls == [1]     # read back, not measured
    assert gemm.choose_plan([w.float() for w in weights], torch.float32) == gemm.DEFAULT   # fp32: F.linear
    monkeypatch.setenv("PDCLUSTER_AUTOTUNE", "0")
    assert gemm.choose_plan([_weight(32, 16)], torch.bfloat16) == gemm.DEFAULT


def test_the_tuning_key_names_the_machine_and_what_was_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE_DIR", str(tmp_path))
    a, b = autotune.cache_path("gemm", "x"), autotune.cache_path("gemm", "y")
    assert a != b and a.parent == tmp_path / "tuning"
    monkeypatch.setattr(autotune, "machine_fingerprint", lambda: "another cpu")
    assert autotune.cache_path("gemm", "x") != a
