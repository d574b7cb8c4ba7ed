"""Paged KV-cache bookkeeping: which blocks are free, who holds which, which prefixes are cached.

Pure Python (no torch, no clocks). Check, then commit: `can_allocate` and
`can_append` have no side effects; `allocate` and `append` commit and raise
`OutOfBlocksError` only when a caller skipped the check. Blocks are reference
counted so that a block can be shared (prefix caching, a transfer lease);
a full block whose KV is computed can carry a prefix hash chained over all
tokens before it (`set_hashes`).

Prefix caching (`enable_prefix_caching`): a hashed block that nobody holds any
more stays addressable by its hash while it waits in the free list, least
recently freed first out; `allocate_cached` hands a prompt the cached blocks
of its longest cached prefix (shared, never written again) and fresh ones for
the rest, and a fresh block taken from the free list evicts whatever it cached.
Hashes are set only once a block's KV is in the cache (the schedulers do it
after the step that computed it), so a hit never reads a block still to be
written.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.errors import OutOfBlocksError

NO_HASH = -1


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per *full* block, each over the block's tokens and its parent's hash.

    Integer tuples hash deterministically across processes, so two workers agree
    on the hash of the same prefix.
    """
    hashes: list[int] = []
    parent = NO_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))   # oldest first
        self._ref_counts = [0] * num_blocks
        self._hashes = [NO_HASH] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.num_queried_tokens = 0   # prompt tokens looked up in the cache (allocate_cached)
        self.num_hit_tokens = 0       # ... and found there
        self.num_evictions = 0        # cached blocks reused for other contents

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int:
        return self._hashes[block_id]

    # -- whole sequences -------------------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.block_size) <= len(self._free)

    def allocate(self, num_tokens: int, token_ids: Sequence[int] | None = None) -> list[int]:
        """Take fresh blocks for `num_tokens` tokens; hash the full ones if tokens are given
        (their KV must be in the cache already: a copy landed, not a prompt to compute)."""
        n = blocks_needed(num_tokens, self.block_size)
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} blocks for {num_tokens} tokens, {len(self._free)} free")
        block_ids = [self._take() for _ in range(n)]
        if token_ids is not None:
            self.set_hashes(block_ids, token_ids)
        return block_ids

    def cached_prefix(self, token_ids: Sequence[int], align_tokens: int | None = None) -> list[int]:
        """The cached blocks of the longest cached prefix of `token_ids`, never covering its last
        token (whose logits a prefill must compute) nor the block that holds it. `align_tokens`
        (a multiple of the block size): a prefix of whole multiples of it only (a KV pull past
        it must start on a block edge of the sender's cache too)."""
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - 1) // self.block_size
        hits = []
        for h in prefix_hashes(token_ids[:usable * self.block_size], self.block_size):
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        if align_tokens is not None:
            if align_tokens <= 0 or align_tokens % self.block_size:
                raise ValueError(f"align_tokens must be a positive multiple of {self.block_size}, got {align_tokens}")
            step = align_tokens // self.block_size
            del hits[len(hits) // step * step:]
        return hits

    def can_allocate_cached(self, num_tokens: int, token_ids: Sequence[int], align_tokens: int | None = None) -> bool:
        hits = self.cached_prefix(token_ids, align_tokens)
        idle_hits = sum(1 for b in hits if self._ref_counts[b] == 0)   # they leave the free list
        return blocks_needed(num_tokens, self.block_size) - len(hits) <= len(self._free) - idle_hits

    def allocate_cached(self, num_tokens: int, token_ids: Sequence[int], align_tokens: int | None = None,
                        to_compute: bool = True) -> tuple[list[int], int]:
        """Blocks for `num_tokens` tokens whose first `len(token_ids)` are these: the cached
        prefix shared, fresh blocks for the rest. Returns (block ids, tokens already cached).
        `to_compute` False: the rest's KV comes from elsewhere (a transfer), so the lookup is
        not counted with the prompts a prefill computes (`num_queried_tokens`, `num_hit_tokens`)."""
        if not self.can_allocate_cached(num_tokens, token_ids, align_tokens):
            raise OutOfBlocksError(f"no room for {num_tokens} tokens, {len(self._free)} blocks free")
        hits = self.cached_prefix(token_ids, align_tokens)
        for b in hits:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1
        rest = blocks_needed(num_tokens, self.block_size) - len(hits)
        if to_compute:
            self.num_queried_tokens += len(token_ids)
            self.num_hit_tokens += len(hits) * self.block_size
        return hits + [self._take() for _ in range(rest)], len(hits) * self.block_size

    def set_hashes(self, block_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """`token_ids`' KV is in these blocks now: name each full block by its prefix hash (the
        newest block of a hash is the one found: an older copy is likelier to be free)."""
        for block_id, h in zip(block_ids, prefix_hashes(token_ids, self.block_size)):
            self._hashes[block_id] = h
            self.hash_to_block[h] = block_id

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; a block with none left is free again.

        Checked first, then committed: a bad id frees nothing. A sequence's blocks go back last
        first, so its prefix's first blocks are the last evicted: a later prompt that finds
        only part of its prefix cached finds the head of it (a hit stops at the first miss)."""
        drops: dict[int, int] = {}
        for block_id in block_ids:
            drops[block_id] = drops.get(block_id, 0) + 1
            if not 0 <= block_id < self.num_blocks or self._ref_counts[block_id] < drops[block_id]:
                raise ValueError(f"block {block_id} freed while not allocated")
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._release(block_id)

    def share(self, block_ids: Sequence[int]) -> None:
        """Add a reference to blocks already held (a second owner, e.g. a transfer lease)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} shared while not allocated")
            self._ref_counts[block_id] += 1

    # -- growing one sequence -------------------------------------------
    def can_append(self, num_blocks_held: int, new_num_tokens: int) -> bool:
        """Whether a sequence holding `num_blocks_held` blocks can grow to `new_num_tokens`."""
        extra = blocks_needed(new_num_tokens, self.block_size) - num_blocks_held
        return extra <= len(self._free)

    def append(self, block_ids: list[int], new_num_tokens: int) -> None:
        """Grow `block_ids` in place so that it covers `new_num_tokens` tokens."""
        extra = blocks_needed(new_num_tokens, self.block_size) - len(block_ids)
        if extra > len(self._free):
            raise OutOfBlocksError(f"need {extra} more blocks, {len(self._free)} free")
        for _ in range(extra):
            block_ids.append(self._take())

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    # -- internals ---------------------------------------------------------
    def _take(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        if self._hashes[block_id] != NO_HASH:   # a cached block goes to other contents
            self._forget_hash(block_id)
            self.num_evictions += 1
        self._ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        if not self.enable_prefix_caching:
            self._forget_hash(block_id)
        self._free[block_id] = None   # the most recently freed: evicted last

    def _forget_hash(self, block_id: int) -> None:
        h = self._hashes[block_id]
        if h != NO_HASH:
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self._hashes[block_id] = NO_HASH
