"""`make_sender` / `make_receiver`: a transfer backend by name, over the zmq control channel."""
from __future__ import annotations

from kv_transfer.backends import BACKENDS
from kv_transfer.base import KVReceiver, KVSender, TransferError
from kv_transfer.channel import ChannelSender
from kv_transfer.channel_receiver import ChannelReceiver
from kv_transfer.layout import KVLayout


def make_sender(backend: str, cache_data, layout: KVLayout, **kwargs) -> KVSender:
    _check(backend)
    return ChannelSender(cache_data, layout, backend, **kwargs)


def make_receiver(backend: str, cache_data, layout: KVLayout, **kwargs) -> KVReceiver:
    _check(backend)
    return ChannelReceiver(cache_data, layout, backend, **kwargs)


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise TransferError(f"kv_transfer backend {backend!r} is not one of {BACKENDS}")
