"""Decode steps over serving-like batches: the torch reference's decode attention
(gather into a padded buffer, grouped by length, two small bmms per kv head; the engine
before 2026-12-04) against the C kernel (pdkernels/cpu_decode_attention.c), side by side.

    .venv/bin/python benchmarks/experiments/decode_attention.py

The default model, bf16, one thread, the engine's ModelRunner.decode_step. Batches as a
decode instance holds them while serving: each sequence's context drawn from the chatbot
workload (prompt plus part of its output), its blocks scattered over a 0.5 GB cache; and,
for comparison, the uniform contexts in consecutive blocks that `pdcluster profile`
measures. The two variants alternate step by step; medians of the repeats. The attention
alone is timed per layer call on the same batches.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root

BATCHES = (1, 4, 8, 12, 16, 24, 32)
REPEATS = 7
KV_CACHE_GB = 0.5          # what the bench clusters give an instance (1456 blocks)


def serving_batch(batch: int, rng: random.Random, block_size: int, num_blocks: int, vocab: int):
    """SeqWork for `batch` chatbot sequences mid-decode, blocks scattered over the cache."""
    from engine import SamplingParams
    from engine.sequence import SeqWork
    from router.workload import WORKLOADS
    wl = WORKLOADS["chatbot"]
    free = list(range(num_blocks))
    rng.shuffle(free)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    out = []
    for i in range(batch):
        prompt, output = wl.prompt.sample(rng), wl.output.sample(rng)
        ctx = prompt + rng.randint(0, max(0, output - 1))
        blocks = -(-(ctx + 1) // block_size)
        ids, free = tuple(free[:blocks]), free[blocks:]
        out.append(SeqWork(f"r{i}", (100 + i % (vocab - 200),), ctx, ids, greedy))
    return out


def main() -> None:
    import torch
    torch.set_num_threads(1)
    import pdkernels
    from cluster.bench.steps import seq_works
    from engine import cpu_tuning
    from engine.instance import build_engine
    from pdkernels import cpu_native
    if cpu_native.load() is None:
        sys.exit("the C kernel is not available here (no compiler, or PDCLUSTER_NATIVE_KERNELS=0)")
    cpu_tuning.keep_freed_memory()
    parts = build_engine(None, "bfloat16", 16, KV_CACHE_GB, None, 1, 0)
    runner, vocab = parts.runner, parts.model_config.vocab_size
    num_blocks = parts.blocks.num_blocks
    supports = cpu_native.supports

    def use(name: str) -> None:
        cpu_native.supports = supports if name == "C kernel" else (lambda *a: False)

    calls = {}
    dispatch = pdkernels.paged_decode_attention

    def timed_attention(*args):
        t0 = time.perf_counter()
        out = dispatch(*args)
        calls.setdefault(current[0], []).append(time.perf_counter() - t0)
        return out

    current = [""]
    pdkernels.paged_decode_attention = timed_attention
    rng = random.Random(0)
    print(f"decode step (ms, median of {REPEATS}), default model, bf16, 1 thread, {num_blocks} KV blocks")
    print("batch | contexts | tokens | reference | C kernel | speed-up | attention per layer: reference, C kernel (ms)")
    try:
        for batch in BATCHES:
            serving = serving_batch(batch, rng, runner.block_size, num_blocks, vocab)
            tokens = sum(w.start_pos + 1 for w in serving)
            mean = tokens // batch
            uniform = seq_works([mean] * batch, runner.block_size, vocab, decode=True)
            for label, works in (("chatbot, scattered", serving), ("uniform, consecutive", uniform)):
                times = {"reference": [], "C kernel": []}
                calls.clear()
                for _ in range(REPEATS + 1):
                    for name in times:
                        use(name)
                        current[0] = name
                        t0 = time.perf_counter()
                        runner.decode_step(works)
                        times[name].append(time.perf_counter() - t0)
                use("C kernel")
                med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
                att = {k: statistics.median(v) * 1e3 for k, v in calls.items()}
                print(f"{batch:>5} | {label} | {tokens} | {med['reference']:.1f} | {med['C kernel']:.1f} | "
                      f"{med['reference'] / med['C kernel']:.2f}x | {att['reference']:.2f}, {att['C kernel']:.2f}",
                      flush=True)
    finally:
        pdkernels.paged_decode_attention = dispatch
        cpu_native.supports = supports


if __name__ == "__main__":
    main()
