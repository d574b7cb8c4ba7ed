"""Where a rank's KV sits, and conversion between parallelism plans and block sizes.

A rank's cache holds a contiguous range of layers (pipeline stage) and of KV
heads (tensor-parallel rank) of the model. On the wire a sequence's KV is the
canonical token-major tensor [local_layers, 2 (K, V), num_tokens, local_heads,
head_dim]: it carries no block size, so sender and receiver may page
differently. A receiver unpacks each source rank's wire into the overlap of
(layers x heads) it shares with its own layout; `covers` tells it when the
sources it has seen supply everything.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

import pdkernels
from engine.block_manager import blocks_needed
from engine.parallel import split_range

BlockIds = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class KVLayout:
    num_layers: int          # model total
    layer_start: int         # this rank holds layers [layer_start, layer_end)
    layer_end: int
    num_kv_heads: int        # model total
    head_start: int          # this rank holds KV heads [head_start, head_end)
    head_end: int
    head_dim: int
    block_size: int
    dtype: str               # torch dtype name, e.g. "bfloat16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "layer_start", "layer_end", "num_kv_heads", "head_start", "head_end",
                     "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"KVLayout.{name} must be an int, got {value!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.layer_start < self.layer_end <= self.num_layers:
            raise ValueError(f"KVLayout.layer_start/layer_end: need 0 <= {self.layer_start} < {self.layer_end}"
                             f" <= num_layers={self.num_layers}")
        if not 0 <= self.head_start < self.head_end <= self.num_kv_heads:
            raise ValueError(f"KVLayout.head_start/head_end: need 0 <= {self.head_start} < {self.head_end}"
                             f" <= num_kv_heads={self.num_kv_heads}")
        dtype = getattr(torch, str(self.dtype).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"KVLayout.dtype must name a torch dtype, got {self.dtype!r}")
        # One spelling per dtype ("float" -> "float32"), so layouts compare equal across ranks.
        object.__setattr__(self, "dtype", str(dtype).removeprefix("torch."))

    @property
    def local_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def local_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """Wire bytes per token of this rank's share (K and V, all local layers and heads)."""
        itemsize = self.torch_dtype.itemsize
        return self.local_layers * 2 * self.local_heads * self.head_dim * itemsize

    def wire_shape(self, num_tokens: int) -> tuple[int, ...]:
        return (self.local_layers, 2, num_tokens, self.local_heads, self.head_dim)

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.local_layers, 2, num_blocks, self.block_size, self.local_heads, self.head_dim)

    @classmethod
    def from_cache(cls, cache_data: torch.Tensor, *, num_layers: int, num_kv_heads: int,
                   layer_start: int = 0, head_start: int = 0) -> KVLayout:
        """The layout of a rank's cache tensor, given where its shard starts in the model."""
        # cache_data: [local_layers, 2, num_blocks, block_size, local_heads, head_dim]
        if cache_data.dim() != 6 or cache_data.shape[1] != 2:
            raise ValueError(f"cache_data must be [layers, 2, blocks, block_size, heads, head_dim], "
                             f"got {tuple(cache_data.shape)}")
        local_layers, _, _, block_size, local_heads, head_dim = cache_data.shape
        return cls(num_layers, layer_start, layer_start + local_layers, num_kv_heads, head_start,
                   head_start + local_heads, head_dim, block_size, str(cache_data.dtype).removeprefix("torch."))

    @classmethod
    def for_rank(cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: str, *,
                 tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> KVLayout:
        """A rank's share under the engine's own split rule (`engine.parallel.split_range`: earlier
        ranks take the remainder, 3 KV heads over tp 2 -> 2 + 1), so it is the cache that rank holds."""
        layers = _share(num_layers, pp_rank, pp_size, "pp")
        heads = _share(num_kv_heads, tp_rank, tp_size, "tp")
        return cls(num_layers, layers.start, layers.stop, num_kv_heads, heads.start, heads.stop,
                   head_dim, block_size, dtype)


def _share(total: int, rank: int, size: int, what: str) -> range:
    # ParallelPlanError is a ValueError; the message names the plan field at fault
    return split_range(total, rank, size, f"{what}_rank={rank} of {what}_size={size}")


def check_compatible(src: KVLayout, dst: KVLayout) -> None:
    """Raise ValueError unless both layouts are shards of the same model's KV, in one dtype."""
    for name in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
        if getattr(src, name) != getattr(dst, name):
            raise ValueError(f"KV layouts disagree on {name}: source {getattr(src, name)!r}, "
                             f"destination {getattr(dst, name)!r}")


def overlap(src: KVLayout, dst: KVLayout) -> tuple[range, range] | None:
    """The (layers, heads) held by both, in model coordinates; None when they share nothing."""
    check_compatible(src, dst)
    layers = range(max(src.layer_start, dst.layer_start), min(src.layer_end, dst.layer_end))
    heads = range(max(src.head_start, dst.head_start), min(src.head_end, dst.head_end))
    return (layers, heads) if len(layers) and len(heads) else None


def covers(sources: Sequence[KVLayout], dst: KVLayout) -> bool:
    """Whether the sources together hold every (layer, head) of dst (they may overlap)."""
    boxes = [box for box in (overlap(src, dst) for src in sources) if box is not None]
    # Cut dst at every box edge; each resulting cell is either wholly inside a box or not.
    layer_cuts = sorted({dst.layer_start, dst.layer_end, *(c for ls, _ in boxes for c in (ls.start, ls.stop))})
    head_cuts = sorted({dst.head_start, dst.head_end, *(c for _, hs in boxes for c in (hs.start, hs.stop))})
    return all(any(layer in ls and head in hs for ls, hs in boxes)
               for layer in layer_cuts[:-1] for head in head_cuts[:-1])


def _check_cache(cache_data: torch.Tensor, layout: KVLayout, what: str) -> None:
    # cache_data: [local_layers, 2, num_blocks, block_size, local_heads, head_dim]
    want = layout.cache_shape(cache_data.shape[2] if cache_data.dim() == 6 else -1)
    if tuple(cache_data.shape) != want or cache_data.dtype != layout.torch_dtype:
        raise ValueError(f"{what} cache is {tuple(cache_data.shape)} {cache_data.dtype}, layout wants "
                         f"{want} torch.{layout.dtype}")
    if not cache_data.is_contiguous():
        raise ValueError(f"{what} cache must be contiguous (blocks are copied through a flat view)")


def _block_index(block_ids: BlockIds, num_tokens: int, layout: KVLayout, num_blocks: int,
                 device: torch.device) -> torch.Tensor:
    """The first ceil(num_tokens / block_size) block ids as a validated int64 tensor on `device`."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    needed = blocks_needed(num_tokens, layout.block_size)
    if len(block_ids) < needed:
        raise ValueError(f"{num_tokens} tokens need {needed} blocks of {layout.block_size}, "
                         f"got {len(block_ids)} block ids")
    ids = torch.as_tensor(block_ids, dtype=torch.int64)[:needed]
    if needed and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block ids must lie in [0, {num_blocks}), got {ids.tolist()}")
    if torch.unique(ids).numel() != needed:
        raise ValueError(f"block ids must be distinct, got {ids.tolist()}")
    return ids.to(device).contiguous()


def pack(cache_data: torch.Tensor, layout: KVLayout, block_ids: BlockIds, num_tokens: int,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """A sequence's KV from this rank's paged cache as a contiguous wire tensor.

    `out` lets a sender reuse one staging buffer: on CPU the page faults of a fresh 50 MB
    tensor cost several times the block copy itself.
    """
    # cache_data: [local_layers, 2, num_blocks, block_size, local_heads, head_dim]
    # -> wire: [local_layers, 2, num_tokens, local_heads, head_dim]
    _check_cache(cache_data, layout, "source")
    ids = _block_index(block_ids, num_tokens, layout, cache_data.shape[2], cache_data.device)
    shape = layout.wire_shape(num_tokens)
    if out is None:
        out = torch.empty(shape, dtype=cache_data.dtype, device=cache_data.device)
    elif tuple(out.shape) != shape or out.dtype != cache_data.dtype or out.device != cache_data.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {cache_data.dtype} on {cache_data.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    bs, full = layout.block_size, num_tokens // layout.block_size
    if full:
        # Whole blocks go straight into the wire: its first full * bs tokens, viewed as blocks.
        slabs = cache_data.view(layout.local_layers * 2, cache_data.shape[2], -1)
        pdkernels.gather_blocks(slabs, ids[:full], out[:, :, :full * bs].view(layout.local_layers * 2, full, -1))
    if full * bs < num_tokens:
        last = cache_data.index_select(2, ids[full:])  # [local_layers, 2, 1, block_size, heads, head_dim]
        out[:, :, full * bs:] = last[:, :, 0, :num_tokens - full * bs]
    return out


def pack_layer(cache_data: torch.Tensor, layout: KVLayout, layer_index_local: int, block_ids: BlockIds,
               num_tokens: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One local layer of a sequence's KV, for streaming layer by layer while prefill runs."""
    # cache_data: [local_layers, 2, num_blocks, ...] -> [2, num_tokens, local_heads, head_dim]
    if not 0 <= layer_index_local < layout.local_layers:
        raise ValueError(f"layer_index_local={layer_index_local} outside [0, {layout.local_layers})")
    layer = layout_of_layer(layout, layer_index_local)
    wire = pack(cache_data[layer_index_local:layer_index_local + 1], layer, block_ids, num_tokens,
                None if out is None else out.unsqueeze(0))
    return wire[0]


def layout_of_layer(layout: KVLayout, layer_index_local: int) -> KVLayout:
    """The layout of a one-layer slice of this rank's cache (what a pack_layer wire came from)."""
    start = layout.layer_start + layer_index_local
    return KVLayout(layout.num_layers, start, start + 1, layout.num_kv_heads, layout.head_start,
                    layout.head_end, layout.head_dim, layout.block_size, layout.dtype)


def unpack_into(cache_data: torch.Tensor, dst_layout: KVLayout, dst_block_ids: BlockIds, wire: torch.Tensor,
                src_layout: KVLayout) -> None:
    """Write the part of a source rank's wire that this rank holds into its cache blocks, in place.

    Only (overlapping layers x overlapping heads) x the sequence's token slots are written:
    other heads, other blocks and the unused tail of a partial last block keep their bytes, so
    several source ranks may unpack into one destination, in any order or concurrently.
    """
    # cache_data: [dst local_layers, 2, num_blocks, dst block_size, dst local_heads, head_dim]
    # wire: [src local_layers, 2, num_tokens, src local_heads, head_dim]
    check_compatible(src_layout, dst_layout)
    _check_cache(cache_data, dst_layout, "destination")
    if wire.dim() != 5 or tuple(wire.shape) != src_layout.wire_shape(wire.shape[2]):
        raise ValueError(f"wire is {tuple(wire.shape)}, source layout wants {src_layout.wire_shape(-1)}")
    if wire.dtype != src_layout.torch_dtype:
        raise ValueError(f"wire is {wire.dtype}, source layout says torch.{src_layout.dtype}")
    num_tokens = wire.shape[2]
    ids = _block_index(dst_block_ids, num_tokens, dst_layout, cache_data.shape[2], cache_data.device)
    box = overlap(src_layout, dst_layout)
    if box is None or num_tokens == 0:
        return
    layers, heads = box
    part = wire[layers.start - src_layout.layer_start:layers.stop - src_layout.layer_start, :, :,
                heads.start - src_layout.head_start:heads.stop - src_layout.head_start]
    part = part.to(cache_data.device)  # [ov_layers, 2, num_tokens, ov_heads, head_dim]
    dst = cache_data[layers.start - dst_layout.layer_start:layers.stop - dst_layout.layer_start]
    bs, num_blocks = dst_layout.block_size, cache_data.shape[2]
    full = num_tokens // bs if len(heads) == dst_layout.local_heads else 0
    if full:
        # Whole blocks of all this rank's heads: one block copy straight from the wire.
        buffer = part[:, :, :full * bs].reshape(len(layers) * 2, full, -1)  # a view unless moved
        pdkernels.scatter_blocks(buffer, dst.view(len(layers) * 2, num_blocks, -1), ids[:full])
    if full * bs < num_tokens:
        # Partial heads or a partial last block: write token slots one by one (one index_copy_).
        slots = (ids[:, None] * bs + torch.arange(bs, device=ids.device)).flatten()[full * bs:num_tokens]
        tokens = dst.view(len(layers), 2, num_blocks * bs, dst_layout.local_heads, dst_layout.head_dim)
        tokens = tokens[:, :, :, heads.start - dst_layout.head_start:heads.stop - dst_layout.head_start]
        tokens.index_copy_(2, slots, part[:, :, full * bs:])


def unpack_layer_into(cache_data: torch.Tensor, dst_layout: KVLayout, dst_block_ids: BlockIds,
                      layer_wire: torch.Tensor, src_layout: KVLayout, layer: int) -> None:
    """unpack_into for one layer's wire (from pack_layer); `layer` is in model coordinates."""
    # layer_wire: [2, num_tokens, src local_heads, head_dim]
    if not src_layout.layer_start <= layer < src_layout.layer_end:
        raise ValueError(f"layer {layer} is not held by the source (layers "
                         f"[{src_layout.layer_start}, {src_layout.layer_end}))")
    src = layout_of_layer(src_layout, layer - src_layout.layer_start)
    unpack_into(cache_data, dst_layout, dst_block_ids, layer_wire.unsqueeze(0), src)
