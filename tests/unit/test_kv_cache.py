"""The paged KV cache's allocation: shape checks, and every page mapped at start-up."""
from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError
from engine.kv_cache import KVCache
from kv_transfer.shared_cache import SharedKVCache


def _rss_shmem_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    pytest.skip("no RssShmem in /proc/self/status (not Linux)")


def test_a_cache_in_shared_memory_is_mapped_when_made_not_on_first_write():
    # a new segment is zero but unmapped; prefills used to fault in their blocks one by one
    shared = []

    def allocate(shape, dtype):
        shared.append(SharedKVCache(shape, dtype))
        return shared[-1].tensor

    before = _rss_shmem_kb()
    cache = KVCache(num_layers=4, num_blocks=512, block_size=16, num_kv_heads=2, head_dim=64,
                    dtype=torch.bfloat16, allocate=allocate)
    grown_kb = _rss_shmem_kb() - before
    try:
        assert cache.nbytes == 4 * 2 * 512 * 16 * 2 * 64 * 2          # 16 MiB
        assert grown_kb * 1024 >= 0.95 * cache.nbytes
        assert not cache.data.any()                                     # still zero-filled
    finally:
        cache = None
        shared[0].close()


def test_an_allocator_returning_the_wrong_tensor_is_a_config_error():
    with pytest.raises(ConfigError, match="allocator returned"):
        KVCache(2, 4, 16, 2, 8, torch.float32, allocate=lambda shape, dtype: torch.zeros(3, dtype=dtype))
