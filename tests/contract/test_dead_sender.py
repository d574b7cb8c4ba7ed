"""A sender whose process is killed mid-transfer: `fail_endpoint` ends its pulls at once.

The sender child (a prefill rank) is SIGKILLed with pulls under way: one
streamed pull that got only its first layer, one whole pull asked for after
the kill. Told the endpoint is gone, the receiver here must report both FAILED
at its next poll (not after its 10 s x 3 timeouts), close that sender's
socket, unmap its shared cache (zero copy: a dead process's segment is freed
only once nobody maps it), and refuse that sender's offers from then on. The
receiver's own blocks all come back; the dead child's segment, which a
resource tracker would unlink, is unlinked here in its place.
"""
from __future__ import annotations

import os
import time
from multiprocessing import resource_tracker

import pytest
import torch
from _posixshmem import shm_unlink

from kv_transfer.base import TransferError, TransferStatus
from tests.contract.harness import ZERO_COPY, Pair, make_layout, ok

BACKENDS = ["zmq", ZERO_COPY]   # those that stream: a pull that has started and not landed


def _segments() -> set[str]:
    """Shared memory segments made by SharedMemory (the KV caches), of any process here."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def _mapped(name: str) -> bool:
    """Whether this process maps shared memory segment `name`."""
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(f"/dev/shm/{name}") or f"/dev/shm/{name} " in line for line in f)


def _unlink_dead_segment(name: str) -> None:
    """What the dead process's resource tracker does: the child shares this process's tracker
    (multiprocessing spawn), which would only get to it when this process exits."""
    resource_tracker.unregister(f"/{name}", "shared_memory")
    shm_unlink(f"/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pulls_from_a_killed_sender_fail_at_once_and_its_mapping_goes(backend):
    layout = make_layout(num_layers=3, kv_heads=3, head_dim=64, block_size=16)
    shm_before = _segments()
    pair = Pair(backend, layout, layout, receiver_kwargs={"timeout_s": 10.0})
    killed = False
    try:
        # a transfer that lands: a zero-copy receiver maps the sender's cache for good
        done, _ = pair.offer("done", 40)
        done_ids = pair.pull(done)
        pair.drive(lambda: done.transfer_id in pair.results and done.transfer_id in pair.ends)
        assert ok(pair.results[done.transfer_id])
        segment = done.zero_copy["name"] if backend == ZERO_COPY else None
        assert segment is None or _mapped(segment)
        # a streamed pull with its first layer in, and an offer not yet pulled
        streamed, src_ids = pair.offer("streamed", 33, stream=True)
        streamed_ids = pair.pull(streamed)
        pair.sender.layers_ready([streamed.transfer_id], 1)
        pair.drive(lambda: bool(pair.received(streamed, streamed_ids)[0].any()))
        assert torch.equal(pair.received(streamed, streamed_ids)[0], pair.sent(streamed, src_ids)[0])
        late, _ = pair.offer("late", 20)
        later, _ = pair.offer("later", 5)

        pair.sender.proc.kill()                     # SIGKILL: no close, no ABORT, no goodbye
        pair.sender.proc.join(10)
        killed = True
        assert pair.sender.proc.exitcode == -9
        late_ids = pair.pull(late)                  # sent into the void (zero copy: a direct copy due)
        start = time.monotonic()
        pair.receiver.fail_endpoint(streamed.endpoint, "prefill-0 died")
        pair.dst.poll()
        elapsed = time.monotonic() - start
        for offer in (streamed, late):
            result = pair.results[offer.transfer_id]
            assert result.status is TransferStatus.FAILED and result.error == "prefill-0 died"
        assert elapsed < 1.0, "the pulls waited for their timeouts"
        assert pair.receiver.wait_sockets() in (None, [])   # its socket is closed
        assert segment is None or not _mapped(segment), "the dead sender's cache is still mapped"
        # its offers still on their way are refused; giving one back does not raise
        spare = pair.dst_blocks.allocate(later.num_tokens)
        with pytest.raises(TransferError, match="gone: prefill-0 died"):
            pair.receiver.pull(later, spare)
        pair.receiver.abort_offer(later)
        pair.dst.poll()
        assert set(pair.results) == {done.transfer_id, streamed.transfer_id, late.transfer_id}
        for ids in (done_ids, streamed_ids, late_ids, spare):
            pair.dst_blocks.free(ids)
        assert pair.dst_blocks.num_free_blocks == pair.dst_blocks.num_blocks
    finally:
        pair.dst.close()
        if killed:
            pair.sender._child.stop()   # dead: never handed to another test
        else:
            pair.sender.close()
        for name in _segments() - shm_before:
            _unlink_dead_segment(name)
    pair.dst.count_left_open()
    assert pair.dst.left_open in (None, {"fds": 0, "threads": 0}), pair.dst.left_open
    assert _segments() <= shm_before
