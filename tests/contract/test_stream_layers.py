"""Layer-wise streaming between two real processes, on the backends that stream (zmq, shm zero copy, auto).

The sender child offers before the KV is "computed" and releases layers one
at a time (`layers_ready`, what the prefill worker's per-layer hook calls);
the receiver here must land each layer as it is released, not at the end,
and the whole sequence must arrive bit for bit. Every test ends with every
block free on both sides (`running`).
"""
from __future__ import annotations

import pytest
import torch

from kv_transfer.faults import FaultSpec
from kv_transfer.lease import LeaseState
from tests.contract.harness import AUTO_ONE_NODE, AUTO_TWO_NODES, ZERO_COPY, make_layout, ok
from tests.contract.test_transfer_contract import running

STREAM_BACKENDS = ["zmq", ZERO_COPY, AUTO_ONE_NODE, AUTO_TWO_NODES]


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
@pytest.mark.parametrize("num_tokens", [1, 16, 45])
def test_each_layer_lands_as_it_is_released(backend, num_tokens):
    layout = make_layout(num_layers=4, kv_heads=3, head_dim=64, block_size=16)
    with running(backend, layout) as pair:
        offer, src_ids = pair.offer("r", num_tokens, stream=True)
        assert offer.streamed
        dst_ids = pair.pull(offer)
        sent = pair.sent(offer, src_ids)    # [layers, 2, tokens, heads, head_dim]
        for n in range(1, layout.num_layers + 1):
            pair.sender.layers_ready([offer.transfer_id], n)
            if n < layout.num_layers:     # the first n layers are here, and the transfer is not done
                pair.drive(lambda: torch.equal(pair.received(offer, dst_ids)[:n], sent[:n]), timeout_s=10)
                assert offer.transfer_id not in pair.results
                assert not pair.received(offer, dst_ids)[n:].any(), "a layer landed before it was released"
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        result = pair.results[offer.transfer_id]
        assert ok(result), result.error
        assert result.nbytes == num_tokens * layout.bytes_per_token
        assert pair.ends[offer.transfer_id].outcome is LeaseState.DONE
        assert torch.equal(pair.received(offer, dst_ids), sent)
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
def test_a_pull_after_every_layer_is_ready_gets_them_all(backend):
    layout = make_layout(num_layers=3)
    with running(backend, layout) as pair:
        offer, src_ids = pair.offer("r", 37, stream=True)
        pair.sender.layers_ready([offer.transfer_id], None)
        dst_ids = pair.pull(offer)
        pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
        assert ok(pair.results[offer.transfer_id])
        assert torch.equal(pair.received(offer, dst_ids), pair.sent(offer, src_ids))
        pair.finish_request(offer, dst_ids)


@pytest.mark.parametrize("sender_kwargs", [
    dict(faults=FaultSpec(corrupt_prob=0.3, truncate_prob=0.1, seed=5)),
    dict(faults=FaultSpec(corrupt_prob=0.3, seed=6), compress="int8"),
])
def test_corrupted_layers_are_retried_never_used(sender_kwargs):
    layout = make_layout(num_layers=4)
    with running("zmq", layout, sender_kwargs=sender_kwargs,
                 receiver_kwargs={"timeout_s": 0.5, "max_attempts": 8}) as pair:
        outcomes = []
        for i in range(6):
            offer, src_ids = pair.offer(f"r{i}", 40, stream=True)
            dst_ids = pair.pull(offer)
            for n in range(1, layout.num_layers + 1):
                pair.sender.layers_ready([offer.transfer_id], n)
            pair.drive(lambda: offer.transfer_id in pair.results and offer.transfer_id in pair.ends)
            result = pair.results[offer.transfer_id]
            outcomes.append(result.attempts)
            if ok(result):
                got, sent = pair.received(offer, dst_ids), pair.sent(offer, src_ids)
                if "compress" in sender_kwargs:
                    scale = sent.float().abs().amax(dim=-1, keepdim=True) / 127
                    assert bool(((got.float() - sent.float()).abs() <= scale * 0.51 + 1e-2 * sent.float().abs()).all())
                else:
                    assert torch.equal(got, sent)
            pair.finish_request(offer, dst_ids)
        assert max(outcomes) > 1, "no fault was injected: the test shows nothing"


def test_a_backend_that_cannot_stream_refuses_the_offer():
    layout = make_layout()
    with running("shm", layout) as pair:   # staged shm: one segment per transfer, no layers
        with pytest.raises(RuntimeError, match="cannot stream layers"):
            pair.offer("r", 10, stream=True)
