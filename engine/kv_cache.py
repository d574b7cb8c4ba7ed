"""The paged KV cache of one worker: one preallocated tensor, sized from a budget."""
from __future__ import annotations

import torch

from engine.errors import ConfigError


PAGE_BYTES = 4096


def touch_pages(t: torch.Tensor) -> None:
    """Write a zero into every page of a zero-filled CPU tensor, so the kernel maps them all now.

    A large zero-filled allocation (calloc, a new shared-memory segment) is mapped lazily: each
    page faults the first time it is written. Blocks are handed out first-in first-out, so until
    every block had been used once, each prefill paid for the faults of its new blocks: in a
    worker whose cache is in shared memory, a 512-token prefill ran 1.22x slower over its first
    ~45 prompts than after them (0.5 GB cache). Mapped at start-up instead: ~0.1 s per GB."""
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return
    flat = t.view(-1)
    flat[::max(1, PAGE_BYTES // t.element_size())] = 0


class KVCache:
    """[layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim], zero-filled.

    Zeros matter: padded slots of a block are read (and masked) by the decode
    kernel, and uninitialised memory could hold NaNs that survive a zero weight.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 allocate=torch.zeros) -> None:
        """`allocate(shape, dtype=)` makes the zero-filled tensor; a worker whose KV is read
        in place by another process passes one that puts it in shared memory."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = allocate(shape, dtype=dtype)
        if tuple(self.data.shape) != shape or self.data.dtype != dtype:
            raise ConfigError(f"KV cache allocator returned {tuple(self.data.shape)} {self.data.dtype}, "
                              f"expected {shape} {dtype}")
        touch_pages(self.data)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element = dtype.itemsize
        return num_layers * 2 * block_size * num_kv_heads * head_dim * element

    @classmethod
    def num_blocks_for_budget(cls, budget_bytes: int, num_layers: int, block_size: int,
                              num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        per_block = cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        n = budget_bytes // per_block
        if n < 1:
            raise ConfigError(f"kv_cache_memory_gb={budget_bytes / 2**30:.4f} holds no block "
                              f"(one block is {per_block} bytes)")
        return n

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.data.shape[0])]

    def slabs(self) -> torch.Tensor:
        """The whole cache as [layers * 2, num_blocks, block_numel], for block copies."""
        return self.data.view(self.data.shape[0] * 2, self.num_blocks, -1)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
