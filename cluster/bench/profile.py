"""`pdcluster profile`: measure this engine on this machine and fit the planner's latency model.

One process, one torch thread, the default model (bf16), driving the engine's
ModelRunner directly (what a prefill or decode worker's step runs):
  * prefill: packed batches of prompts of several lengths and shapes, so the
    fit separates the per-token term from the quadratic attention term;
  * decode: one step at several batch sizes and context lengths. The KV
    blocks a step reads hold zeros rather than a real prompt's KV; the step
    does the same work either way, and this skips prefilling every context.
Each point is the fastest of `repeats` runs after a warm-up: the machine is
shared, and the minimum is the least disturbed estimate of the step itself. The fit is
router.planner.profile.fit_prefill / fit_decode. By default only plan 1x1 is
measured and the planner derives (t, p) > 1 by its stated scaling assumption;
`--plans 1x1,2x1,1x2` also measures multi-rank instances (profile_parallel.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# (prompt lengths of one packed batch); singles first, then batches of the same total
PREFILL_SHAPES = ([16], [64], [128], [256], [512], [1024], [64] * 4, [64] * 8, [256] * 2, [256] * 4,
                  [512] * 2, [128] * 8, [32, 480], [16] * 16)
DECODE_BATCHES = (1, 4, 16, 32)
DECODE_CONTEXTS = (64, 512, 1024)          # tokens per sequence
KV_CACHE_GB = 1.0                          # enough for 32 x 1024 tokens of the default model
TRANSFER_GB_S = 2.0                        # shm between workers at a few MB (docs/benchmarks.md)


def _min_time(fn, repeats: int) -> float:
    fn()                                   # warm-up: allocator, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _works(lengths: list[int], block_size: int, start_pos: int | None, vocab: int):
    """SeqWork for sequences laid out in consecutive blocks from block 0."""
    from engine import SamplingParams
    from engine.sequence import SeqWork
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    out, next_block = [], 0
    for i, n in enumerate(lengths):
        blocks = -(-(n + 1) // block_size)
        ids = tuple(range(next_block, next_block + blocks))
        next_block += blocks
        tokens = tuple(100 + (7 * i + j) % (vocab - 200) for j in range(n if start_pos is None else 1))
        out.append(SeqWork(f"r{i}", tokens, 0 if start_pos is None else n, ids, greedy))
    return out


def measure(repeats: int = 3, log=print):
    """(prefill samples, decode samples, the engine's parts) measured here."""
    import torch

    from engine.instance import build_engine
    parts = build_engine(None, "bfloat16", 16, KV_CACHE_GB, None, 1, 0)
    runner, cfg = parts.runner, parts.model_config
    bs, vocab = runner.block_size, cfg.vocab_size
    log(f"profiling {cfg.path} on {torch.get_num_threads()} thread(s), bf16, {repeats} repeats per point")
    prefill = []
    for lens in PREFILL_SHAPES:
        works = _works(lens, bs, None, vocab)
        t = _min_time(lambda: runner.prefill(works), repeats)
        prefill.append((list(lens), t))
        log(f"  prefill {len(lens)} x {lens[0]}{'..' if len(set(lens)) > 1 else ''} "
            f"({sum(lens)} tokens): {t * 1e3:.1f} ms")
    decode = []
    for batch in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            works = _works([ctx] * batch, bs, ctx, vocab)
            t = _min_time(lambda: runner.decode_step(works), repeats)
            decode.append((batch, batch * (ctx + 1), t))
            log(f"  decode batch {batch:>2} x context {ctx:>4}: {t * 1e3:.1f} ms/step")
    return prefill, decode, parts


def build_profile(prefill, decode, parts, kv_cache_memory_gb: float = 0.5) -> dict:
    """The profile JSON (format pdcluster-profile/1) from measured samples."""
    from router.planner.profile import FORMAT, fit_decode, fit_prefill
    cfg, runner = parts.model_config, parts.runner
    element = runner.dtype.itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    pm, perr = fit_prefill(prefill)
    dm, derr = fit_decode(decode)
    return {
        "format": FORMAT,
        "name": "smollm2-135m-cpu",
        "source": (f"measured by `pdcluster profile` on this machine ({time.strftime('%Y-%m-%d')}): "
                   f"{len(prefill)} prefill and {len(decode)} decode points, 1 torch thread, bf16, fitted by "
                   f"weighted least squares (relative RMSE prefill {perr:.1%}, decode {derr:.1%}). Only 1x1 "
                   "measured; (t, p) > 1 derived by the scaling block, whose values are assumptions: "
                   "tp_efficiency 0.8, a gloo all-reduce per layer pair ~0.1 ms, stage hand-off 0.5 ms."),
        "model": {"name": cfg.path.rstrip('/').split('/')[-1], "num_layers": cfg.num_layers,
                  "weight_bytes": float(weight_bytes),
                  "kv_bytes_per_token": float(cfg.kv_bytes_per_token(element))},
        # device memory = weights + the KV cache a worker is configured with, so capacity = kv_cache_memory_gb
        "hardware": {"name": "cpu core", "device_kind": "cpu",
                     "device_memory_gb": weight_bytes / 2**30 + kv_cache_memory_gb, "memory_utilization": 1.0,
                     "intra_node_gb_s": TRANSFER_GB_S, "inter_node_gb_s": TRANSFER_GB_S},
        "scaling": {"tp_efficiency": 0.8, "tp_step_latency_s": 2 * cfg.num_layers * 1e-4,
                    "tp_s_per_token": 2 * cfg.num_layers * cfg.hidden_size * element / 1e9,
                    "pp_stage_latency_s": 5e-4},
        "plans": {"1x1": {"prefill": pm.to_dict(), "decode": dm.to_dict()}},
        "fit": {"prefill_rel_rmse": perr, "decode_rel_rmse": derr},
        "samples": {"prefill": [{"lengths": ls, "s": t} for ls, t in prefill],
                    "decode": [{"batch": b, "context_tokens": c, "s": t} for b, c, t in decode]},
    }


def run(out: str = "bench-results/profile-cpu.json", repeats: int = 3, plans: tuple[str, ...] = ("1x1",),
        interference: bool = True) -> dict:
    """Measure 1x1 (always) and any other "<t>x<p>" in `plans` (multi-rank, fewer points), fit, write.
    `interference`: also measure how a step slows beside a busy neighbour core (cluster/bench/interference.py)."""
    from router.planner.profile import parse_plan_key, fit_decode, fit_prefill, profile_from_dict
    t0 = time.perf_counter()
    others = sorted({parse_plan_key(p) for p in plans} - {(1, 1)})
    prefill, decode, parts = measure(repeats, log=lambda m: print(m, flush=True))
    data = build_profile(prefill, decode, parts)
    del parts                              # the interference probes build their own engines
    if interference and (os.cpu_count() or 1) >= 2:
        from cluster.bench.interference import measure as measure_interference
        data["interference"] = measure_interference(repeats=3 * repeats, log=lambda m: print(m, flush=True))
        data["source"] += (" interference: median step time beside a neighbour process looping a prefill "
                           "or a decode step on the other core, over the median alone, minus 1.")
    for tp, pp in others:
        from cluster.bench.profile_parallel import measure_parallel
        print(f"profiling {tp}x{pp} ({tp * pp} ranks)", flush=True)
        pre, dec = measure_parallel(tp, pp, repeats=max(1, repeats - 1), log=lambda m: print(m, flush=True))
        (pm, perr), (dm, derr) = fit_prefill(pre), fit_decode(dec)
        data["plans"][f"{tp}x{pp}"] = {"prefill": pm.to_dict(), "decode": dm.to_dict()}
        data["fit"][f"{tp}x{pp}"] = {"prefill_rel_rmse": perr, "decode_rel_rmse": derr}
    if others:
        data["source"] += f" Also measured with engine.parallel_runner (gloo, 1 thread per rank): " \
                          f"{', '.join(f'{t}x{p}' for t, p in others)}."
    profile_from_dict(data)                # what we write must load
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=2) + "\n")
    for key, plan in data["plans"].items():
        p, d = plan["prefill"], plan["decode"]
        print(f"{key}: prefill(s) = {p['a']:.4g} + {p['b']:.4g} * tokens + {p['c']:.4g} * sum(l^2); "
              f"decode(s) = {d['a']:.4g} + {d['b']:.4g} * batch + {d['c']:.4g} * context")
    print(f"fit relative RMSE: {json.dumps(data['fit'])}")
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return data
