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
  sender -> receiver   DATA   {..., layers: [l, l + 1], payload, checksums} + frames   (zmq)
                       DATA   {..., layers: [a, b), zero_copy: {...}}                 (shm zero copy)

A retried attempt (corruption, timeout) gets every ready layer again, from 0;
a layer's packed bytes are kept in the transfer's staging buffer, so it is
packed once. Only data paths whose bytes ride in (or are named by) the DATA
message can stream: zmq frames and the zero-copy shm cache.
"""
from __future__ import annotations

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

    def mark_ready(self, num_layers: int | None) -> None:
        n = self.num_layers if num_layers is None else min(int(num_layers), self.num_layers)
        self.ready = max(self.ready, n)

    def serve(self, peer: bytes, attempt: int) -> None:
        """A (re)started pull: every ready layer goes out again, for this attempt."""
        self.peer, self.attempt, self.sent = peer, attempt, 0


def layer_payload(stream: LayerStream, cache: torch.Tensor, layout: kvl.KVLayout, block_ids, num_tokens: int,
                  staging: torch.Tensor, layer: int, compress: str | None) -> list[torch.Tensor]:
    """Local layer `layer` of a sequence as wire tensors ([2, tokens, heads, head_dim], or int8
    codes and scales), packed into its slice of the transfer's staging wire once."""
    # staging: [local_layers, 2, num_tokens, local_heads, head_dim]
    if layer >= stream.packed:
        kvl.pack_layer(cache, layout, layer, block_ids, num_tokens, out=staging[layer])
        stream.packed = layer + 1
    wire = staging[layer]
    return list(codec.quantize_int8(wire)) if compress == "int8" else [wire]


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
