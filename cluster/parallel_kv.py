"""KV transfer for a multi-rank instance: through rank 0's canonical cache.

Each rank of a tp x pp instance caches its share (its layers x its KV heads) in
the same block ids. The transfer layer of the instance lives on rank 0 and sees
one cache of the whole model in the canonical layout (`ParallelRunner.kv_cache`):

  prefill: `GatheringSender.offer` first gathers every rank's share of the
           request's blocks into it, then offers them as a one-rank instance would;
  decode:  `ScatteringReceiver` lets pulls land in it and, when one is DONE,
           scatters those blocks to the ranks before the worker sees the result
           (so before the request's first decode step).

Why this design (rather than each rank sending its own share): offers, leases,
the router and both worker objects stay exactly as for one rank — one offer per
request, one endpoint per instance — and any plan talks to any plan, because
the wire is always the whole model's KV (`kv_transfer.layout` converts block
sizes; a one-rank peer sees an ordinary one-rank layout). The cost: rank 0
holds a second, full-model cache and every transferred block crosses the
instance's group once more (gloo ~3 GB/s here; NVLink on a GPU). Per-rank
transfer (each rank its own sender, the receiver completing on `layout.covers`)
avoids both and is what a GPU deployment would want next; the transfer layer
already converts between such shares (tests/contract/test_plan_conversion.py).
Layer streaming is not combined with it: the KV is gathered after the forward.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.block_manager import blocks_needed
from engine.parallel_runner import ParallelRunner
from kv_transfer.base import KVReceiver, KVSender, TransferError, TransferOffer, TransferResult, TransferStatus


class GatheringSender(KVSender):
    def __init__(self, inner: KVSender, runner: ParallelRunner) -> None:
        self.inner, self.runner = inner, runner

    @property
    def endpoint(self) -> str:
        return self.inner.endpoint

    def offer(self, req_id: str, block_ids: Sequence[int], num_tokens: int, now: float,
              ttl_s: float | None = None, stream: bool = False) -> TransferOffer:
        if stream:
            raise TransferError("a multi-rank prefill instance does not stream layers (its KV is gathered "
                                "on rank 0 after the forward)")
        self.runner.gather_blocks(list(block_ids)[:blocks_needed(num_tokens, self.runner.block_size)])
        return self.inner.offer(req_id, block_ids, num_tokens, now, ttl_s)

    def serve(self, now: float) -> None:
        self.inner.serve(now)   # rank 0's canonical cache: no collective, safe mid-forward

    def poll(self, now: float):
        return self.inner.poll(now)

    def abort(self, transfer_id: str, now: float):
        return self.inner.abort(transfer_id, now)

    def wait_sockets(self) -> list | None:
        return self.inner.wait_sockets()

    def wait(self, timeout_s: float) -> None:
        self.inner.wait(timeout_s)

    def close(self) -> None:
        self.inner.close()


class ScatteringReceiver(KVReceiver):
    def __init__(self, inner: KVReceiver, runner: ParallelRunner) -> None:
        self.inner, self.runner = inner, runner
        self._blocks: dict[str, list[int]] = {}   # transfer_id -> the blocks its KV lands in

    def pull(self, offer: TransferOffer, dst_block_ids: Sequence[int], skip_tokens: int = 0) -> None:
        self.inner.pull(offer, dst_block_ids, skip_tokens)
        # the skipped blocks are on the ranks already (they computed or were given them)
        bs = self.runner.block_size
        self._blocks[offer.transfer_id] = list(dst_block_ids)[skip_tokens // bs:blocks_needed(offer.num_tokens, bs)]

    def poll(self) -> list[TransferResult]:
        results = self.inner.poll()
        for result in results:
            ids = self._blocks.pop(result.transfer_id, None)
            if ids and result.status is TransferStatus.DONE:
                self.runner.scatter_blocks(ids)
        return results

    def abort(self, transfer_id: str) -> None:
        self._blocks.pop(transfer_id, None)
        self.inner.abort(transfer_id)

    def abort_offer(self, offer: TransferOffer) -> None:
        self.inner.abort_offer(offer)

    def fail_endpoint(self, endpoint: str, reason: str) -> None:
        self.inner.fail_endpoint(endpoint, reason)   # failed pulls come back through poll, unscattered

    def wait_sockets(self) -> list | None:
        return self.inner.wait_sockets()

    def wait(self, timeout_s: float) -> None:
        self.inner.wait(timeout_s)

    def close(self) -> None:
        self.inner.close()
