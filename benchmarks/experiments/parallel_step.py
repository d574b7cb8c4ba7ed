"""Step times of one engine instance under (tp, pp) plans, on this machine (CPU, gloo on 127.0.0.1).

    .venv/bin/python benchmarks/experiments/parallel_step.py [--dtype bfloat16] [--prompt-tokens 256] [--batch 8]

For each plan the ranks are spawned processes with one torch thread each; rank 0
times a packed prefill of --batch prompts, --steps decode steps of that batch,
and the KV gather / scatter of one prompt's blocks through its canonical cache.
Prints one JSON line per plan (medians of --repeats runs). On 2 cores, tp 2 is
2 ranks x 1 thread against 1 x 1: it shows the split's overhead and its speedup.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root

PLANS = [(1, 1), (2, 1), (1, 2)]


def _work(args, runner):
    from engine.block_manager import blocks_needed
    from engine.sampling_params import SamplingParams
    from engine.sequence import SeqWork, StepKind, StepPlan
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    per_seq = blocks_needed(args.prompt_tokens + args.steps + 1, args.block_size)
    tables = [tuple(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.batch)]
    prompts = [tuple((17 * i + j) % 4000 + 10 for j in range(args.prompt_tokens)) for i in range(args.batch)]
    t0 = time.perf_counter()
    first = runner.execute(StepPlan(StepKind.PREFILL, tuple(SeqWork(str(i), p, 0, tables[i], params)
                                               for i, p in enumerate(prompts)))).token_ids
    prefill_s = time.perf_counter() - t0
    last = list(first)
    t0 = time.perf_counter()
    for step in range(args.steps):
        works = tuple(SeqWork(str(i), (last[i],), args.prompt_tokens + step, tables[i], params)
                      for i in range(args.batch))
        last = list(runner.execute(StepPlan(StepKind.DECODE, works)).token_ids)
    decode_s = (time.perf_counter() - t0) / args.steps
    used = list(tables[0][:blocks_needed(args.prompt_tokens, args.block_size)])
    gather_s = scatter_s = None
    if hasattr(runner, "gather_blocks"):
        t0 = time.perf_counter()
        runner.gather_blocks(used)
        gather_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.scatter_blocks(used)
        scatter_s = time.perf_counter() - t0
    return dict(prefill_s=prefill_s, decode_step_s=decode_s, gather_s=gather_s, scatter_s=scatter_s)


def _rank(spec, eargs, args, out) -> None:
    from engine.parallel_runner import build_rank, leave_group
    try:
        runner, _ = build_rank(spec, eargs)
        if spec.rank:
            runner.serve()
            return
        try:
            runs = [_work(args, runner) for _ in range(args.repeats)]
        finally:
            runner.close()
        out.put({k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None for k in runs[0]})
    finally:
        leave_group()


def run_plan(tp: int, pp: int, args) -> dict:
    from engine.default_model import default_model_path
    from engine.parallel_runner import EngineArgs, RankSpec
    from tests.parallel_ranks import free_port
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    eargs = EngineArgs(default_model_path(), args.dtype, args.block_size, kv_cache_memory_gb=0.5,
                       max_model_len=4096, num_threads=1)
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(RankSpec(r, tp, pp, "127.0.0.1", port), eargs, args, out))
             for r in range(tp * pp)]
    for p in procs:
        p.start()
    try:
        result = out.get(timeout=600)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return {"plan": f"tp{tp}-pp{pp}", **result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    print(json.dumps({"loadavg": os.getloadavg(), "cpu_count": os.cpu_count(), **vars(args)}))
    for tp, pp in PLANS:
        print(json.dumps(run_plan(tp, pp, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
