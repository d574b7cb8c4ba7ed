"""Two real processes for transfer tests: a sender (prefill side) child and a receiver here.

The child owns a KV cache filled deterministically from a seed, a BlockManager
and a ChannelSender; it allocates blocks for each offer, frees them on every
LeaseEnd, and reports offers, lease ends and its final block count through
queues. The test process owns the receiver, its cache and its BlockManager.
Everything is bounded in time and binds 127.0.0.1 only.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from kv_transfer.base import TransferOffer, TransferResult, TransferStatus
from kv_transfer.channel import ChannelReceiver, ChannelSender
from kv_transfer.faults import FaultSpec
from kv_transfer.layout import KVLayout
from kv_transfer.lease import LeaseEnd
from kv_transfer.shared_cache import SharedKVCache

CHILD_MAX_SECONDS = 240.0
ZERO_COPY = "shm-zero-copy"   # backend shm, sender cache in shared memory, no checksum


def make_layout(num_layers=3, kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16") -> KVLayout:
    return KVLayout(num_layers=num_layers, layer_start=0, layer_end=num_layers, num_kv_heads=kv_heads,
                    head_start=0, head_end=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype)


def make_cache(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.cache_shape(num_blocks), generator=g).to(layout.torch_dtype)


def sequence_kv(cache: torch.Tensor, layout: KVLayout, block_ids, num_tokens: int) -> torch.Tensor:
    """A sequence's KV read token by token through its block table: [layers, 2, tokens, heads, dim]."""
    bs = layout.block_size
    rows = [cache[:, :, block_ids[t // bs], t % bs] for t in range(num_tokens)]
    return torch.stack(rows, dim=2)


def _sender_main(cmd_q, out_q, backend, layout, num_blocks, seed, sender_kwargs) -> None:
    torch.set_num_threads(1)
    shared = None
    if backend == ZERO_COPY:   # the cache in shared memory, read in place by the receiver
        shared = SharedKVCache(layout.cache_shape(num_blocks), layout.torch_dtype)
        shared.tensor.copy_(make_cache(layout, num_blocks, seed))
        cache, backend = shared.tensor, "shm"
        sender_kwargs = {"checksum": False, "shared_cache": shared, **sender_kwargs}
    else:
        cache = make_cache(layout, num_blocks, seed)
    blocks = BlockManager(num_blocks, layout.block_size)
    sender = ChannelSender(cache, layout, backend, **sender_kwargs)
    out_q.put(("endpoint", sender.endpoint))
    stop_at = time.monotonic() + CHILD_MAX_SECONDS
    try:
        while time.monotonic() < stop_at:
            try:
                cmd = cmd_q.get(timeout=0.001)
            except queue.Empty:
                cmd = None
            if cmd is not None and cmd[0] == "stop":
                break
            now = time.monotonic()
            if cmd is not None and cmd[0] == "offer":
                _, req_id, num_tokens, ttl = cmd
                if not blocks.can_allocate(num_tokens):
                    out_q.put(("full", req_id))
                else:
                    ids = blocks.allocate(num_tokens)
                    out_q.put(("offer", sender.offer(req_id, ids, num_tokens, now, ttl), ids))
            elif cmd is not None and cmd[0] == "abort":
                end = sender.abort(cmd[1], now)
                if end is not None:
                    blocks.free(end.block_ids)
                    out_q.put(("end", end))
            for end in sender.poll(now):
                blocks.free(end.block_ids)
                out_q.put(("end", end))
    finally:
        out_q.put(("final", blocks.num_free_blocks, blocks.num_blocks, sender.leases.live()))
        sender.close()
        if shared is not None:
            cache = None
            shared.close()


@dataclass
class Pair:
    """A sender child and a receiver here, wired up."""

    backend: str
    layout: KVLayout
    dst_layout: KVLayout
    num_blocks: int = 256
    seed: int = 0
    sender_kwargs: dict = field(default_factory=dict)
    receiver_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.cmd_q, self.out_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_sender_main, daemon=True, args=(
            self.cmd_q, self.out_q, self.backend, self.layout, self.num_blocks, self.seed, self.sender_kwargs))
        self.proc.start()
        kind, endpoint = self.out_q.get(timeout=120)
        assert kind == "endpoint" and endpoint.startswith("tcp://127.0.0.1:")
        self.src_cache = make_cache(self.layout, self.num_blocks, self.seed)   # the child's, rebuilt
        self.dst_cache = torch.zeros(self.dst_layout.cache_shape(self.num_blocks), dtype=self.dst_layout.torch_dtype)
        self.dst_blocks = BlockManager(self.num_blocks, self.dst_layout.block_size)
        backend = "shm" if self.backend == ZERO_COPY else self.backend
        self.receiver = ChannelReceiver(self.dst_cache, self.dst_layout, backend, **self.receiver_kwargs)
        self.ends: dict[str, LeaseEnd] = {}
        self.results: dict[str, TransferResult] = {}

    def offer(self, req_id: str, num_tokens: int, ttl_s: float | None = None) -> tuple[TransferOffer, list[int]]:
        self.cmd_q.put(("offer", req_id, num_tokens, ttl_s))
        while True:
            event = self._next_event(timeout=30)
            if event[0] == "offer":
                return event[1], event[2]
            if event[0] == "full":
                raise RuntimeError("sender cache full")

    def pull(self, offer: TransferOffer) -> list[int]:
        ids = self.dst_blocks.allocate(offer.num_tokens)
        self.receiver.pull(offer, ids)
        return ids

    def drive(self, until, timeout_s: float = 30.0) -> None:
        """Poll both sides until `until()` is true (bounded)."""
        stop_at = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > stop_at:
                raise TimeoutError(f"not done after {timeout_s}s: {len(self.results)} results, {len(self.ends)} ends")
            for r in self.receiver.poll():
                self.results[r.transfer_id] = r
            try:
                self._next_event(timeout=0.002)
            except queue.Empty:
                pass

    def _next_event(self, timeout: float):
        event = self.out_q.get(timeout=timeout)
        if event[0] == "end":
            self.ends[event[1].transfer_id] = event[1]
        return event

    def received(self, offer: TransferOffer, dst_ids) -> torch.Tensor:
        return sequence_kv(self.dst_cache, self.dst_layout, dst_ids, offer.num_tokens)

    def sent(self, offer: TransferOffer, src_ids) -> torch.Tensor:
        return sequence_kv(self.src_cache, self.layout, src_ids, offer.num_tokens)

    def finish_request(self, offer: TransferOffer, dst_ids) -> None:
        """The decode side is done with a request (or its transfer failed): free its blocks."""
        self.dst_blocks.free(dst_ids)

    def close(self) -> tuple[int, int, int]:
        """Stop the child; returns its (free blocks, total blocks, live leases)."""
        self.receiver.close()
        self.cmd_q.put(("stop",))
        while True:
            event = self._next_event(timeout=60)
            if event[0] == "final":
                self.proc.join(timeout=30)
                return event[1], event[2], event[3]


def ok(result: TransferResult) -> bool:
    return result.status is TransferStatus.DONE


FAULTS_NONE = FaultSpec()
