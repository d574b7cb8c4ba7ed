"""Moving KV caches from prefill to decode workers.

The interface is in `base` (KVSender / KVReceiver, TransferOffer); `lease`
holds the prefill side's ownership bookkeeping, `layout` the canonical wire
form and the conversion between parallelism plans, `codec` int8 compression
and checksums. Backends, all over `channel` (a zmq control channel with a
pluggable data path): `zmq` (bytes in the zmq frames), `shm` (a shared-memory
segment, or zero copy out of the sender's cache), `torch_dist` (gloo / NCCL
point-to-point in a per-pair process group) and `ray` (Ray's object store; both
processes connected to one Ray cluster). `make_sender` / `make_receiver` pick
one by name.
"""
from kv_transfer.base import (KVReceiver, KVSender, TransferError, TransferOffer, TransferResult,
                              TransferStatus)
from kv_transfer.layout import KVLayout

BACKENDS = ("zmq", "shm", "torch_dist", "ray")


def make_sender(backend: str, cache_data, layout: KVLayout, **kwargs) -> KVSender:
    if backend not in BACKENDS:
        raise TransferError(f"kv_transfer backend {backend!r} is not one of {BACKENDS}")
    from kv_transfer.channel import ChannelSender
    return ChannelSender(cache_data, layout, backend, **kwargs)


def make_receiver(backend: str, cache_data, layout: KVLayout, **kwargs) -> KVReceiver:
    if backend not in BACKENDS:
        raise TransferError(f"kv_transfer backend {backend!r} is not one of {BACKENDS}")
    from kv_transfer.channel_receiver import ChannelReceiver
    return ChannelReceiver(cache_data, layout, backend, **kwargs)


__all__ = ["BACKENDS", "KVLayout", "KVReceiver", "KVSender", "TransferError", "TransferOffer",
           "TransferResult", "TransferStatus", "make_receiver", "make_sender"]
