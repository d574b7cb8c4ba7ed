"""KV between instances of different parallelism plans, over real gloo ranks (torch_dist).

Each prefill rank is its own sender process holding its share of the model's
KV (`KVLayout.for_rank`); each decode rank is a receiver here. A decode rank
pulls from every prefill rank that holds part of its share and knows it is
complete when `layout.covers` says so. Everything lands bit for bit, and every
block is free on every rank at the end.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from kv_transfer.layout import KVLayout, covers
from kv_transfer.lease import LeaseState
from tests.contract.harness import Receiver, SenderChild, drive, ok

BACKEND = "torch_dist"
MODEL = dict(num_layers=3, num_kv_heads=3, head_dim=16, dtype="bfloat16")   # 3 heads: tp 2 splits 2 + 1
REQUESTS = [("a", 37), ("b", 16), ("c", 5)]


def rank_layout(block_size: int = 16, **plan) -> KVLayout:
    return KVLayout.for_rank(block_size=block_size, **MODEL, **plan)


@contextlib.contextmanager
def parallel_instances(src_layouts: list[KVLayout], dst_layouts: list[KVLayout]):
    """One sender child per prefill rank, one receiver per decode rank; on exit each must hold
    no block, no lease, and have left nothing open."""
    senders, receivers = [], []
    try:
        for rank, layout in enumerate(src_layouts):
            senders.append(SenderChild(BACKEND, layout, num_blocks=64, seed=10 + rank))
        for layout in dst_layouts:
            receivers.append(Receiver(BACKEND, layout, num_blocks=64))
        yield senders, receivers
    finally:
        for r in receivers:
            r.close()
        for r in receivers:
            r.count_left_open()
        finals = [s.close() for s in senders]
    for s, (free, total, live) in zip(senders, finals):
        assert (free, live) == (total, 0), f"a prefill rank leaked {total - free} blocks, {live} leases"
        assert s.left_open in (None, {"fds": 0, "threads": 0}), s.left_open
    for r in receivers:
        assert r.blocks.num_free_blocks == r.blocks.num_blocks, "a decode rank leaked blocks"
        assert r.left_open in (None, {"fds": 0, "threads": 0}), r.left_open


def model_kv(senders: list[SenderChild], offers, src_ids, dim: int) -> torch.Tensor:
    """The request's KV of the whole model, put together from the prefill ranks' caches."""
    # each part: [rank layers, 2, tokens, rank heads, head_dim]; dim 0 joins layers, 3 heads
    return torch.cat([s.sent(o, ids) for s, o, ids in zip(senders, offers, src_ids)], dim=dim)


def _many_to_one(src_layouts: list[KVLayout], dst_layout: KVLayout, join_dim: int) -> None:
    with parallel_instances(src_layouts, [dst_layout]) as (senders, (dst,)):
        for req_id, num_tokens in REQUESTS:
            offers, src_ids = [], []
            for s in senders:
                offer, ids = s.offer(req_id, num_tokens)
                offers.append(offer)
                src_ids.append(ids)
            dst_ids = dst.blocks.allocate(num_tokens)
            for offer in offers:   # every rank's share into the same decode blocks
                dst.receiver.pull(offer, dst_ids)
            tids = [o.transfer_id for o in offers]
            # How a decode rank knows the request's KV is complete: the sources it has landed cover it.
            landed = lambda: [o.layout for o in offers if o.transfer_id in dst.results  # noqa: E731
                              and ok(dst.results[o.transfer_id])]
            drive([dst], senders, lambda: covers(landed(), dst_layout))
            assert not any(covers([o.layout], dst_layout) for o in offers), "no one rank holds it all"
            drive([dst], senders, lambda: all(t in s.ends for s, t in zip(senders, tids)))
            assert all(ok(dst.results[t]) for t in tids), [dst.results[t] for t in tids]
            assert all(s.ends[t].outcome is LeaseState.DONE for s, t in zip(senders, tids))
            want = model_kv(senders, offers, src_ids, join_dim)
            assert torch.equal(dst.received(num_tokens, dst_ids), want), req_id
            dst.blocks.free(dst_ids)


def test_tensor_parallel_2_into_1():
    """Each prefill rank holds some KV heads; the decode rank holds them all (and pages by 8)."""
    src = [rank_layout(tp_rank=r, tp_size=2) for r in range(2)]
    assert [(s.head_start, s.head_end) for s in src] == [(0, 2), (2, 3)]
    _many_to_one(src, rank_layout(block_size=8), join_dim=3)


def test_pipeline_parallel_2_into_1():
    """Each prefill stage holds some layers; the decode rank holds them all."""
    src = [rank_layout(pp_rank=r, pp_size=2) for r in range(2)]
    assert [(s.layer_start, s.layer_end) for s in src] == [(0, 2), (2, 3)]
    _many_to_one(src, rank_layout(), join_dim=0)


@pytest.mark.parametrize("plan", ["tp", "pp"])
def test_degree_1_into_2(plan):
    """One prefill rank holds the whole model's KV; each of two decode ranks (tensor: heads split,
    pipeline: layers split) pulls from it and keeps its share. A lease holds its blocks alone
    (LeaseTable), so the prefill rank keeps one block reference per decode rank and offers to
    them one after another."""
    src = rank_layout()
    dsts = [rank_layout(**{f"{plan}_rank": r, f"{plan}_size": 2}) for r in range(2)]
    with parallel_instances([src], dsts) as ((sender,), receivers):
        for req_id, num_tokens in REQUESTS:
            offer, src_ids = sender.offer(req_id, num_tokens, uses=len(receivers))
            model = sender.sent(offer, src_ids)   # [layers, 2, tokens, heads, head_dim]
            for i, r in enumerate(receivers):
                if i:
                    offer = sender.reoffer(req_id, src_ids, num_tokens)
                dst_ids = r.blocks.allocate(num_tokens)
                r.receiver.pull(offer, dst_ids)
                tid = offer.transfer_id
                drive(receivers, [sender], lambda: tid in r.results and tid in sender.ends)
                assert ok(r.results[tid]) and sender.ends[tid].outcome is LeaseState.DONE
                assert covers([src], r.layout)
                layers = slice(r.layout.layer_start, r.layout.layer_end)
                heads = slice(r.layout.head_start, r.layout.head_end)
                share = model[layers, :, :, heads]
                assert torch.equal(r.received(num_tokens, dst_ids), share), (req_id, i)
                r.blocks.free(dst_ids)
