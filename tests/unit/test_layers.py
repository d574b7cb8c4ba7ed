"""engine.layers.linear: the small-batch bf16 CPU path computes the same product as F.linear."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.layers import SMALL_MATMUL_MAX_ROWS, linear

# weight shapes of the default model: qkv, o, gate+up, down (in -> out)
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "amx_bf16" in cpuinfo.read_text()


def _weight(n_in: int, n_out: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(n_in * 7 + n_out)
    return (torch.randn(n_out, n_in, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_linear_matches_functional_linear_for_every_row_count(n_in, n_out):
    w = _weight(n_in, n_out)
    exact = _has_amx()   # measured bit-identical there; other CPUs may pick other oneDNN kernels
    for rows in range(1, SMALL_MATMUL_MAX_ROWS + 5):
        x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows)).bfloat16()
        got, want = linear(x, w), torch.nn.functional.linear(x, w)
        assert got.shape == (rows, n_out) and got.dtype == torch.bfloat16
        # The same oneDNN kernel family accumulates both; on the AMX machine the results are
        # bit-identical (what keeps outputs unchanged), elsewhere within bf16 rounding.
        if exact:
            assert torch.equal(got, want), f"{rows} rows differ from F.linear"
        else:
            torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3)
        ref = x.float() @ w.float().t()
        assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3


def test_linear_keeps_functional_linear_where_the_fast_path_does_not_apply():
    w = _weight(64, 48)
    b = torch.randn(48).bfloat16()
    x = torch.randn(4, 64).bfloat16()
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))           # bias: fused add
    x32, w32 = x.float(), w.float()
    assert torch.equal(linear(x32, w32), torch.nn.functional.linear(x32, w32))          # fp32
    big = torch.randn(SMALL_MATMUL_MAX_ROWS + 1, 64).bfloat16()
    assert torch.equal(linear(big, w), torch.nn.functional.linear(big, w))              # many rows
    x3 = torch.randn(2, 3, 64).bfloat16()
    assert torch.equal(linear(x3, w), torch.nn.functional.linear(x3, w))                # not [rows, in]
