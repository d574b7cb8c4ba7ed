"""Prefix caching in the simulator: what one instance still holds of each conversation. Pure.

The engine (engine/block_manager.py) keeps a released block findable by its prefix hash until
the free list hands it out again, least recently released first. The simulator has no token ids,
only `RequestSpec.conversation`: a conversation is one token stream whose every turn's prompt is
a prefix of the next turn's (router/workload.py), so what an instance holds of it is a length, a
whole number of blocks. One entry per conversation, ordered by release:

  * a request releasing its KV (a prefill instance after the hand-off: the prompt; a decode or
    colocated instance at the end: prompt + answer but the last token, whose KV was never
    computed) puts its conversation's entry at the recent end;
  * a prompt admitted there takes its conversation's entry (`claim`): the blocks it hits become
    its own again, as allocate_cached shares them;
  * fresh blocks come out of the free ones; the entries fit in what is free, evicting the least
    recently released first (`fit`). The engine frees a sequence's blocks last to first, so the
    last blocks of a prefix go first and its head stays findable: an entry shrinks from its end.

A hit never covers the block holding the prompt's last token (its logits must be computed).
Approximations: a prompt sharing blocks with a request still running there (a conversation's
next turn arriving before the last one finished) is charged its blocks in full (the engine
shares them); prefixes shared across conversations (a common system prompt) are not modelled.
"""
from __future__ import annotations

from collections import OrderedDict

from router.workload import RequestSpec


class PrefixCache:
    def __init__(self, block_size: int, stats=None) -> None:
        self.block_size = block_size
        self.stats = stats                                     # SimStats: evicted blocks are counted there
        self.entries: OrderedDict[int, int] = OrderedDict()    # conversation -> tokens held, oldest release first
        self.num_blocks = 0                                    # blocks the entries hold (all free: evictable)

    def usable(self, spec: RequestSpec, held: int = 0) -> int:
        """Tokens of this prompt found here (entry or `held` by a request running here), whole
        blocks, never the block of its last token. Checks only: no side effect."""
        if spec.conversation is None:
            return 0
        have = max(self.entries.get(spec.conversation, 0), held)
        bs = self.block_size
        return min(have // bs, (spec.prompt_tokens - 1) // bs) * bs

    def claim(self, spec: RequestSpec) -> None:
        """The prompt is admitted: its conversation's entry is its blocks now (the caller takes
        them out of the free ones with the rest of the request's)."""
        n = self.entries.pop(spec.conversation, 0) if spec.conversation is not None else 0
        self.num_blocks -= n // self.block_size

    def put(self, conversation: int | None, tokens: int, free_blocks: int) -> None:
        """A request released its KV: `tokens` of its conversation stay findable, as many as fit."""
        if conversation is None:
            return
        old = self.entries.pop(conversation, 0)
        self.num_blocks -= old // self.block_size
        tokens = max(old, tokens // self.block_size * self.block_size)
        if tokens:
            self.entries[conversation] = tokens
            self.num_blocks += tokens // self.block_size
        self.fit(free_blocks)

    def fit(self, free_blocks: int) -> None:
        """Evict the least recently released blocks, an entry's last first, until the cached blocks are
        within the free ones."""
        bs = self.block_size
        while self.num_blocks > free_blocks and self.entries:
            conversation, tokens = next(iter(self.entries.items()))
            drop = min(tokens // bs, self.num_blocks - free_blocks)
            if drop == tokens // bs:
                del self.entries[conversation]
            else:   # (the entry keeps its place: the rest of it was released as long ago)
                self.entries[conversation] = tokens - drop * bs
            self.num_blocks -= drop
            if self.stats is not None:
                self.stats.evicted_blocks += drop


def conversation_blocks(spec: RequestSpec, tokens: int, block_size: int) -> list[tuple[int, int]]:
    """The router's names for the full blocks of a conversation's first `tokens` tokens (what
    engine.block_manager.prefix_hashes gives for real token ids): (conversation, block index)."""
    if spec.conversation is None:
        return []
    return [(spec.conversation, i) for i in range(tokens // block_size)]
