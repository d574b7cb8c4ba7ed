"""A pull that skips the prefix the decode side holds already (prefix caching): every backend.

The receiver names `skip_tokens`, whole blocks on both sides; only the KV past
them moves (the byte count says so), lands bit for bit, and the skipped
blocks keep what they held (here a sentinel). Every test ends with every
block free on both sides (`running`).
"""
from __future__ import annotations

import json
import time

import pytest
import torch
import zmq

from kv_transfer.base import TransferError
from kv_transfer.channel import ChannelSender
from kv_transfer.layout import covers
from kv_transfer.lease import LeaseState
from tests.contract.harness import drive, make_cache, make_layout, ok
from tests.contract.test_plan_conversion import parallel_instances, model_kv, rank_layout
from tests.contract.test_stream_layers import STREAM_BACKENDS
from tests.contract.test_transfer_contract import BACKENDS, WIRE_BACKENDS, running

SENTINEL = 7.0


def _pull_past(pair, offer, skip: int) -> list[int]:
    """Allocate the request's blocks here, mark the ones the skip covers, pull the rest."""
    dst_ids = pair.dst_blocks.allocate(offer.num_tokens)
    held = dst_ids[:skip // pair.dst_layout.block_size]
    if held:
        pair.dst_cache[:, :, held] = SENTINEL
    pair.receiver.pull(offer, dst_ids, skip)
    return dst_ids


def _check_landed(pair, offer, src_ids, dst_ids, skip: int) -> None:
    got, want = pair.received(offer, dst_ids), pair.sent(offer, src_ids)
    assert torch.equal(got[:, :, skip:], want[:, :, skip:]), "the KV past the skipped prefix differs"
    assert bool((got[:, :, :skip] == SENTINEL).all()), "a skipped block was written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_blocks_past_the_cached_prefix_move(backend):
    layout = make_layout(num_layers=3, kv_heads=3, head_dim=64, block_size=16)
    with running(backend, layout) as pair:
        for i, (n, skip) in enumerate([(17, 16), (100, 64), (64, 48), (33, 0)]):
            offer, src_ids = pair.offer(f"r{i}", n)
            dst_ids = _pull_past(pair, offer, skip)
            pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
            result = pair.results[offer.transfer_id]
            assert ok(result), result.error
            assert result.nbytes == (n - skip) * layout.bytes_per_token
            assert pair.ends[offer.transfer_id].outcome is LeaseState.DONE
            assert list(pair.ends[offer.transfer_id].block_ids) == src_ids   # the whole lease ends
            _check_landed(pair, offer, src_ids, dst_ids, skip)
            pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", WIRE_BACKENDS)
def test_int8_past_the_cached_prefix(backend):
    layout = make_layout(num_layers=2, block_size=16)
    with running(backend, layout, sender_kwargs={"compress": "int8"}) as pair:
        offer, src_ids = pair.offer("r", 80)
        dst_ids = _pull_past(pair, offer, 32)
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        result = pair.results[offer.transfer_id]
        assert ok(result), result.error
        assert result.nbytes < (80 - 32) * layout.bytes_per_token   # codes and scales of 48 tokens
        got, want = pair.received(offer, dst_ids), pair.sent(offer, src_ids)
        assert torch.allclose(got[:, :, 32:].float(), want[:, :, 32:].float(), atol=0.05, rtol=0.05)
        assert bool((got[:, :, :32] == SENTINEL).all())
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", ["zmq", "shm-zero-copy", "auto-two-nodes"])
def test_different_block_sizes_skip_whole_blocks_of_both(backend):
    """Blocks of 16 there, 32 here: a skip must be whole blocks on both sides."""
    src, dst = make_layout(block_size=16), make_layout(block_size=32)
    with running(backend, src, dst) as pair:
        offer, src_ids = pair.offer("r", 90)
        dst_ids = pair.dst_blocks.allocate(offer.num_tokens)
        with pytest.raises(TransferError, match="multiple of 32"):
            pair.receiver.pull(offer, dst_ids, 16)
        pair.dst_blocks.free(dst_ids)
        dst_ids = _pull_past(pair, offer, 64)
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        assert ok(pair.results[offer.transfer_id]), pair.results[offer.transfer_id].error
        _check_landed(pair, offer, src_ids, dst_ids, 64)
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
def test_streamed_layers_past_the_cached_prefix(backend):
    layout = make_layout(num_layers=4, block_size=16)
    with running(backend, layout) as pair:
        offer, src_ids = pair.offer("r", 45, stream=True)
        dst_ids = _pull_past(pair, offer, 32)
        sent = pair.sent(offer, src_ids)
        for n in range(1, layout.num_layers + 1):
            pair.sender.layers_ready([offer.transfer_id], n)
            if n < layout.num_layers:
                pair.drive(lambda: torch.equal(pair.received(offer, dst_ids)[:n, :, 32:], sent[:n, :, 32:]),
                           timeout_s=10)
                assert offer.transfer_id not in pair.results
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        result = pair.results[offer.transfer_id]
        assert ok(result), result.error
        assert result.nbytes == (45 - 32) * layout.bytes_per_token
        _check_landed(pair, offer, src_ids, dst_ids, 32)
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("skip", [-16, 8, 48, 64, 16.0])
def test_a_bad_skip_is_a_typed_error_and_nothing_starts(skip):
    layout = make_layout(block_size=16)
    with running("zmq", layout) as pair:
        offer, src_ids = pair.offer("r", 48)
        dst_ids = pair.dst_blocks.allocate(offer.num_tokens)
        with pytest.raises(TransferError, match="skip"):
            pair.receiver.pull(offer, dst_ids, skip)
        pair.receiver.pull(offer, dst_ids)   # the offer is still good: a whole pull goes through
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        assert ok(pair.results[offer.transfer_id])
        assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("skip", [8, 64, "16", -16])
def test_the_sender_refuses_a_pull_with_a_bad_skip(skip):
    """A PULL that skips part of a block, or the whole prompt, fails that transfer with ERROR
    (never a wrong slice of KV), and the sender keeps serving."""
    layout = make_layout(block_size=16)
    sender = ChannelSender(make_cache(layout, 16, seed=1), layout, "zmq")
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(sender.endpoint)
    try:
        offer = sender.offer("r", [2, 3, 4], 40, time.monotonic())
        peer.send_multipart([b"PULL", json.dumps({"transfer_id": offer.transfer_id, "attempt": 1,
                                                   "skip": skip}).encode()])
        ends, deadline = [], time.monotonic() + 10
        while not ends and time.monotonic() < deadline:
            sender.wait(0.05)
            ends = sender.poll(time.monotonic())
        assert [e.outcome for e in ends] == [LeaseState.FAILED] and "skip" in ends[0].reason
        assert peer.poll(5000)
        kind, head = peer.recv_multipart()
        assert kind == b"ERROR" and "skip" in json.loads(head)["error"]
    finally:
        peer.close(0)
        ctx.term()
        sender.close()


def test_plan_conversion_past_the_cached_prefix():
    """Two tensor-parallel prefill ranks (blocks of 16) into one decode rank (blocks of 8), which
    holds the first 32 tokens: each rank's heads past them land, the held blocks stay as they are."""
    src, dst_layout = [rank_layout(tp_rank=r, tp_size=2) for r in range(2)], rank_layout(block_size=8)
    with parallel_instances(src, [dst_layout]) as (senders, (dst,)):
        offers, src_ids = zip(*(s.offer("a", 45) for s in senders))
        dst_ids = dst.blocks.allocate(45)
        dst.cache[:, :, dst_ids[:4]] = SENTINEL
        for offer in offers:
            dst.receiver.pull(offer, dst_ids, 32)
        landed = lambda: [o.layout for o in offers if o.transfer_id in dst.results  # noqa: E731
                          and ok(dst.results[o.transfer_id])]
        drive_until = lambda: covers(landed(), dst_layout) and all(  # noqa: E731
            o.transfer_id in s.ends for s, o in zip(senders, offers))
        drive([dst], senders, drive_until)
        assert [dst.results[o.transfer_id].nbytes for o in offers] == [13 * o.layout.bytes_per_token for o in offers]
        got, want = dst.received(45, dst_ids), model_kv(senders, offers, src_ids, dim=3)
        assert torch.equal(got[:, :, 32:], want[:, :, 32:])
        assert bool((got[:, :, :32] == SENTINEL).all())
        dst.blocks.free(dst_ids)
