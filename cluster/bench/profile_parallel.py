"""`pdcluster profile --plans 2x1,1x2`: measure multi-rank instances for the profile.

Each rank of a tp x pp instance runs in a spawned process (engine.parallel_runner,
gloo on 127.0.0.1, one torch thread per rank); rank 0 times whole steps through
`ParallelRunner.execute`, which is what a worker's step loop calls, so the
figures include the command broadcast, the all-reduces and the stage hand-offs.
Fewer points than 1x1 (the fit has three coefficients; each rank costs a core).
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
import traceback

from cluster.bench.steps import min_time, seq_works
from engine.default_model import default_model_path
from engine.model_config import load_model_config
from engine.sequence import StepKind, StepPlan

PREFILL_SHAPES = ([64], [256], [512], [64] * 4, [256] * 2, [128] * 8, [32, 480])
DECODE_POINTS = ((1, 64), (1, 1024), (8, 64), (8, 512), (32, 64), (32, 512))   # (batch, context per sequence)
KV_CACHE_GB = 0.5                        # the whole instance's budget: 32 x 513 tokens fit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_on_rank0(runner, vocab: int, repeats: int, results) -> tuple[list, list]:
    bs = runner.block_size
    prefill, decode = [], []
    for lens in PREFILL_SHAPES:
        plan = StepPlan(StepKind.PREFILL, tuple(seq_works(lens, bs, vocab)))
        prefill.append((list(lens), min_time(lambda: runner.execute(plan), repeats)))
        results.put((0, "progress", f"prefill {len(lens)} x {lens[0]}: {prefill[-1][1] * 1e3:.1f} ms"))
    for batch, ctx in DECODE_POINTS:
        plan = StepPlan(StepKind.DECODE, tuple(seq_works([ctx] * batch, bs, vocab, decode=True)))
        t = min_time(lambda: runner.execute(plan), repeats)
        decode.append((batch, batch * (ctx + 1), t))
        results.put((0, "progress", f"decode batch {batch} x context {ctx}: {t * 1e3:.1f} ms/step"))
    return prefill, decode


def _rank_main(spec, args, repeats: int, results) -> None:
    try:
        from engine.parallel_runner import build_rank, leave_group   # light start-up: it imports torch
        runner, _ = build_rank(spec, args)
        if spec.rank != 0:
            runner.serve()
            leave_group()
            results.put((spec.rank, "ok", None))
            return
        try:
            samples = _measure_on_rank0(runner, load_model_config(args.model_path).vocab_size, repeats, results)
        finally:
            runner.close()
        leave_group()
        results.put((0, "ok", samples))
    except Exception:
        results.put((spec.rank, "error", traceback.format_exc()))


def measure_parallel(tp: int, pp: int, repeats: int = 2, timeout_s: float = 300.0, log=print):
    """(prefill samples, decode samples) of one tp x pp instance of the default model, bf16."""
    from engine.parallel_runner import EngineArgs, RankSpec          # light start-up: it imports torch
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    args = EngineArgs(default_model_path(), dtype="bfloat16", block_size=16, kv_cache_memory_gb=KV_CACHE_GB,
                      num_threads=1)
    procs = [ctx.Process(target=_rank_main, args=(RankSpec(r, tp, pp, "127.0.0.1", port), args, repeats, results),
                         daemon=True) for r in range(tp * pp)]
    for p in procs:
        p.start()
    out, answered, deadline = None, 0, time.monotonic() + timeout_s
    try:
        while answered < len(procs):
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{tp}x{pp} profile: ranks died ({dead}) or timed out after {timeout_s}s")
                continue
            if status == "progress":
                log(f"  {tp}x{pp} {value}")
                continue
            if status == "error":
                raise RuntimeError(f"{tp}x{pp} profile: rank {rank} failed:\n{value}")
            answered += 1
            if rank == 0:
                out = value
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return out
