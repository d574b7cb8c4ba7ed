"""pack_runs / unpack_runs (block runs copied whole) against kv_transfer.layout's pack / unpack_into."""
from __future__ import annotations

import random

import pytest
import torch

from kv_transfer import layout as kvl
from kv_transfer.stream import layers_layout, layers_per_message, pack_runs, unpack_runs

LAYOUT = kvl.KVLayout(4, 0, 4, 3, 0, 3, 8, 4, "bfloat16")


@pytest.mark.parametrize("num_tokens", [0, 1, 4, 5, 16, 23])
@pytest.mark.parametrize("order", ["runs", "shuffled", "mixed"])
def test_runs_match_pack_and_unpack(num_tokens, order):
    rng = random.Random(num_tokens * 7 + len(order))
    cache = torch.randn(LAYOUT.cache_shape(16), generator=torch.Generator().manual_seed(num_tokens)).to(torch.bfloat16)
    need = -(-num_tokens // 4)
    ids = {"runs": list(range(3, 3 + need)), "shuffled": rng.sample(range(16), need),
           "mixed": [9, 10, 11, 2, 3, 14][:need] + [0] * max(0, need - 6)}[order]
    if len(set(ids)) != len(ids):
        pytest.skip("ids must be distinct")
    want = kvl.pack(cache, LAYOUT, ids, num_tokens)
    got = torch.empty_like(want)
    pack_runs(cache, ids, num_tokens, got)
    assert torch.equal(got, want)
    # a slice of layers, as a chunk of a transfer
    part = torch.empty(2, *want.shape[1:], dtype=want.dtype)
    pack_runs(cache[1:3], ids, num_tokens, part)
    assert torch.equal(part, want[1:3])

    dst_ids = rng.sample(range(16), need)
    before = torch.randn(LAYOUT.cache_shape(16)).to(torch.bfloat16)
    expect, actual = before.clone(), before.clone()
    kvl.unpack_into(expect, LAYOUT, dst_ids, want, LAYOUT)
    unpack_runs(want, actual, dst_ids)
    assert torch.equal(actual, expect)   # the tail of a partial last block kept its bytes too


def test_layers_per_message_and_layers_layout():
    assert layers_per_message(LAYOUT, 1000, 4 << 20) == 4        # small: one message
    big = kvl.KVLayout(30, 0, 30, 3, 0, 3, 64, 16, "bfloat16")
    assert layers_per_message(big, 6000, 4 << 20) == 1           # 4.6 MB a layer: one each
    assert layers_per_message(big, 2048, 4 << 20) == 2           # 1.5 MB a layer
    sub = layers_layout(LAYOUT, 1, 3)
    assert (sub.layer_start, sub.layer_end, sub.local_layers) == (1, 3, 2)
