"""One contract, every backend: the whole life of a transfer between two real processes.

Each test ends with every block free on both sides (the sender child reports
its BlockManager at exit; the receiver's is checked here). The `ray` tests
share one local Ray head (conftest.py).
"""
from __future__ import annotations

import contextlib
import random
import time

import pytest
import torch

from kv_transfer import make_receiver
from kv_transfer.base import TransferError, TransferStatus
from kv_transfer.faults import FaultSpec
from kv_transfer.lease import LeaseState
from tests.contract.harness import (AUTO_ONE_NODE, AUTO_TWO_NODES, CURVE, SHARED, ZERO_COPY, Pair, make_layout, ok,
                                    real_backend)

# auto: the pair says it is on one node (zero copy) or two (zmq); CURVE: zmq between key holders
BACKENDS = ["zmq", "shm", ZERO_COPY, "torch_dist", "ray", AUTO_ONE_NODE, AUTO_TWO_NODES, CURVE]
# fault injection acts on a wire; a sender whose cache is shared (zero copy) takes none
WIRE_BACKENDS = ["zmq", "shm", "torch_dist", "ray", CURVE]


def _close_clean(pair: Pair) -> None:
    free, total, live = pair.close()
    assert (free, live) == (total, 0), f"sender leaked: {total - free} blocks, {live} leases"
    assert pair.dst_blocks.num_free_blocks == pair.dst_blocks.num_blocks, "receiver leaked blocks"
    for side, left in (("sender", pair.sender.left_open), ("receiver", pair.dst.left_open)):
        assert left is None or left == {"fds": 0, "threads": 0}, f"the {side}'s close() left open {left}"


@contextlib.contextmanager
def running(backend: str, layout, dst_layout=None, **kwargs):
    """A sender child and a receiver; on exit both must hold no block and no lease."""
    pair = Pair(backend, layout, dst_layout or layout, **kwargs)
    try:
        yield pair
    finally:
        _close_clean(pair)


def _transfer(pair: Pair, req_id: str, num_tokens: int):
    offer, src_ids = pair.offer(req_id, num_tokens)
    dst_ids = pair.pull(offer)
    pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
    return offer, src_ids, dst_ids, pair.results[offer.transfer_id], pair.ends[offer.transfer_id]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [
    dict(num_layers=3, kv_heads=3, head_dim=64, block_size=16),    # the default model's GQA heads
    dict(num_layers=2, kv_heads=4, head_dim=20, block_size=8),
])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kv_arrives_bit_for_bit(backend, shape, dtype):
    layout = make_layout(dtype=dtype, **shape)
    with running(backend, layout) as pair:
        for i, n in enumerate([1, 15, 16, 17, 100]):   # partial last blocks, block edges
            offer, src_ids, dst_ids, result, end = _transfer(pair, f"r{i}", n)
            assert ok(result), result.error
            assert end.outcome is LeaseState.DONE and list(end.block_ids) == src_ids
            assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
            assert result.nbytes == n * layout.bytes_per_token
            pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_block_size_on_the_decode_side(backend):
    src, dst = make_layout(block_size=16), make_layout(block_size=32)
    with running(backend, src, dst) as pair:
        offer, src_ids, dst_ids, result, _ = _transfer(pair, "r", 70)
        assert ok(result)
        assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", WIRE_BACKENDS)
def test_int8_compression_halves_the_bytes(backend):
    layout = make_layout()
    with running(backend, layout, sender_kwargs={"compress": "int8"}) as pair:
        offer, src_ids, dst_ids, result, _ = _transfer(pair, "r", 64)
        assert ok(result)
        assert result.nbytes < 0.6 * 64 * layout.bytes_per_token
        sent, got = pair.sent(offer, src_ids).float(), pair.received(offer, dst_ids).float()
        scale = sent.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((got - sent).abs() <= scale * 0.51 + 1e-2 * sent.abs()).all())
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_abort_frees_the_sender_blocks(backend):
    layout = make_layout()
    with running(backend, layout) as pair:
        offer, _ = pair.offer("r", 40)
        dst_ids = pair.pull(offer)
        pair.receiver.abort(offer.transfer_id)   # PULL then ABORT, before any reply is read
        pair.finish_request(offer, dst_ids)
        pair.drive(lambda: offer.transfer_id in pair.ends)
        assert pair.ends[offer.transfer_id].outcome is LeaseState.ABORTED
        time.sleep(0.2)            # the reply to the PULL arrives after the abort: ignored
        pair.drive(lambda: True)
        assert offer.transfer_id not in pair.results


@pytest.mark.parametrize("backend", BACKENDS)
def test_lease_expiry_frees_blocks_and_fails_a_late_pull(backend):
    layout = make_layout()
    with running(backend, layout) as pair:
        offer, _ = pair.offer("r", 20, ttl_s=0.2)
        pair.drive(lambda: offer.transfer_id in pair.ends, timeout_s=10)
        assert pair.ends[offer.transfer_id].outcome is LeaseState.EXPIRED
        dst_ids = pair.pull(offer)
        pair.drive(lambda: offer.transfer_id in pair.results)
        result = pair.results[offer.transfer_id]
        assert result.status is TransferStatus.FAILED and "expired" in result.error
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", WIRE_BACKENDS)
@pytest.mark.parametrize("fault,expect_ok", [
    (dict(corrupt_prob=1.0), False),      # every payload corrupted: detected, retried, reported
    (dict(truncate_prob=1.0), False),     # every payload cut short ("fail after N bytes")
    (dict(drop_prob=1.0), False),         # no reply ever: the receiver times out
    (dict(delay_s=0.2), True),            # slow but whole
])
def test_injected_faults_are_detected_never_used(backend, fault, expect_ok):
    layout = make_layout()
    with running(backend, layout, sender_kwargs={"faults": FaultSpec(**fault)},
                receiver_kwargs={"timeout_s": 0.3, "max_attempts": 3}) as pair:
        before = pair.dst_cache.clone()
        offer, src_ids, dst_ids, result, end = _transfer(pair, "r", 50)
        assert ok(result) is expect_ok, result
        if expect_ok:
            assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
            assert end.outcome is LeaseState.DONE
        else:
            assert result.attempts == 3 and end.outcome is LeaseState.FAILED
            assert torch.equal(pair.dst_cache, before), "a failed transfer wrote into the cache"
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_pulls_are_typed_errors(backend):
    layout = make_layout()
    other = make_layout(head_dim=32)
    real = real_backend(backend)
    mismatched = make_receiver(real, torch.zeros(other.cache_shape(8), dtype=other.torch_dtype), other)
    with running(backend, layout) as pair, contextlib.closing(mismatched):
        offer, _ = pair.offer("r", 40)
        with pytest.raises(TransferError, match="need 3 blocks"):
            pair.receiver.pull(offer, [0, 1])
        with pytest.raises(ValueError, match="head_dim"):
            mismatched.pull(offer, [0, 1, 2])
        wrong = make_receiver("shm" if real == "zmq" else "zmq", pair.dst_cache, layout)
        with pytest.raises(TransferError, match="backend"):
            wrong.pull(offer, [0, 1, 2])
        wrong.close()
        pair.sender.abort(offer.transfer_id)
        pair.drive(lambda: offer.transfer_id in pair.ends)
        assert pair.ends[offer.transfer_id].outcome is LeaseState.ABORTED


@pytest.mark.parametrize("backend", BACKENDS)
def test_soak_1000_transfers_with_random_faults(backend):
    """1000 transfers of random sizes, random faults and aborts; bounded in time; no leak."""
    layout = make_layout(num_layers=2, kv_heads=3, head_dim=16, block_size=8)
    wire = backend not in SHARED
    faults = FaultSpec(corrupt_prob=0.2, truncate_prob=0.1, drop_prob=0.05, seed=7)
    rng = random.Random(11)
    outstanding: dict[str, tuple] = {}
    counts = {"done": 0, "failed": 0, "aborted": 0}
    stop_at = time.monotonic() + 180
    with running(backend, layout, num_blocks=1024, sender_kwargs={"faults": faults} if wire else {},
                 receiver_kwargs={"timeout_s": 0.2, "max_attempts": 3}) as pair:
        for i in range(1000):
            assert time.monotonic() < stop_at, f"soak took too long at transfer {i}"
            offer, src_ids = pair.offer(f"s{i}", rng.randint(1, 120))
            dst_ids = pair.pull(offer)
            outstanding[offer.transfer_id] = (offer, src_ids, dst_ids)
            if rng.random() < 0.03:
                pair.receiver.abort(offer.transfer_id)
                pair.finish_request(offer, dst_ids)
                del outstanding[offer.transfer_id]
                counts["aborted"] += 1
            if len(outstanding) >= 16 or i == 999:
                pair.drive(lambda: all(t in pair.results for t in outstanding), timeout_s=60)
                for tid, (o, s_ids, d_ids) in outstanding.items():
                    r = pair.results[tid]
                    if ok(r):
                        assert torch.equal(pair.received(o, d_ids), pair.sent(o, s_ids)), tid
                    counts["done" if ok(r) else "failed"] += 1
                    pair.finish_request(o, d_ids)
                outstanding.clear()
        pair.drive(lambda: len(pair.ends) == 1000, timeout_s=60)
        assert counts["done"] > 700, counts
        assert counts["failed"] > 0 if wire else counts["failed"] == 0, counts
