"""Which instance likely holds which prompt prefix: the router's side of KV-aware routing.

The router never reaches into a worker's cache; it remembers what it sent
where. A prompt's full blocks are named by chained hashes (the same
`engine.block_manager.prefix_hashes` the workers use), so a prefix an
instance prefilled (or decoded) is a run of hashes it was given. `overlap`
says how many leading blocks of a new prompt an instance has seen. The
workers evict by their own LRU, so this is an estimate: the router uses it to
prefer, never to promise (a miss only costs a prefill).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, max_blocks_per_instance: int = 65536) -> None:
        self.max_blocks = max_blocks_per_instance
        self._seen: dict[str, OrderedDict[int, None]] = {}

    def note(self, instance: str, hashes: Sequence[int]) -> None:
        """`instance` will hold these blocks (it prefilled or decoded them)."""
        seen = self._seen.setdefault(instance, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def overlap(self, instance: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt with these hashes `instance` has seen."""
        seen = self._seen.get(instance)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def forget(self, instance: str) -> None:
        self._seen.pop(instance, None)
