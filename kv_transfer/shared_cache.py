"""A worker's KV cache in POSIX shared memory, read in place by same-node receivers.

With the prefill worker's cache in a named segment, the `shm` backend moves a
request's KV with one copy: the decode worker maps the segment read-only once
and copies the leased blocks straight into its own blocks. The lease keeps
the source blocks from being reused while that copy runs.
"""
from __future__ import annotations

import itertools
import math
import os
from collections import OrderedDict
from multiprocessing import shared_memory

import torch

from kv_transfer.data_path import attach_segment, dtype_name, tensor_view


_names = itertools.count()


def _layout_bytes(shape, dtype: torch.dtype) -> int:
    """Bytes of the cache part of the segment; the block generations follow, 8-byte aligned."""
    return -(-math.prod(shape) * dtype.itemsize // 8) * 8


class SharedKVCache:
    """A zero-filled cache tensor [layers, 2, blocks, ...] in a shared-memory segment this
    process owns, followed by one int64 generation per block.

    The owner bumps a block's generation whenever the lease holding it ends; a
    reader that finds the generations unchanged after its copy knows the blocks
    were not released (nor reused) while it read them.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, name: str | None = None) -> None:
        """`name` defaults to pdkv-<pid>-cache-<n>: whoever cleans up after a dead process finds
        its segments by its pid (cluster.instances.reclaim_shared_memory)."""
        if name is None:
            name = f"pdkv-{os.getpid()}-cache-{next(_names)}"
        cache_bytes = _layout_bytes(shape, dtype)
        num_blocks = shape[2]
        self._seg = shared_memory.SharedMemory(create=True, size=cache_bytes + 8 * num_blocks, name=name)
        self.shape, self.dtype = tuple(shape), dtype
        self.tensor = tensor_view(self._seg.buf, dtype_name(dtype), list(shape), 0)
        self.generations = tensor_view(self._seg.buf, "int64", [num_blocks], cache_bytes)

    def bump(self, block_ids) -> None:
        """The lease over these blocks ended: readers of the old contents must fail."""
        self.generations[list(block_ids)] += 1

    @property
    def name(self) -> str:
        return self._seg.name

    def close(self) -> None:
        self.tensor = self.generations = None    # views must go before the mapping
        self._seg.close()
        self._seg.unlink()


class AttachedCaches:
    """Read-only views of other processes' shared caches, mapped once per segment; at most
    `max_maps` stay mapped (least recently used unmapped first: a pool of prefill workers
    that comes and goes must not pile up mappings of caches long gone)."""

    def __init__(self, max_maps: int = 64) -> None:
        self.max_maps = max_maps
        self._maps: OrderedDict[str, object] = OrderedDict()
        self._views: dict[str, tuple] = {}   # name -> ((shape, dtype), cache, generations)

    def view(self, name: str, shape: list[int], dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cache, generations) of another process's SharedKVCache."""
        mapping = self._maps.get(name)
        if mapping is not None:
            self._maps.move_to_end(name)
        else:
            self._evict()
            mapping = self._maps[name] = attach_segment(name)
        key = (tuple(shape), dtype)
        views = self._views.get(name)
        if views is None or views[0] != key:   # kept: making them costs ~0.1 ms a transfer
            cache = tensor_view(mapping, dtype, shape, 0)
            gens = tensor_view(mapping, "int64", [shape[2]], _layout_bytes(shape, cache.dtype))
            views = self._views[name] = (key, cache, gens)
        return views[1], views[2]

    def __len__(self) -> int:
        return len(self._maps)

    def release(self, name: str) -> bool:
        """Unmap one segment now (its owner died: the memory is freed once no process maps
        it). False when a view of it is still alive elsewhere; it stays mapped until then."""
        self._views.pop(name, None)   # our own views must go before the unmap
        mapping = self._maps.pop(name, None)
        if mapping is None:
            return True
        try:
            mapping.close()
        except BufferError:
            self._maps[name] = mapping
            return False
        return True

    def _evict(self) -> None:
        for name in list(self._maps):
            if len(self._maps) < self.max_maps:
                return
            self._views.pop(name, None)   # our own views must go before the unmap
            try:
                self._maps[name].close()
            except BufferError:
                continue   # a view of it is still alive; it stays mapped for now
            del self._maps[name]

    def close(self) -> None:
        self._views.clear()
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:
                pass   # a view is still alive; the mapping goes with the process
        self._maps.clear()


def copy_block_runs(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> None:
    """dst[:, :, dst_ids[i]] = src[:, :, src_ids[i]] for caches [layers, 2, blocks, ...].

    Consecutive ids on both sides are copied as one run: a run of 16 blocks
    copies at ~90% of memcpy on CPU, single blocks at ~35%.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    i = 0
    while i < len(src_ids):
        j = i + 1
        while j < len(src_ids) and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        s, d, n = src_ids[i], dst_ids[i], j - i
        dst[:, :, d:d + n].copy_(src[:, :, s:s + n])
        i = j
