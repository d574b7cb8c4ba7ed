"""Layer-wise streaming: a transfer offered before its prefill ran, sent layer by layer.

The prefill worker offers a request's blocks (`offer(..., stream=True)`) just
before the forward pass, and the model's per-layer hook calls
`sender.layers_ready(ids, i + 1, now)` once layer i has stored its K/V. A
receiver that pulled early (the offer reached it while the prefill ran) gets
one DATA message per ready layer, with `"layers": [first, stop)` in its
header, and lands each one as it comes; when every layer of the source rank
is in, the pull is DONE. So by the end of the prefill only the last layer
is left to move, instead of the whole sequence.

  receiver -> sender   PULL   {transfer_id, attempt}      (any time after the offer)
  sender -> receiver   DATA   {..., layers: [a, b), payload, checksums} + frames   (zmq)
                       DATA   {..., layers: [a, b), zero_copy: {...}}                 (shm zero copy)

The zmq backend sends whole (non-streamed) transfers the same way, every layer
ready from the start, in chunks of whole layers of about 4 MB: packing the next
chunk, the wire and unpacking the last one then overlap.

A retried attempt (corruption, timeout) gets every ready layer again, from 0;
a layer's packed bytes are kept in the transfer's staging buffer, so it is
packed once. Only data paths whose bytes ride in (or are named by) the DATA
message can stream: zmq frames and the zero-copy shm cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kv_transfer import codec, layout as kvl


@dataclass
class LayerStream:
    """A streamed transfer on the sender side."""

    num_layers: int              # the source rank's local layers
    ready: int = 0               # layers [0, ready) hold their KV
    peer: bytes | None = None    # the receiver that pulled (its ROUTER identity)
    attempt: int = 0             # the attempt being served
    sent: int = 0                # layers [0, sent) went to `peer` in `attempt`
    packed: int = 0              # layers [0, packed) are in the staging buffer
    inline: bool = True          # `peer` takes the bytes in zmq frames; False: it copies them
                                 # out of the sender's shared cache (zero copy, same node)
    data_id: bytes | None = None # the frames go to this id on the sender's data socket

    def mark_ready(self, num_layers: int | None) -> None:
        n = self.num_layers if num_layers is None else min(int(num_layers), self.num_layers)
        self.ready = max(self.ready, n)

    def serve(self, peer: bytes, attempt: int, inline: bool = True, data_id: bytes | None = None) -> None:
        """A (re)started pull: every ready layer goes out again, for this attempt."""
        self.peer, self.attempt, self.sent, self.inline, self.data_id = peer, attempt, 0, inline, data_id


def layers_layout(layout: kvl.KVLayout, first: int, stop: int) -> kvl.KVLayout:
    """The layout of local layers [first, stop) of a rank's cache (what a chunk's wire came from)."""
    return dataclasses.replace(layout, layer_start=layout.layer_start + first, layer_end=layout.layer_start + stop)


def layers_per_message(layout: kvl.KVLayout, num_tokens: int, chunk_bytes: int) -> int:
    """Whole layers per DATA message so that each carries about `chunk_bytes`: small enough
    that packing, the wire and unpacking overlap, big enough that headers stay cheap."""
    layer_bytes = max(1, num_tokens * layout.bytes_per_token // layout.local_layers)
    return max(1, min(layout.local_layers, chunk_bytes // layer_bytes))


def chunk_payload(stream: LayerStream, cache: torch.Tensor, layout: kvl.KVLayout, block_ids, num_tokens: int,
                  staging: torch.Tensor, first: int, stop: int, compress: str | None) -> list[torch.Tensor]:
    """Local layers [first, stop) of a sequence as wire tensors ([layers, 2, tokens, heads,
    head_dim], or int8 codes and scales), packed into the transfer's staging wire once."""
    # staging: [local_layers, 2, num_tokens, local_heads, head_dim]
    if stop > stream.packed:
        a = stream.packed
        pack_runs(cache[a:stop], block_ids, num_tokens, staging[a:stop])
        stream.packed = stop
    wire = staging[first:stop]
    return list(codec.quantize_int8(wire)) if compress == "int8" else [wire]


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(index in ids, first id, length) of each run of consecutive ids."""
    runs, i = [], 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        runs.append((i, ids[i], j - i))
        i = j
    return runs


def pack_runs(cache: torch.Tensor, block_ids, num_tokens: int, out: torch.Tensor) -> None:
    """`kv_transfer.layout.pack` for a cache slice and a wire of the same layers and heads,
    copying each run of consecutive blocks as one strided copy (close to memcpy speed,
    where gathering block by block with index_select runs at about half of it)."""
    # cache: [layers, 2, num_blocks, block_size, heads, head_dim] -> out: [layers, 2, num_tokens, heads, head_dim]
    bs = cache.shape[3]
    full, tail = divmod(num_tokens, bs)
    ids = [int(b) for b in block_ids[:full + (1 if tail else 0)]]
    blocks = out[:, :, :full * bs].view(*out.shape[:2], full, bs, *out.shape[3:])
    for i, first, k in _runs(ids[:full]):
        blocks[:, :, i:i + k] = cache[:, :, first:first + k]
    if tail:
        out[:, :, full * bs:] = cache[:, :, ids[full], :tail]


def unpack_runs(wire: torch.Tensor, cache: torch.Tensor, block_ids) -> None:
    """The inverse of pack_runs: a contiguous wire into a cache slice of the same layers and
    heads (the tail of a partial last block keeps its bytes)."""
    # wire: [layers, 2, num_tokens, heads, head_dim] -> cache: [layers, 2, num_blocks, block_size, heads, head_dim]
    bs, num_tokens = cache.shape[3], wire.shape[2]
    full, tail = divmod(num_tokens, bs)
    ids = [int(b) for b in block_ids[:full + (1 if tail else 0)]]
    blocks = wire[:, :, :full * bs].reshape(*wire.shape[:2], full, bs, *wire.shape[3:])
    for i, first, k in _runs(ids[:full]):
        cache[:, :, first:first + k] = blocks[:, :, i:i + k]
    if tail:
        cache[:, :, ids[full], :tail] = wire[:, :, full * bs:]


def layer_range(head: dict, num_layers: int) -> range:
    """The local layers a streamed DATA message carries; ValueError when the header is bad."""
    span = head.get("layers")
    if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
            and 0 <= span[0] < span[1] <= num_layers):
        raise ValueError(f"bad layer range {span!r} for a source of {num_layers} layers")
    return range(span[0], span[1])


@dataclass
class LayerProgress:
    """A streamed pull on the receiver side: which local layers of the source landed."""

    num_layers: int
    landed: set[int] = field(default_factory=set)
    nbytes: int = 0

    def add(self, layers: range, nbytes: int) -> bool:
        """Record landed layers; True once every layer is in."""
        self.landed.update(layers)
        self.nbytes += nbytes
        return len(self.landed) >= self.num_layers

    def reset(self) -> None:
        self.landed.clear()
        self.nbytes = 0
