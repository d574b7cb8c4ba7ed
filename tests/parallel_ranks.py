"""Run a multi-rank engine instance in spawned processes (gloo on 127.0.0.1), for the tests.

`run_instance` starts one process per rank. Rank 0 drives: it generates greedily
through the engine's own scheduler over a `ParallelRunner`, runs a KV round trip
(gather blocks into the canonical cache, copy them to other blocks, scatter them
back to the ranks, decode from there) and sends what it saw back to the test.
The reference for both is `reference`, the same steps on a one-rank ModelRunner.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
import traceback

import torch

from engine.block_manager import BlockManager, blocks_needed
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import SeqState, SeqWork, StepKind, StepPlan

GREEDY = dict(temperature=0.0, ignore_eos=True)
MAX_STEPS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(runner, num_blocks: int, block_size: int, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of every prompt, stepped through the engine's scheduler (packed prefill, batched decode)."""
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=1024),
                      blocks, frozenset())
    seqs = [SeqState(str(i), p, SamplingParams(max_tokens=max_tokens, **GREEDY)) for i, p in enumerate(prompts)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(MAX_STEPS):
        if not sched.has_unfinished():
            break
        plan = sched.schedule(0.0)
        sched.update(plan, runner.execute(plan))
    assert blocks.num_free_blocks == num_blocks, "the generation leaked blocks"
    return [s.output_token_ids for s in seqs]


def kv_round_trip(runner, prompt: list[int], num_decode: int, move) -> tuple[list[int], torch.Tensor]:
    """Prefill into blocks x, `move(x, y)` the KV to blocks y, decode from y.

    Returns the tokens and the prompt's KV of the whole model (as it was in blocks x)."""
    bs = runner.block_size
    n = blocks_needed(len(prompt) + num_decode, bs)
    x, y = list(range(n)), list(range(n, 2 * n))
    params = SamplingParams(max_tokens=num_decode + 1, **GREEDY)
    tokens = list(runner.execute(StepPlan(StepKind.PREFILL, (SeqWork("a", tuple(prompt), 0, tuple(x), params),))).token_ids)
    used = blocks_needed(len(prompt), bs)
    kv = move(x[:used], y[:used])
    for step in range(num_decode):
        work = SeqWork("a", (tokens[-1],), len(prompt) + step, tuple(y), params)
        tokens.extend(runner.execute(StepPlan(StepKind.DECODE, (work,))).token_ids)
    return tokens, kv


def reference(model_path: str, prompts, max_tokens: int, num_blocks: int = 64, block_size: int = 16,
              device: str = "cpu"):
    """The same steps on one rank (t = p = 1)."""
    from engine.model_runner import ModelRunner
    from engine.model_config import load_model_config
    runner = ModelRunner(load_model_config(model_path), torch.float32, block_size, num_blocks, 1024, device=device)

    def move(x, y):
        data = runner.kv_cache.data
        data[:, :, y] = data[:, :, x]
        return data[:, :, x].clone().cpu()

    tokens = generate(runner, num_blocks, block_size, prompts, max_tokens)
    trip = kv_round_trip(runner, prompts[0], max_tokens - 1, move)
    return tokens, trip


def _rank_main(spec, args, prompts, max_tokens, results) -> None:
    from engine.parallel_runner import build_rank, leave_group
    try:
        runner, _ = build_rank(spec, args)
        if spec.rank != 0:
            runner.serve()
            results.put((spec.rank, "ok", None))
            return
        try:
            num_blocks = runner.kv_cache.num_blocks

            def move(x, y):
                runner.gather_blocks(x)
                data = runner.kv_cache.data
                kv = data[:, :, x].clone()
                data[:, :, y] = kv
                data[:, :, x] = 0   # nothing but the scatter may bring the KV to the ranks' blocks y
                runner.scatter_blocks(y)
                return kv.cpu()   # (a GPU tensor would not survive this process in the queue)

            tokens = generate(runner, num_blocks, args.block_size, prompts, max_tokens)
            trip = kv_round_trip(runner, prompts[0], max_tokens - 1, move)
            results.put((0, "ok", (tokens, trip)))
        finally:
            runner.close()
    except BaseException:
        results.put((spec.rank, "error", traceback.format_exc()))
    finally:
        leave_group()


def run_instance(model_path: str, tp_size: int, pp_size: int, prompts, max_tokens: int,
                 block_size: int = 16, timeout_s: float = 240.0, device: str = "cpu"):
    """Rank 0's (tokens, (round-trip tokens, KV)) from a tp x pp instance in spawned processes
    (`device` "cuda": each rank on its own GPU, NCCL between them)."""
    from engine.parallel_runner import EngineArgs, RankSpec
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # kv_cache_memory_gb sized for 64 blocks of the whole model at most: small and the same on every rank
    args = EngineArgs(model_path, dtype="float32", block_size=block_size, kv_cache_memory_gb=0.05,
                      max_model_len=1024, num_threads=1, device=device)
    procs = [ctx.Process(target=_rank_main, args=(RankSpec(r, tp_size, pp_size, "127.0.0.1", port), args,
                                                  prompts, max_tokens, results), daemon=True)
             for r in range(tp_size * pp_size)]
    for p in procs:
        p.start()
    out, errors, answered = None, [], 0
    deadline = time.monotonic() + timeout_s
    try:
        while answered < len(procs) and not errors:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"rank(s) {dead} died (exit codes {[procs[i].exitcode for i in dead]})")
                elif time.monotonic() > deadline:
                    errors.append(f"no answer from every rank within {timeout_s}s")
                continue
            answered += 1
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            elif rank == 0:
                out = value
    finally:
        for p in procs:
            p.join(10 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    if errors:
        raise AssertionError("\n".join(errors))
    return out
