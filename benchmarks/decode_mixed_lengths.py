"""Decode steps over a batch of mixed context lengths: one padded attention pass against
attention grouped by length (pdkernels/paged_attention.py, PAD_SLACK), side by side.

    .venv/bin/python benchmarks/decode_mixed_lengths.py

The default model, bf16, one thread, the engine's ModelRunner.decode_step. Contexts
are drawn from the chatbot workload's prompt lengths (router/workload.py) plus a
few decoded tokens, the mix a decode instance holds while serving it; a uniform
batch of the same total context is shown for reference (what `pdcluster profile`
measures). The two variants alternate step by step; medians of the repeats.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (4, 9, 16, 32)
REPEATS = 15


def main() -> None:
    import torch
    torch.set_num_threads(1)
    from cluster.bench.steps import seq_works
    from engine.cpu_tuning import keep_freed_memory
    from engine.instance import build_engine
    from pdkernels import paged_attention as pa
    from router.workload import get_workload
    keep_freed_memory()
    parts = build_engine(None, "bfloat16", 16, 1.0, None, 1, 0)
    runner, vocab = parts.runner, parts.model_config.vocab_size
    prompt = get_workload("chatbot").prompt
    rng = random.Random(0)
    slack = pa.PAD_SLACK
    print(f"decode step (ms, median of {REPEATS}), chatbot-like contexts, 1 thread, bf16")
    print("batch | contexts (min / median / max) | one padded pass | grouped by length | speed-up | "
          "uniform batch, same total")
    for batch in BATCHES:
        lens = sorted(min(1024, prompt.sample(rng) + rng.randint(1, 48)) for _ in range(batch))
        mixed = seq_works(lens, runner.block_size, vocab, decode=True)
        uniform = seq_works([sum(lens) // batch] * batch, runner.block_size, vocab, decode=True)
        times = {"padded": [], "grouped": [], "uniform": []}
        for _ in range(REPEATS + 1):
            for name, works, s in (("padded", mixed, float("inf")), ("grouped", mixed, slack),
                                   ("uniform", uniform, slack)):
                pa.PAD_SLACK = s
                t0 = time.perf_counter()
                runner.decode_step(works)
                times[name].append(time.perf_counter() - t0)
        pa.PAD_SLACK = slack
        med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        print(f"{batch:>5} | {lens[0]} / {lens[len(lens) // 2]} / {lens[-1]} | {med['padded']:.1f} | "
              f"{med['grouped']:.1f} | {med['padded'] / med['grouped']:.2f}x | {med['uniform']:.1f}")


if __name__ == "__main__":
    main()
