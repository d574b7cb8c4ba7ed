"""kv_transfer.layout: pack / unpack across parallelism plans and block sizes, bit for bit.

The oracle is plain Python indexing token by token through the block tables,
independent of the block-copy kernels: a destination cache must equal its
poisoned snapshot with exactly the sequence's slots of its own (layers x heads)
overwritten.
"""
from __future__ import annotations

import pytest
import torch

from kv_transfer.layout import (KVLayout, covers, overlap, pack, pack_layer, unpack_into,
                                unpack_layer_into)

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 4, 6, 8
NUM_BLOCKS = 12


def layout(layers=(0, NUM_LAYERS), heads=(0, NUM_HEADS), block_size=4, dtype="float32",
           num_heads=NUM_HEADS) -> KVLayout:
    return KVLayout(NUM_LAYERS, layers[0], layers[1], num_heads, heads[0], heads[1], HEAD_DIM, block_size, dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 vs 0.0 or NaN payloads would not compare equal by accident."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def write_seq(cache: torch.Tensor, lay: KVLayout, block_ids: list[int], kv: torch.Tensor) -> None:
    # kv: [model layers, 2, tokens, model heads, head_dim] -> this rank's share into its blocks
    for t in range(kv.shape[2]):
        block, slot = block_ids[t // lay.block_size], t % lay.block_size
        cache[:, :, block, slot] = kv[lay.layer_start:lay.layer_end, :, t, lay.head_start:lay.head_end]


def random_ids(n: int, gen: torch.Generator) -> list[int]:
    return torch.randperm(NUM_BLOCKS, generator=gen)[:n].tolist()


def poisoned_cache(lay: KVLayout, gen: torch.Generator) -> torch.Tensor:
    # [local_layers, 2, NUM_BLOCKS, block_size, local_heads, head_dim], every byte non-zero noise
    return (torch.randn(lay.cache_shape(NUM_BLOCKS), generator=gen) + 100.0).to(lay.torch_dtype)


def run_transfer(srcs: list[KVLayout], dsts: list[KVLayout], num_tokens: int, num_heads=NUM_HEADS) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 31 + len(srcs) * 7 + len(dsts))
    dtype = srcs[0].torch_dtype
    kv = torch.randn(NUM_LAYERS, 2, num_tokens, num_heads, HEAD_DIM, generator=gen).to(dtype)
    wires = []
    for src in srcs:
        cache = poisoned_cache(src, gen)
        ids = random_ids(-(-num_tokens // src.block_size), gen)
        write_seq(cache, src, ids, kv)
        wire = pack(cache, src, ids, num_tokens)
        assert wire.is_contiguous() and tuple(wire.shape) == src.wire_shape(num_tokens)
        assert torch.equal(bits(wire), bits(kv[src.layer_start:src.layer_end, :, :, src.head_start:src.head_end]))
        wires.append(wire)
    for dst in dsts:
        assert covers(srcs, dst)
        cache = poisoned_cache(dst, gen)
        ids = random_ids(-(-num_tokens // dst.block_size), gen)
        expected = cache.clone()
        write_seq(expected, dst, ids, kv)
        for src, wire in zip(srcs, wires):
            unpack_into(cache, dst, ids, wire, src)
        assert torch.equal(bits(cache), bits(expected))


def heads_split(*cuts):
    return [layout(heads=(a, b)) for a, b in zip(cuts, cuts[1:])]


def layers_split(*cuts):
    return [layout(layers=(a, b)) for a, b in zip(cuts, cuts[1:])]


FULL = [layout()]
CASES = {
    "same": (FULL, FULL),
    "tp2_to_1": (heads_split(0, 3, 6), FULL),
    "1_to_tp2": (FULL, heads_split(0, 3, 6)),
    "tp2_to_tp3": (heads_split(0, 3, 6), heads_split(0, 2, 4, 6)),
    "pp2_to_1": (layers_split(0, 2, 4), FULL),
    "1_to_pp2": (FULL, layers_split(0, 2, 4)),
    "pp2_to_tp2": (layers_split(0, 2, 4), heads_split(0, 3, 6)),
    "tp2xpp2_to_1": ([layout(layers=ls, heads=hs) for ls in ((0, 2), (2, 4)) for hs in ((0, 3), (3, 6))], FULL),
    "1_to_tp2xpp2": (FULL, [layout(layers=ls, heads=hs) for ls in ((0, 1), (1, 4)) for hs in ((0, 4), (4, 6))]),
}


def with_block_size(lays, block_size):
    return [layout((x.layer_start, x.layer_end), (x.head_start, x.head_end), block_size, x.dtype, x.num_kv_heads)
            for x in lays]


def with_dtype(lays, dtype):
    return [layout((x.layer_start, x.layer_end), (x.head_start, x.head_end), x.block_size, dtype, x.num_kv_heads)
            for x in lays]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_tokens", [13, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_transfer_between_plans(case, num_tokens, dtype):
    srcs, dsts = CASES[case]
    run_transfer(with_dtype(srcs, dtype), with_dtype(dsts, dtype), num_tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("src_bs,dst_bs", [(4, 8), (8, 4), (16, 32), (32, 16), (4, 3)])
@pytest.mark.parametrize("case", ["same", "tp2_to_1", "1_to_tp2", "tp2xpp2_to_1"])
def test_transfer_between_block_sizes(case, src_bs, dst_bs, dtype):
    srcs, dsts = CASES[case]
    srcs, dsts = with_block_size(with_dtype(srcs, dtype), src_bs), with_block_size(with_dtype(dsts, dtype), dst_bs)
    for num_tokens in (1, 13, 32):
        run_transfer(srcs, dsts, num_tokens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uneven_head_split_of_three_heads(dtype):
    def three(heads, block_size=4):
        return layout(heads=heads, num_heads=3, block_size=block_size, dtype=dtype)
    assert [KVLayout.for_rank(NUM_LAYERS, 3, HEAD_DIM, 4, dtype, tp_rank=r, tp_size=2) for r in (0, 1)] == \
        [three((0, 2)), three((2, 3))]
    run_transfer([three((0, 2)), three((2, 3))], [three((0, 3), block_size=8)], 13, num_heads=3)
    run_transfer([three((0, 3))], [three((0, 2)), three((2, 3))], 13, num_heads=3)


def test_pack_into_a_reused_buffer():
    gen = torch.Generator().manual_seed(5)
    lay = layout(heads=(1, 4), dtype="bfloat16")
    cache, ids = poisoned_cache(lay, gen), random_ids(4, gen)
    staging = torch.empty(lay.wire_shape(14), dtype=torch.bfloat16)
    assert pack(cache, lay, ids, 14, out=staging) is staging
    assert torch.equal(bits(staging), bits(pack(cache, lay, ids, 14)))
    one = torch.empty(2, 14, 3, HEAD_DIM, dtype=torch.bfloat16)
    assert pack_layer(cache, lay, 2, ids, 14, out=one).data_ptr() == one.data_ptr()
    assert torch.equal(bits(one), bits(staging[2]))
    with pytest.raises(ValueError, match="out must be"):
        pack(cache, lay, ids, 13, out=staging)
    with pytest.raises(ValueError, match="out must be"):
        pack(cache, lay, ids, 14, out=staging.float())


def test_zero_tokens_is_a_no_op():
    lay = layout()
    cache = poisoned_cache(lay, torch.Generator().manual_seed(0))
    before = cache.clone()
    wire = pack(cache, lay, [], 0)
    assert tuple(wire.shape) == lay.wire_shape(0)
    unpack_into(cache, lay, [], wire, lay)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_by_layer_equals_whole(dtype):
    gen = torch.Generator().manual_seed(3)
    src = layout(layers=(1, 4), heads=(2, 6), block_size=4, dtype=dtype)
    dst = layout(block_size=8, dtype=dtype)
    src_cache, src_ids, num_tokens = poisoned_cache(src, gen), random_ids(4, gen), 14
    whole = pack(src_cache, src, src_ids, num_tokens)
    dst_whole = poisoned_cache(dst, gen)
    dst_layers = dst_whole.clone()
    dst_ids = random_ids(2, gen)
    unpack_into(dst_whole, dst, dst_ids, whole, src)
    for i in range(src.local_layers):
        layer_wire = pack_layer(src_cache, src, i, src_ids, num_tokens)
        assert tuple(layer_wire.shape) == (2, num_tokens, src.local_heads, HEAD_DIM)
        assert torch.equal(bits(layer_wire), bits(whole[i]))
        unpack_layer_into(dst_layers, dst, dst_ids, layer_wire, src, src.layer_start + i)
    assert torch.equal(bits(dst_layers), bits(dst_whole))
    with pytest.raises(ValueError, match="layer 0"):
        unpack_layer_into(dst_layers, dst, dst_ids, whole[0], src, 0)
    with pytest.raises(ValueError, match="layer_index_local"):
        pack_layer(src_cache, src, 3, src_ids, num_tokens)


def test_overlap_and_covers():
    assert overlap(layout(heads=(0, 3)), layout(heads=(2, 6))) == (range(0, 4), range(2, 3))
    assert overlap(layout(layers=(0, 2)), layout(layers=(2, 4))) is None
    quarters = [layout(layers=ls, heads=hs) for ls in ((0, 2), (2, 4)) for hs in ((0, 3), (3, 6))]
    assert covers(quarters, layout())
    assert not covers(quarters[:3], layout())
    assert covers(quarters[:1], layout(layers=(0, 2), heads=(1, 3)))
    assert covers([layout(heads=(0, 4)), layout(heads=(2, 6))], layout())   # overlapping sources
    assert not covers([layout(heads=(0, 2)), layout(heads=(3, 6))], layout())   # head 2 missing
    assert not covers([], layout())
    assert covers(FULL, layout(heads=(3, 6), layers=(1, 2)))


@pytest.mark.parametrize("field,value", [("num_layers", 5), ("num_kv_heads", 7), ("head_dim", 16),
                                         ("dtype", "bfloat16")])
def test_mismatched_model_shape_raises(field, value):
    src = layout()
    kwargs = {f: getattr(src, f) for f in src.__dataclass_fields__}
    kwargs[field] = value
    other = KVLayout(**kwargs)
    cache = torch.zeros(src.cache_shape(NUM_BLOCKS))
    wire = torch.zeros(other.wire_shape(4), dtype=other.torch_dtype)
    with pytest.raises(ValueError, match=field):
        unpack_into(cache, src, [0], wire, other)
    with pytest.raises(ValueError, match=field):
        covers([other], src)


def test_bad_inputs_raise():
    lay = layout(block_size=4)
    cache = torch.zeros(lay.cache_shape(NUM_BLOCKS))
    wire = torch.zeros(lay.wire_shape(9))
    with pytest.raises(ValueError, match="need 3 blocks"):
        unpack_into(cache, lay, [0, 1], wire, lay)
    with pytest.raises(ValueError, match="distinct"):
        unpack_into(cache, lay, [0, 1, 1], wire, lay)
    with pytest.raises(ValueError, match="lie in"):
        unpack_into(cache, lay, [0, 1, NUM_BLOCKS], wire, lay)
    with pytest.raises(ValueError, match="wire is"):
        unpack_into(cache, lay, [0, 1, 2], wire[:, :, :, :3], lay)
    with pytest.raises(ValueError, match="wire is"):
        unpack_into(cache, lay, [0, 1, 2], wire.to(torch.bfloat16), lay)
    with pytest.raises(ValueError, match="cache"):
        pack(cache[:, :, :, :, :3], lay, [0, 1, 2], 9)
    with pytest.raises(ValueError, match="need 3 blocks"):
        pack(cache, lay, [0, 1], 9)


@pytest.mark.parametrize("kwargs,field", [
    (dict(layer_end=5), "layer_end"), (dict(layer_start=2, layer_end=2), "layer_start"),
    (dict(head_start=-1), "head_start"), (dict(head_end=7), "head_end"), (dict(block_size=0), "block_size"),
    (dict(head_dim=0), "head_dim"), (dict(dtype="float33"), "dtype"), (dict(num_layers=4.0), "num_layers"),
])
def test_layout_validation_names_the_field(kwargs, field):
    base = dict(num_layers=4, layer_start=0, layer_end=4, num_kv_heads=6, head_start=0, head_end=6,
                head_dim=8, block_size=4, dtype="float32")
    with pytest.raises(ValueError, match=field):
        KVLayout(**{**base, **kwargs})


def test_layout_helpers():
    lay = layout(layers=(1, 3), heads=(2, 5), dtype="bfloat16")
    assert (lay.local_layers, lay.local_heads) == (2, 3)
    assert lay.bytes_per_token == 2 * 2 * 3 * HEAD_DIM * 2
    assert KVLayout(4, 0, 4, 6, 0, 6, 8, 4, "float").dtype == "float32"
    cache = torch.zeros(lay.cache_shape(NUM_BLOCKS), dtype=torch.bfloat16)
    assert KVLayout.from_cache(cache, num_layers=NUM_LAYERS, num_kv_heads=NUM_HEADS, layer_start=1,
                               head_start=2) == lay
    assert [KVLayout.for_rank(30, 3, 64, 16, "bfloat16", pp_rank=r, pp_size=4).layer_end for r in range(4)] == \
        [8, 16, 23, 30]
    with pytest.raises(ValueError, match="tp_size"):
        KVLayout.for_rank(30, 3, 64, 16, "bfloat16", tp_rank=0, tp_size=4)


def test_through_the_triton_block_copy_kernels(monkeypatch):
    """On a GPU pack/unpack run the Triton kernels on strided views of the wire; check that here."""
    import pdkernels
    if not pdkernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    from pdkernels.block_copy import gather_blocks_triton, scatter_blocks_triton
    monkeypatch.setattr(pdkernels, "gather_blocks", gather_blocks_triton)
    monkeypatch.setattr(pdkernels, "scatter_blocks", scatter_blocks_triton)
    run_transfer(with_dtype(FULL, "bfloat16"), with_block_size(with_dtype(FULL, "bfloat16"), 8), 14)
    run_transfer(with_dtype(FULL, "bfloat16"), with_dtype(CASES["1_to_tp2xpp2"][1], "bfloat16"), 14)
