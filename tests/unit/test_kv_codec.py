"""kv_transfer.codec: int8 wire compression bounds and the integrity checksum."""
from __future__ import annotations

import zlib

import pytest
import torch

from kv_transfer.codec import checksum, dequantize_int8, quantize_int8, wire_nbytes

WIRE_SHAPE = (3, 2, 17, 4, 64)  # [layers, 2, tokens, heads, head_dim]


def random_wire(dtype, seed=0, shape=WIRE_SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_at_most_half_a_step(dtype):
    x = random_wire(dtype) * torch.linspace(0.01, 100.0, WIRE_SHAPE[2])[:, None, None].to(dtype)
    before = x.clone()
    q, scales = quantize_int8(x)
    assert torch.equal(x, before)   # the input is left alone
    assert q.shape == x.shape and q.dtype == torch.int8
    assert scales.shape == WIRE_SHAPE[:-1] + (1,) and scales.dtype == torch.float32
    exact = x.float()
    err = (dequantize_int8(q, scales, torch.float32) - exact).abs()
    assert bool((err <= scales / 2 * (1 + 1e-5)).all())
    # the row's absmax element lands exactly on +-127
    assert bool((q.abs().amax(-1) == 127).all())
    back = dequantize_int8(q, scales, dtype)
    assert back.dtype == dtype and back.shape == x.shape
    # plus one rounding into the output dtype
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert bool(((back.float() - exact).abs() <= scales / 2 * (1 + 1e-5) + ulp).all())


def test_zeros_round_trip_exactly():
    zeros = torch.zeros(WIRE_SHAPE, dtype=torch.bfloat16)
    q, scales = quantize_int8(zeros)
    assert not q.any() and not scales.any()
    assert torch.equal(dequantize_int8(q, scales, torch.bfloat16), zeros)

    x = random_wire(torch.bfloat16)
    x[1, 0, 5, 2] = 0.0   # one zero (layer, K/V, token, head) vector among non-zero ones
    q, scales = quantize_int8(x)
    back = dequantize_int8(q, scales, torch.bfloat16)
    assert bool(torch.isfinite(back).all())
    assert scales[1, 0, 5, 2].item() == 0.0 and not back[1, 0, 5, 2].any()


def test_int8_wire_is_about_half_of_bf16():
    x = random_wire(torch.bfloat16)
    q, scales = quantize_int8(x)
    ratio = (wire_nbytes(q) + wire_nbytes(scales)) / wire_nbytes(x)
    assert ratio == pytest.approx((64 + 4) / 128)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="floating"):
        quantize_int8(torch.ones(2, 4, dtype=torch.int32))
    x = torch.ones(2, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(x)
    q, scales = quantize_int8(torch.ones(2, 4))
    with pytest.raises(ValueError, match="scales must be"):
        dequantize_int8(q, scales[:1], torch.float32)
    with pytest.raises(ValueError, match="int8"):
        dequantize_int8(q.float(), scales, torch.float32)


@pytest.mark.parametrize("dtype,int_dtype", [(torch.float32, torch.int32), (torch.bfloat16, torch.int16)])
def test_checksum_detects_one_flipped_bit(dtype, int_dtype):
    x = random_wire(dtype, seed=1)
    first = checksum(x)
    assert checksum(x) == first == checksum(x.clone())       # stable, and only the bytes matter
    for index in (0, 1234, x.numel() - 1):
        for bit in (0, 7, 8 * x.element_size() - 1):
            flipped = x.clone()
            flat = flipped.view(int_dtype).view(-1)
            flat[index] ^= 1 << bit if bit < 8 * x.element_size() - 1 else torch.iinfo(int_dtype).min
            assert checksum(flipped) != first


def test_checksum_is_crc32_of_row_major_bytes():
    x = random_wire(torch.float32, seed=2)
    assert checksum(x) == zlib.crc32(x.numpy().tobytes())
    view = x.transpose(2, 3)                                  # non-contiguous: checksummed as laid out row-major
    assert checksum(view) == zlib.crc32(view.contiguous().numpy().tobytes())
    assert checksum(torch.empty(0)) == zlib.crc32(b"")


def test_many_rows_cross_cpu_chunks():
    # 6000 rows of 512: several of the ~1M-element passes quantize_int8 makes on CPU, the last one partial
    x = random_wire(torch.bfloat16, seed=3, shape=(2, 1, 1500, 2, 512))
    x[0, 0, 1499] = 0.0
    q, scales = quantize_int8(x)
    xf = x.float()
    want_scales = xf.abs().amax(-1, keepdim=True) / 127
    want_q = torch.round(xf / torch.where(want_scales > 0, want_scales, 1.0)).to(torch.int8)
    assert torch.equal(scales, want_scales) and torch.equal(q, want_q)
    assert torch.equal(dequantize_int8(q, scales, torch.bfloat16), (want_q.float() * want_scales).bfloat16())
