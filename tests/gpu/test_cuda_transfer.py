"""KV transfer between two caches on one device, sender and receiver in this process: the host
backends (zmq, shm) carry a GPU cache's blocks through host memory. The CPU case runs everywhere
(it checks the test itself); the CUDA case needs a GPU (`make gpu-check`). torch_dist over NCCL
between two GPU processes is the contract suite's torch_dist backend with caches on two GPUs."""
from __future__ import annotations

import time

import pytest
import torch

from kv_transfer import make_receiver, make_sender
from kv_transfer.base import TransferStatus
from kv_transfer.layout import KVLayout

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: run `make gpu-check` on a machine with one"))]


def _cache(layout: KVLayout, num_blocks: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.cache_shape(num_blocks), generator=g).to(layout.torch_dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,checksum", [("zmq", False), ("shm", True)])
def test_a_transfer_between_caches_on_the_device(device, backend, checksum):
    layout = KVLayout(num_layers=3, layer_start=0, layer_end=3, num_kv_heads=3, head_start=0, head_end=3,
                      head_dim=64, block_size=16, dtype="bfloat16")
    src, dst = _cache(layout, 32, device, 1), torch.zeros(layout.cache_shape(32), dtype=torch.bfloat16, device=device)
    sender = make_sender(backend, src, layout, host="127.0.0.1", lease_ttl_s=30.0, checksum=checksum)
    receiver = make_receiver(backend, dst, layout)
    try:
        src_ids, dst_ids, num_tokens = [3, 9, 4], [20, 1, 7], 40
        offer = sender.offer("r0", src_ids, num_tokens, time.monotonic())
        receiver.pull(offer, dst_ids)
        results, deadline = [], time.monotonic() + 30
        while not results and time.monotonic() < deadline:
            sender.serve(time.monotonic())
            sender.poll(time.monotonic())
            results = receiver.poll()
            time.sleep(0.001)
        assert [r.status for r in results] == [TransferStatus.DONE], results
        for s, d in zip(src_ids[:2], dst_ids[:2]):   # 40 tokens: two whole blocks, then 8 rows of a third
            assert torch.equal(dst[:, :, d], src[:, :, s])
        assert torch.equal(dst[:, :, dst_ids[2], :8], src[:, :, src_ids[2], :8])
        assert dst.device == src.device
    finally:
        receiver.close()
        sender.close()
