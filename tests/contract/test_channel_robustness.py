"""Regressions of the zmq channel, each driving both sides' poll by hand in one process
(the orderings that broke it need exact control of who polls when)."""
from __future__ import annotations

import json
import time
from dataclasses import replace as dataclasses_replace

import pytest
import torch
import zmq

from kv_transfer import make_receiver, make_sender
from kv_transfer.base import TransferError, TransferOffer, TransferStatus
from kv_transfer.channel import ChannelSender
from kv_transfer.channel_receiver import ChannelReceiver
from kv_transfer.lease import LeaseState
from kv_transfer.shared_cache import SharedKVCache
from tests.contract.harness import make_cache, make_layout, sequence_kv

LAYOUT = make_layout(num_layers=2, kv_heads=3, head_dim=16, block_size=4)


def _run(sender, receiver, until, seconds=10.0):
    results, ends = [], []
    stop_at = time.monotonic() + seconds
    while not until(results, ends):
        assert time.monotonic() < stop_at, (results, ends)
        ends += sender.poll(time.monotonic())
        results += receiver.poll()
        time.sleep(0.001)
    return results, ends


@pytest.mark.parametrize("backend", ["zmq", "shm"])
def test_a_retry_answered_twice_lands_once_from_the_latest_reply(backend):
    """The receiver times out and asks again before the sender polled: the sender serves
    both PULLs (shm: the second unlinks the first segment); the stale reply is dropped."""
    src = make_cache(LAYOUT, 16, seed=1)
    dst = torch.zeros_like(src)
    sender = ChannelSender(src, LAYOUT, backend)
    receiver = ChannelReceiver(dst, LAYOUT, backend, timeout_s=0.05)
    try:
        offer = sender.offer("r", [3, 7, 1], 10, time.monotonic())
        receiver.pull(offer, [0, 5, 9])
        time.sleep(0.1)
        assert receiver.poll() == []            # timed out: PULL attempt 2 sent
        results, ends = _run(sender, receiver, lambda r, e: r and e)
        assert [r.status for r in results] == [TransferStatus.DONE] and results[0].attempts == 2
        assert ends[0].outcome is LeaseState.DONE
        assert torch.equal(sequence_kv(dst, LAYOUT, [0, 5, 9], 10), sequence_kv(src, LAYOUT, [3, 7, 1], 10))
    finally:
        receiver.close()
        sender.close()


def test_zero_copy_fails_when_the_lease_ended_before_the_copy():
    """Zero copy reads the sender's cache late: if the lease expired and the blocks were
    reused meanwhile, the transfer must fail, never report another request's KV as done.
    (The PULL path: an offer without the direct head, as a direct copy's fallback asks.)"""
    shared = SharedKVCache(LAYOUT.cache_shape(16), LAYOUT.torch_dtype)
    shared.tensor.copy_(make_cache(LAYOUT, 16, seed=2))
    dst = torch.zeros(LAYOUT.cache_shape(16), dtype=LAYOUT.torch_dtype)
    sender = ChannelSender(shared.tensor, LAYOUT, "shm", checksum=False, shared_cache=shared)
    receiver = ChannelReceiver(dst, LAYOUT, "shm")
    try:
        offer = sender.offer("r", [3, 7], 6, time.monotonic(), ttl_s=0.1)
        receiver.pull(dataclasses_replace(offer, zero_copy=None), [0, 1])
        stop_at = time.monotonic() + 5                  # serve it: a header naming the blocks
        while sender.leases.get(offer.transfer_id).state is not LeaseState.IN_FLIGHT:
            assert time.monotonic() < stop_at and sender.poll(time.monotonic()) == []
        time.sleep(0.15)
        ends = sender.poll(time.monotonic())            # the lease expires; blocks reused:
        assert [e.outcome for e in ends] == [LeaseState.EXPIRED]
        shared.tensor[:, :, [3, 7]] = 7.0
        results, _ = _run(sender, receiver, lambda r, e: r)
        # the copy saw changed generations, the retry found the lease gone: FAILED
        assert results[0].status is TransferStatus.FAILED and results[0].attempts == 2
        assert "expired" in results[0].error
    finally:
        receiver.close()
        sender.close()
        shared.close()


def test_zero_copy_needs_a_configuration_without_a_wire():
    shared = SharedKVCache(LAYOUT.cache_shape(4), LAYOUT.torch_dtype)
    try:
        for kwargs in ({"backend": "zmq", "checksum": False}, {"backend": "shm", "checksum": True},
                       {"backend": "shm", "checksum": False, "compress": "int8"}):
            with pytest.raises(TransferError, match="zero copy"):
                ChannelSender(shared.tensor, LAYOUT, shared_cache=shared, **kwargs)
    finally:
        shared.close()


@pytest.mark.parametrize("backend", ["zmq", "shm"])
def test_malformed_messages_are_dropped_and_the_sender_keeps_serving(backend):
    src = make_cache(LAYOUT, 16, seed=3)
    dst = torch.zeros_like(src)
    sender = ChannelSender(src, LAYOUT, backend)
    receiver = ChannelReceiver(dst, LAYOUT, backend)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(sender.endpoint)
    try:
        rogue.send(b"PULL")                                         # one frame
        rogue.send_multipart([b"PULL", b"{not json"])               # bad JSON
        rogue.send_multipart([b"ACK", json.dumps([1, 2]).encode()])  # not an object
        rogue.send_multipart([b"PULL", json.dumps({"transfer_id": 5}).encode()])
        rogue.send_multipart([b"PULL", json.dumps({"transfer_id": "nope", "attempt": "x"}).encode()])
        time.sleep(0.05)
        assert sender.poll(time.monotonic()) == []
        offer = sender.offer("r", [2, 4], 8, time.monotonic())
        receiver.pull(offer, [1, 3])
        results, ends = _run(sender, receiver, lambda r, e: r and e)
        assert results[0].status is TransferStatus.DONE and ends[0].outcome is LeaseState.DONE
    finally:
        rogue.close(0)
        ctx.term()
        receiver.close()
        sender.close()


def test_bad_endpoints_and_blocks_fail_without_blocking():
    src = make_cache(LAYOUT, 8, seed=4)
    sender = ChannelSender(src, LAYOUT, "zmq")
    receiver = ChannelReceiver(torch.zeros_like(src), LAYOUT, "zmq", timeout_s=0.05, max_attempts=2)
    try:
        offer = sender.offer("r", [1, 2], 8, time.monotonic())
        bad = type(offer)(offer.transfer_id, "r", 8, LAYOUT, "not-an-endpoint", "zmq")
        with pytest.raises(TransferError, match="cannot connect"):
            receiver.pull(bad, [0, 1])
        with pytest.raises(TransferError, match="distinct"):
            receiver.pull(offer, [0, 0])
        with pytest.raises(TransferError, match="distinct"):
            receiver.pull(offer, [0, 99])
        sender.close()                                  # the sender is gone: time out, fail
        sender = None
        receiver.pull(offer, [0, 1])
        stop_at = time.monotonic() + 5
        results = []
        while not results:
            assert time.monotonic() < stop_at
            results = receiver.poll()
            time.sleep(0.01)
        assert results[0].status is TransferStatus.FAILED and results[0].attempts == 2
    finally:
        receiver.close()
        if sender is not None:
            sender.close()


def test_ray_backend_without_a_ray_connection_is_a_typed_error():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process is connected to Ray")
    src = make_cache(LAYOUT, 4, seed=5)
    for make in (make_sender, make_receiver):
        with pytest.raises(TransferError, match="Ray cluster"):
            make("ray", src, LAYOUT)


@pytest.mark.parametrize("dist", [
    None,                                                        # no torch_dist section at all
    {"store": "not-an-address", "group": "g", "backend": "gloo", "tags": [1]},
    {"store": "127.0.0.1:1", "group": "g", "backend": "nccl", "tags": [1]},   # NCCL into a CPU cache
    {"store": "127.0.0.1:1", "group": "g", "backend": "gloo", "tags": [0]},   # a tag no sender uses
])
def test_torch_dist_headers_it_cannot_follow_fail_the_attempt_without_blocking(dist):
    """A rogue sender answers every PULL with a DATA header the receiver cannot act on: each
    attempt fails at once, the pull ends FAILED naming the problem, and no poll blocks."""
    dst = torch.zeros(LAYOUT.cache_shape(8), dtype=LAYOUT.torch_dtype)
    receiver = make_receiver("torch_dist", dst, LAYOUT, timeout_s=5.0, max_attempts=2)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.ROUTER)
    rogue.setsockopt(zmq.LINGER, 0)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    try:
        offer = TransferOffer("t-1", "r", 8, LAYOUT, f"tcp://127.0.0.1:{port}", "torch_dist")
        receiver.pull(offer, [0, 1])
        results, slowest = [], 0.0
        stop_at = time.monotonic() + 5
        while not results:
            assert time.monotonic() < stop_at
            try:
                identity, kind, raw = rogue.recv_multipart(zmq.NOBLOCK)
                head = json.loads(raw)
                if kind == b"PULL":
                    meta = [{"shape": [LAYOUT.local_layers, 2, 8, LAYOUT.local_heads, LAYOUT.head_dim],
                             "dtype": LAYOUT.dtype, "offset": 0, "nbytes": 8 * LAYOUT.bytes_per_token}]
                    reply = {"transfer_id": "t-1", "attempt": head["attempt"], "payload": meta}
                    if dist is not None:
                        reply["dist"] = dist
                    rogue.send_multipart([identity, b"DATA", json.dumps(reply).encode()])
            except zmq.Again:
                pass
            start = time.monotonic()
            results = receiver.poll()
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.001)
        assert results[0].status is TransferStatus.FAILED and results[0].attempts == 2, results
        assert "torch_dist" in results[0].error or "NCCL" in results[0].error or "address" in results[0].error
        assert slowest < 0.1, f"a poll took {slowest:.3f}s"
        assert torch.count_nonzero(dst) == 0
    finally:
        receiver.close()
        rogue.close(0)
        ctx.term()


@pytest.mark.parametrize("backend", ["zmq", "shm"])
def test_closing_a_receiver_right_after_its_pull_still_aborts_the_lease(backend):
    """close() sends ABORT for its pulls and lingers until it is out: the lease ends by that
    ABORT at once, not at its TTL (with linger 0 the ABORT, and the PULL, were dropped while
    the connection was still being made)."""
    src = make_cache(LAYOUT, 16, seed=5)
    sender = ChannelSender(src, LAYOUT, backend, lease_ttl_s=30.0)
    try:
        for i in range(5):   # a fresh receiver each time: its connection is never up yet
            receiver = ChannelReceiver(torch.zeros_like(src), LAYOUT, backend)
            offer = sender.offer(f"r{i}", [1, 2], 6, time.monotonic())
            receiver.pull(offer, [3, 4])
            receiver.close()
            ends, stop_at = [], time.monotonic() + 2.0
            while not ends and time.monotonic() < stop_at:
                ends += sender.poll(time.monotonic())
                time.sleep(0.001)
            assert [e.outcome for e in ends] == [LeaseState.ABORTED], f"round {i}: {ends}"
    finally:
        sender.close()


def test_a_pull_that_cannot_start_can_still_give_the_offer_back():
    src = make_cache(LAYOUT, 16, seed=6)
    sender = ChannelSender(src, LAYOUT, "zmq", lease_ttl_s=30.0)
    receiver = ChannelReceiver(torch.zeros_like(src), LAYOUT, "zmq")
    try:
        offer = sender.offer("r", [1, 2], 6, time.monotonic())
        with pytest.raises(TransferError, match="need 2 blocks"):
            receiver.pull(offer, [3])
        receiver.abort_offer(offer)
        _, ends = _run(sender, receiver, lambda r, e: e, seconds=2.0)
        assert [e.outcome for e in ends] == [LeaseState.ABORTED]
        receiver.abort_offer(dataclasses_replace(offer, endpoint="tcp://no-such-host:1"))   # never raises
    finally:
        receiver.close()
        sender.close()


@pytest.mark.parametrize("zero_copy", [False, True])
def test_the_receiver_keeps_at_most_max_endpoints_sockets_and_mappings(zero_copy):
    """Idle senders' sockets (and shared-cache mappings) are closed least recently used first;
    one serving a pending pull never is: the bound is exceeded instead, until it is idle."""
    shared = [SharedKVCache(LAYOUT.cache_shape(8), LAYOUT.torch_dtype) for _ in range(3)] if zero_copy else []
    caches = [s.tensor for s in shared] if zero_copy else [make_cache(LAYOUT, 8, seed=10 + i) for i in range(3)]
    for i, cache in enumerate(caches):
        cache.copy_(make_cache(LAYOUT, 8, seed=10 + i))
    kw = [dict(checksum=False, shared_cache=s) for s in shared] if zero_copy else [{}] * 3
    senders = [ChannelSender(c, LAYOUT, "shm" if zero_copy else "zmq", **k) for c, k in zip(caches, kw)]
    dst = torch.zeros(LAYOUT.cache_shape(8), dtype=LAYOUT.torch_dtype)
    receiver = ChannelReceiver(dst, LAYOUT, "shm" if zero_copy else "zmq", max_endpoints=2)

    def transfer(k: int, req: str) -> None:
        offer = senders[k].offer(req, [2, 5], 7, time.monotonic())
        receiver.pull(offer, [1, 6])
        results, ends = _run(senders[k], receiver, lambda r, e: r and e)
        assert results[0].status is TransferStatus.DONE
        assert torch.equal(sequence_kv(dst, LAYOUT, [1, 6], 7), sequence_kv(caches[k], LAYOUT, [2, 5], 7))

    try:
        for step, k in enumerate([0, 1, 2, 0, 2, 1]):
            transfer(k, f"r{step}")
            assert len(receiver._socks) <= 2
            assert len(receiver._attached) <= 2
        if zero_copy:
            assert len(receiver._attached) == 2
        # two pulls pending on senders 0 and 1: a third sender goes over the bound, nothing pending is closed
        offers = [senders[k].offer(f"p{k}", [k], 3, time.monotonic()) for k in range(3)]
        for k, offer in enumerate(offers):
            receiver.pull(offer, [k + 4])
        assert len(receiver._socks) == 3
        results, stop_at = [], time.monotonic() + 10
        while len(results) < 3 and time.monotonic() < stop_at:
            for s in senders:
                s.poll(time.monotonic())
            results += receiver.poll()
            time.sleep(0.001)
        assert sorted(r.status.value for r in results) == ["done"] * 3
        transfer(0, "again")   # idle now: back under the bound
        assert len(receiver._socks) == 2
    finally:
        receiver.close()
        for s in senders:
            s.close()
        caches = None
        for s in shared:
            s.close()


def test_a_socket_evicted_while_polling_is_skipped_not_read():
    """One poll handles sender 1's reply, whose ACK evicts idle sender 0's socket, which comes
    later in that poll's list of sockets: it is skipped (it used to raise ENOTSOCK)."""
    caches = [make_cache(LAYOUT, 8, seed=20 + i) for i in range(3)]
    senders = [ChannelSender(c, LAYOUT, "zmq") for c in caches]
    dst = torch.zeros(LAYOUT.cache_shape(8), dtype=LAYOUT.torch_dtype)
    receiver = ChannelReceiver(dst, LAYOUT, "zmq", max_endpoints=2)
    try:
        offers = [senders[k].offer(f"e{k}", [k], 3, time.monotonic()) for k in range(3)]
        for k, offer in enumerate(offers):
            receiver.pull(offer, [k + 4])
        assert len(receiver._socks) == 3   # all busy: over the bound
        results, _ = _run(senders[0], receiver, lambda r, e: r)   # sender 0 done: idle, last used
        assert list(receiver._socks) == [offers[1].endpoint, offers[2].endpoint, offers[0].endpoint]
        stop_at = time.monotonic() + 10
        while len(results) < 3 and time.monotonic() < stop_at:
            for s in senders[1:]:
                s.poll(time.monotonic())
            time.sleep(0.2)   # both replies queued before the one poll that reads them
            results += receiver.poll()
        assert [r.status for r in results] == [TransferStatus.DONE] * 3
        assert offers[0].endpoint not in receiver._socks and len(receiver._socks) == 2
        for k in range(3):
            assert torch.equal(sequence_kv(dst, LAYOUT, [k + 4], 3), sequence_kv(caches[k], LAYOUT, [k], 3))
    finally:
        receiver.close()
        for s in senders:
            s.close()


def test_wait_sockets_wake_a_sleeping_loop_on_the_other_sides_message():
    """What a worker host sleeps on (zmq.Poller): the sender's socket wakes on a PULL, the
    receiver's on the reply; with injected delays the sender has work no socket announces."""
    from kv_transfer.faults import FaultSpec
    src = make_cache(LAYOUT, 16, seed=8)
    sender = ChannelSender(src, LAYOUT, "zmq")
    receiver = ChannelReceiver(torch.zeros_like(src), LAYOUT, "zmq")
    delayed = ChannelSender(src, LAYOUT, "zmq", faults=FaultSpec(delay_s=0.05))
    try:
        assert receiver.wait_sockets() == []
        offer = sender.offer("r", [1, 2], 6, time.monotonic())
        receiver.pull(offer, [3, 4])
        poller = zmq.Poller()
        for sock in sender.wait_sockets():
            poller.register(sock, zmq.POLLIN)
        assert poller.poll(2000), "the PULL did not wake the sender's poller"
        sender.poll(time.monotonic())
        (rsock,) = receiver.wait_sockets()
        assert rsock.poll(2000, zmq.POLLIN), "the reply did not wake the receiver's poller"
        _run(sender, receiver, lambda r, e: r and e)
        offer2 = delayed.offer("d", [1, 2], 6, time.monotonic())
        receiver.pull(offer2, [5, 6])
        _run(delayed, receiver, lambda r, e: delayed._delayed, seconds=2.0)
        assert delayed.wait_sockets() is None     # a held-back reply is due without any message
        _run(delayed, receiver, lambda r, e: r and e)
    finally:
        receiver.close()
        sender.close()
        delayed.close()
