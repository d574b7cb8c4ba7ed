"""Direct zero copy: an shm zero copy offer made after prefill names its blocks and their
generations, so the receiver copies on its next poll without a PULL / DATA round trip.
Whatever goes wrong falls back to the old protocol (PULL attempt 2), which can only end
in ERROR / FAILED for an ended lease: never DONE with another request's KV."""
from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import pytest
import torch

from kv_transfer.base import TransferStatus
from kv_transfer.channel import ChannelSender
from kv_transfer.channel_receiver import ChannelReceiver
from kv_transfer.lease import LeaseState
from kv_transfer.shared_cache import SharedKVCache
from tests.contract.harness import ZERO_COPY, Pair, make_cache, make_layout, ok, sequence_kv
from tests.contract.test_transfer_contract import _close_clean

LAYOUT = make_layout(num_layers=2, kv_heads=3, head_dim=16, block_size=4)


def _spy(receiver) -> tuple[list, list]:
    """(what the receiver sent: (kind, attempt), what it received: kinds), recorded from now on."""
    sent, got = [], []
    control, handle = receiver._control, receiver._handle

    def spy_control(endpoint, kind, head):
        sent.append((kind, head.get("attempt")))
        return control(endpoint, kind, head)

    def spy_handle(kind, head, frames):
        got.append(kind)
        return handle(kind, head, frames)

    receiver._control, receiver._handle = spy_control, spy_handle
    return sent, got


@contextlib.contextmanager
def _pair(**kwargs):
    pair = Pair(ZERO_COPY, LAYOUT, LAYOUT, num_blocks=64, **kwargs)
    try:
        yield pair
    finally:
        _close_clean(pair)   # every block free on both sides, no live lease


def test_a_direct_zero_copy_lands_bit_for_bit_without_a_pull():
    with _pair() as pair:
        sent, got = _spy(pair.receiver)
        for i, n in enumerate([1, 4, 5, 23]):
            offer, src_ids = pair.offer(f"r{i}", n)
            assert offer.zero_copy is not None and offer.zero_copy["block_ids"] == src_ids
            dst_ids = pair.pull(offer)
            pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
            result, end = pair.results[offer.transfer_id], pair.ends[offer.transfer_id]
            assert ok(result) and result.attempts == 1, result
            assert end.outcome is LeaseState.DONE and list(end.block_ids) == src_ids
            assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
            pair.finish_request(offer, dst_ids)
        assert sent == [(b"ACK", 1)] * 4   # no PULL: one ACK per transfer
        assert got == []                   # and the sender sent nothing: no DATA


@pytest.mark.parametrize("how", ["abort", "expire"])
def test_a_direct_copy_of_an_ended_lease_fails_and_the_reused_blocks_land_once(how):
    """The lease ended (its generations bumped) and its blocks went to the next request before
    the decode side pulled: the direct copy fails, the fallback PULL gets ERROR -> FAILED."""
    with _pair() as pair:
        # two references on the blocks: the second goes to the next request's lease
        stale, stale_src = pair.sender.offer("old", 9, ttl_s=0.2 if how == "expire" else None, uses=2)
        if how == "abort":
            pair.sender.abort(stale.transfer_id)
        pair.drive(lambda: stale.transfer_id in pair.ends, timeout_s=10)
        assert pair.ends[stale.transfer_id].outcome is (LeaseState.ABORTED if how == "abort" else LeaseState.EXPIRED)
        fresh, fresh_src = pair.sender.reoffer("new", stale_src, 9), stale_src   # the same blocks, leased anew
        sent, _ = _spy(pair.receiver)
        dst_ids = pair.pull(stale)
        pair.drive(lambda: stale.transfer_id in pair.results)
        result = pair.results[stale.transfer_id]
        assert result.status is TransferStatus.FAILED and result.attempts == 2, result
        assert "unknown, ended or expired" in result.error
        assert sent == [(b"PULL", 2)]   # the direct copy failed; the fallback is the old protocol
        pair.finish_request(stale, dst_ids)
        dst_ids = pair.pull(fresh)       # the request that owns the blocks now still gets its KV
        pair.drive(lambda: fresh.transfer_id in pair.results and fresh.transfer_id in pair.ends)
        assert ok(pair.results[fresh.transfer_id]) and pair.results[fresh.transfer_id].attempts == 1
        assert torch.equal(pair.received(fresh, dst_ids), pair.sent(fresh, fresh_src))
        pair.finish_request(fresh, dst_ids)


@contextlib.contextmanager
def _in_process(**receiver_kwargs):
    shared = SharedKVCache(LAYOUT.cache_shape(16), LAYOUT.torch_dtype)
    shared.tensor.copy_(make_cache(LAYOUT, 16, seed=7))
    dst = torch.zeros(LAYOUT.cache_shape(16), dtype=LAYOUT.torch_dtype)
    sender = ChannelSender(shared.tensor, LAYOUT, "shm", checksum=False, shared_cache=shared)
    receiver = ChannelReceiver(dst, LAYOUT, "shm", **receiver_kwargs)
    try:
        yield shared, sender, receiver, dst
    finally:
        receiver.close()
        sender.close()
        shared.close()


def _until(sender, receiver, done, seconds=10.0):
    results, ends = [], []
    stop_at = time.monotonic() + seconds
    while not done(results, ends):
        assert time.monotonic() < stop_at, (results, ends)
        ends += sender.poll(time.monotonic())
        results += receiver.poll()
        time.sleep(0.001)
    return results, ends


def test_a_direct_copy_that_cannot_attach_falls_back_to_a_pull():
    with _in_process() as (shared, sender, receiver, dst):
        offer = sender.offer("r", [3, 7, 1], 10, time.monotonic())
        bad = replace(offer, zero_copy={**offer.zero_copy, "name": "no-such-segment"})
        sent, got = _spy(receiver)
        receiver.pull(bad, [0, 5, 9])
        assert sent == []                # pull itself neither asks nor copies
        results, ends = _until(sender, receiver, lambda r, e: r and e)
        assert results[0].status is TransferStatus.DONE and results[0].attempts == 2
        assert ends[0].outcome is LeaseState.DONE and sender.leases.held_blocks() == 0
        assert sent == [(b"PULL", 2), (b"ACK", 2)] and got == [b"DATA"]
        assert torch.equal(sequence_kv(dst, LAYOUT, [0, 5, 9], 10), sequence_kv(shared.tensor, LAYOUT, [3, 7, 1], 10))


def test_an_unanswered_fallback_pull_still_times_out():
    with _in_process(timeout_s=0.05, max_attempts=2) as (_, sender, receiver, dst):
        offer = sender.offer("r", [3, 7], 6, time.monotonic())
        receiver.pull(replace(offer, zero_copy={**offer.zero_copy, "name": "no-such-segment"}), [0, 1])
        results, stop_at = [], time.monotonic() + 5
        while not results:   # the sender never polls: PULL attempt 2 gets no answer
            assert time.monotonic() < stop_at
            results = receiver.poll()
            time.sleep(0.01)
        assert results[0].status is TransferStatus.FAILED and results[0].attempts == 2
        assert "no answer" in results[0].error and torch.count_nonzero(dst) == 0
        _, ends = _until(sender, receiver, lambda r, e: e)   # its failure ACK ends the lease
        assert ends[0].outcome is LeaseState.FAILED and sender.leases.held_blocks() == 0


def test_a_direct_pull_aborted_before_its_poll_copies_nothing_and_frees_the_lease():
    with _in_process() as (_, sender, receiver, dst):
        offer = sender.offer("r", [3, 7], 6, time.monotonic())
        receiver.pull(offer, [0, 1])
        receiver.abort(offer.transfer_id)
        results, ends = _until(sender, receiver, lambda r, e: e)
        assert results == [] and ends[0].outcome is LeaseState.ABORTED
        assert sender.leases.held_blocks() == 0 and torch.count_nonzero(dst) == 0
