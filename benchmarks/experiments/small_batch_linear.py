"""Decode steps at small batches: bf16 linears as F.linear (x @ Wᵀ, with oneDNN off
for 1-2 rows, the engine before 2026-12-04) against engine.layers.linear ((W @ xᵀ)ᵀ
through oneDNN for 2-32 rows, oneDNN off for one row), side by side.

    .venv/bin/python benchmarks/experiments/small_batch_linear.py

The default model, bf16, one thread, the engine's ModelRunner.decode_step over
uniform contexts (what `pdcluster profile` measures). The two variants alternate
step by step; medians of the repeats. Both give bit-identical logits on this CPU
(tests/unit/test_layers.py).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root

BATCHES = (1, 2, 3, 4, 8, 16, 32)
CONTEXTS = (64, 512)
REPEATS = 9


def main() -> None:
    import torch
    torch.set_num_threads(1)
    from cluster.bench.steps import seq_works
    from engine import cpu_tuning, layers
    from engine.instance import build_engine
    cpu_tuning.keep_freed_memory()
    parts = build_engine(None, "bfloat16", 16, 1.0, None, 1, 0)
    runner, vocab = parts.runner, parts.model_config.vocab_size
    variants = {"before": (0, 2), "after": (layers.SMALL_MATMUL_MAX_ROWS, cpu_tuning.SMALL_BATCH_ROWS)}

    def use(name: str) -> None:
        layers.SMALL_MATMUL_MAX_ROWS, cpu_tuning.SMALL_BATCH_ROWS = variants[name]

    print(f"decode step (ms, median of {REPEATS}), uniform contexts, 1 thread, bf16")
    print("context | batch | F.linear (before) | (W @ xᵀ)ᵀ for 2-32 rows (after) | speed-up")
    for ctx in CONTEXTS:
        for batch in BATCHES:
            works = seq_works([ctx] * batch, runner.block_size, vocab, decode=True)
            times = {name: [] for name in variants}
            for _ in range(REPEATS + 1):
                for name in variants:
                    use(name)
                    t0 = time.perf_counter()
                    runner.decode_step(works)
                    times[name].append(time.perf_counter() - t0)
            use("after")
            med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
            print(f"{ctx:>7} | {batch:>5} | {med['before']:.1f} | {med['after']:.1f} | "
                  f"{med['before'] / med['after']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
