"""Synthetic engine steps and their timing, shared by the step-time measurements.

`pdcluster profile` (profile.py), its interference probes (interference.py), its
multi-rank points (profile_parallel.py) and the one-off experiments in
benchmarks/experiments/ all time the engine's ModelRunner on batches built here:
sequences laid out in consecutive KV blocks from block 0, with in-vocabulary
token ids and greedy sampling. A decode batch's KV blocks hold whatever the cache
holds (zeros, or an earlier step's KV); the step does the same work either way.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from engine.sampling_params import SamplingParams
from engine.sequence import SeqWork

GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0)


def seq_works(lengths: list[int], block_size: int, vocab: int, decode: bool = False) -> list[SeqWork]:
    """One SeqWork per length, each sequence's blocks following the previous one's from block 0.

    A prefill (the default) of `lengths[i]` prompt tokens each; with `decode`, one decode
    step per sequence whose context already holds `lengths[i]` tokens."""
    out, next_block = [], 0
    for i, n in enumerate(lengths):
        blocks = -(-(n + 1) // block_size)
        ids = tuple(range(next_block, next_block + blocks))
        next_block += blocks
        tokens = tuple(100 + (7 * i + j) % (vocab - 200) for j in range(1 if decode else n))
        out.append(SeqWork(f"r{i}", tokens, n if decode else 0, ids, GREEDY_ONE))
    return out


def min_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call (allocator, oneDNN
    primitive caches). The minimum: on a shared machine it is the least disturbed estimate."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
