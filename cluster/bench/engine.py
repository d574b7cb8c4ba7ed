"""`pdcluster bench engine`: our engine against transformers' generate and, with
`--peer vllm`, vLLM's CPU build; side by side in one run.

Our engine and transformers run in this process, vLLM in a subprocess from its own
venv (cluster/bench/engine_peer.py); all on one thread, pinned to one core, the
default model in bf16, greedy, prefix caching off. The engines take turns: every
repeat runs each of them once on the same token ids before the next repeat, so a
drift of the shared machine's speed lands on all of them. Measured:
  * prefill: one 512-token prompt, time to the first sampled token;
  * decode throughput at batch 1, 8, 32: 128-token prompts, 64 new tokens
    (EOS ignored), decode tokens/s = batch * 63 / (t(64 tokens) - t(1 token)),
    so that the prefill and the first token are subtracted out.
Medians over the repeats, and each repeat's ratio ours / peer. Also each decode
step's GFLOP/s and GB/s, from the FLOPs and bytes it must do, as a fraction of this
core's bf16 GEMM rate and read bandwidth measured at the start of the run (the
machine changes from day to day: no constant holds).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

PEERS = ("vllm",)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class _Ours:
    name = "ours"

    def __init__(self, llm) -> None:
        from engine import SamplingParams
        self.llm, self.params = llm, SamplingParams

    def seconds(self, prompts, new_tokens) -> tuple[float, float]:
        params = self.params(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return _timed(lambda: self.llm.generate(prompts, params))


class _Transformers:
    name = "transformers"

    def __init__(self, model) -> None:
        self.model = model

    def seconds(self, prompts, new_tokens) -> tuple[float, float]:
        ids = torch.tensor(prompts)

        def run():
            with torch.inference_mode():
                self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return _timed(run)


class _Peer:
    def __init__(self, peer) -> None:
        self.peer, self.name = peer, "vllm"

    def seconds(self, prompts, new_tokens) -> tuple[float, float]:
        wall, cpu, _ = self.peer.generate(prompts, new_tokens)
        return wall, cpu


def _decode_cost(cfg, batch: int, context: int, element: int) -> tuple[float, float]:
    """FLOPs and bytes of one decode step at `batch` sequences of `context` tokens."""
    hd, kv, h = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    per_layer = cfg.hidden_size * (h * hd + 2 * kv * hd) + h * hd * cfg.hidden_size \
        + 3 * cfg.hidden_size * cfg.intermediate_size
    weights = cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    attn_flops = cfg.num_layers * 4 * h * hd * context            # QK^T and PV per token
    flops = batch * (2 * weights + attn_flops)
    kv_bytes = batch * context * cfg.kv_bytes_per_token(element)
    return flops, weights * element + kv_bytes


def run(repeats: int = 3, batches=(1, 8, 32), prompt_len: int = 128, new_tokens: int = 64,
        prefill_len: int = 512, out: str | None = None, peer: str | None = None, vllm_venv: str | None = None,
        cpu: int | None = None, transformers: bool = True) -> dict:
    from engine import LLM
    from engine.default_model import default_model_path
    if peer is not None and peer not in PEERS:
        from cluster.bench.serve_metrics import BenchError
        raise BenchError(f"--peer {peer!r}: the peers are {list(PEERS)}")
    if peer == "vllm":   # first: a missing venv fails before anything loads or is pinned
        from cluster.bench.engine_peer import VllmPeer, peer_python
        peer_python(vllm_venv)
    cpu = _pin(cpu)
    model_dir = default_model_path()
    peer_proc = None
    if peer == "vllm":
        _print(f"starting the vLLM peer on core {cpu} (its first start compiles the model, ~90 s) ...")
        peer_proc = VllmPeer(vllm_venv, model_dir, "bfloat16", cpu, max_num_seqs=max(64, max(batches)))
    try:
        llm = LLM(model=model_dir, dtype="bfloat16", kv_cache_memory_gb=1.0)
        engines = [_Ours(llm)]
        if peer_proc is not None:
            engines.append(_Peer(peer_proc))
        if transformers:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
            engines.append(_Transformers(hf))
        results = _measure(engines, llm.model_config, repeats, batches, prompt_len, new_tokens, prefill_len)
    finally:
        if peer_proc is not None:
            peer_proc.close()
    results.update({"threads": torch.get_num_threads(), "cpu": cpu, "dtype": "bfloat16", "model": model_dir,
                    "machine": _machine(), "engines": [e.name for e in engines], "repeats": repeats})
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        _print(f"wrote {out}")
    return results


def _measure(engines, cfg, repeats, batches, prompt_len, new_tokens, prefill_len) -> dict:
    """Wall time is the figure; each process's CPU time is kept beside it: on a shared machine
    another job's load lengthens an engine's wall time while it waits, its CPU time much less."""
    g = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    limits = core_limits()
    results: dict = {"prefill": {}, "decode": {}, "load_average_start": os.getloadavg()[0], "core": limits}
    _print(f"this core: {limits['gemm_gflops']:.0f} GFLOP/s bf16 GEMM, {limits['read_gbps']:.1f} GB/s read")
    prompt = [torch.randint(100, vocab, (prefill_len,), generator=g).tolist()]
    for e in engines:
        e.seconds(prompt, 1)   # warm-up
    walls, cpus = {e.name: [] for e in engines}, {e.name: [] for e in engines}
    for _ in range(repeats):   # interleaved: each engine once per repeat
        for e in engines:
            wall, cpu = e.seconds(prompt, 1)
            walls[e.name].append(wall)
            cpus[e.name].append(cpu)
    results["prefill"] = _row(walls, "s", True) | _row(cpus, "cpu_s", True) | {"tokens": prefill_len}
    _print_row(f"prefill {prefill_len} tokens", results["prefill"], "s", "ms", 1e3)

    for batch in batches:
        prompts = [torch.randint(100, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        for e in engines:
            e.seconds(prompts, 2)   # warm-up at this batch
        walls, cpus = {e.name: [] for e in engines}, {e.name: [] for e in engines}
        for _ in range(repeats):
            for e in engines:
                (full, full_cpu), (first, first_cpu) = e.seconds(prompts, new_tokens), e.seconds(prompts, 1)
                walls[e.name].append(batch * (new_tokens - 1) / (full - first))
                cpus[e.name].append(batch * (new_tokens - 1) / (full_cpu - first_cpu))
        row = _row(walls, "tok_s", False) | _row(cpus, "cpu_tok_s", False)
        step_s = batch / row["ours_tok_s"]
        flops, nbytes = _decode_cost(cfg, batch, prompt_len + new_tokens // 2, 2)
        row.update({"ours_step_ms": step_s * 1e3, "ours_gflops": flops / step_s / 1e9,
                    "ours_gbps": nbytes / step_s / 1e9})
        row["fraction_of_peak_flops"] = row["ours_gflops"] / limits["gemm_gflops"]
        row["fraction_of_peak_bandwidth"] = row["ours_gbps"] / limits["read_gbps"]
        results["decode"][str(batch)] = row
        _print_row(f"decode batch {batch:>2}", row, "tok_s", "tok/s", 1.0)
    results["load_average_end"] = os.getloadavg()[0]
    _print(f"load average (1 min) at start {results['load_average_start']:.1f}, at end {results['load_average_end']:.1f}")
    return results


def core_limits() -> dict:
    """This core's bf16 GEMM rate (a 512 x 1536 x 1536 product, the best of 5) and its read bandwidth
    (an fp32 sum over 512 MB, the best of 3): what a decode step's rates are fractions of."""
    a, b = torch.randn(512, 1536).bfloat16(), torch.randn(1536, 1536).bfloat16()
    big = torch.ones(128 << 20, dtype=torch.float32)
    gemm = min(_timed(lambda: torch.mm(a, b))[0] for _ in range(5))
    read = min(_timed(big.sum)[0] for _ in range(3))
    return {"gemm_gflops": 2 * 512 * 1536 * 1536 / gemm / 1e9, "read_gbps": big.numel() * 4 / read / 1e9}


def _row(runs: dict[str, list[float]], key: str, lower_is_better: bool) -> dict:
    """Medians per engine (`<engine>_<key>`), and per repeat how many times faster ours was than each
    other engine (`<key>_vs_<engine>`)."""
    row: dict = {f"{name}_{key}": statistics.median(v) for name, v in runs.items()}
    row.update({f"{name}_{key}_runs": v for name, v in runs.items()})
    for name, v in runs.items():
        if name == "ours":
            continue
        ratios = [(b / a if lower_is_better else a / b) for a, b in zip(runs["ours"], v)]
        row[f"{key}_vs_{name}_runs"] = ratios
        row[f"{key}_vs_{name}"] = statistics.median(ratios)
    return row


def _print_row(label: str, row: dict, key: str, unit: str, scale: float) -> None:
    names = [k[:-len(key) - 1] for k in row if k.endswith(f"_{key}") and "_vs_" not in k
             and not k.endswith(f"_cpu_{key}")]
    parts = [f"{n} {row[f'{n}_{key}'] * scale:.1f} {unit}" for n in names]
    for n in names:
        if n == "ours":
            continue
        runs = ", ".join(f"{r:.2f}" for r in row[f"{key}_vs_{n}_runs"])
        cpu_key = "cpu_s" if key == "s" else "cpu_tok_s"
        parts.append(f"ours/{n} {row[f'{key}_vs_{n}']:.2f}x (runs {runs}; CPU time {row[f'{cpu_key}_vs_{n}']:.2f}x)")
    _print(f"{label}: " + "; ".join(parts))


def _pin(cpu: int | None) -> int:
    """One thread, pinned to one core (the last one this process may use, unless told)."""
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    return cpu


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _print(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
