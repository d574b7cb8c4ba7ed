"""Moving KV caches from prefill to decode workers.

The interface is in `base` (KVSender / KVReceiver, TransferOffer); `lease`
holds the prefill side's ownership bookkeeping, `layout` the canonical wire
form and the conversion between parallelism plans, `codec` int8 compression
and checksums. Backends (`backends.BACKENDS`), all over `channel` (a zmq
control channel with a data path from `data_paths`): `zmq` (bytes in the zmq
frames), `shm` (a shared-memory segment, or zero copy out of the sender's
cache), `torch_dist` (gloo / NCCL point-to-point in a per-pair process group)
and `ray` (Ray's object store; both processes connected to one Ray cluster).
`make_sender` / `make_receiver` (`factory`) pick one by name.

The names below are resolved lazily, so that `kv_transfer.backends` can be
imported (by the config) without torch or zmq.
"""
from engine.lazy_exports import lazy_exports

_EXPORTS = {
    "BACKENDS": "kv_transfer.backends",
    "KVLayout": "kv_transfer.layout",
    "KVReceiver": "kv_transfer.base", "KVSender": "kv_transfer.base", "TransferError": "kv_transfer.base",
    "TransferOffer": "kv_transfer.base", "TransferResult": "kv_transfer.base",
    "TransferStatus": "kv_transfer.base",
    "make_receiver": "kv_transfer.factory", "make_sender": "kv_transfer.factory",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
