"""`pdcluster bench engine`: our engine against transformers' generate, same run.

One process, one thread, the default model in bf16. Measured side by side:
  * prefill: one 512-token prompt, time to the first sampled token;
  * decode throughput at batch 1, 8, 32: 128-token prompts, 64 new tokens
    (EOS ignored), decode tokens/s = batch * 63 / (t(64 tokens) - t(1 token)),
    so that the prefill and the first token are subtracted out.
Also decode at batch 32 as a fraction of one core's limits (~200 GFLOP/s bf16,
~11 GB/s memory), from the FLOPs and bytes a decode step must do.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

PEAK_GFLOPS = 200.0
PEAK_GBPS = 11.0


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(llm, prompts, new_tokens):
    from engine import SamplingParams
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return lambda: llm.generate(prompts, params)


def _hf(model, prompts, new_tokens):
    ids = torch.tensor(prompts)

    def run():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return run


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
        prefill_len: int = 512, out: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from engine import LLM
    torch.set_num_threads(1)
    llm = LLM(dtype="bfloat16", kv_cache_memory_gb=1.0)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_config.path, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    vocab = llm.model_config.vocab_size
    results: dict = {"threads": torch.get_num_threads(), "dtype": "bfloat16",
                     "model": llm.model_config.path, "prefill": {}, "decode": {}}

    prompt = [torch.randint(100, vocab, (prefill_len,), generator=g).tolist()]
    for fn in (_ours(llm, prompt, 1), _hf(hf, prompt, 1)):
        fn()  # warm-up
    ours = _time(_ours(llm, prompt, 1), repeats)
    theirs = _time(_hf(hf, prompt, 1), repeats)
    results["prefill"] = {"tokens": prefill_len, "ours_s": ours, "transformers_s": theirs,
                          "speedup": theirs / ours}
    _print(f"prefill {prefill_len} tokens: ours {ours * 1e3:.0f} ms, transformers {theirs * 1e3:.0f} ms,"
           f" {theirs / ours:.2f}x")

    for batch in batches:
        prompts = [torch.randint(100, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        row = {}
        for name, make, model in (("ours", _ours, llm), ("transformers", _hf, hf)):
            t_full = _time(make(model, prompts, new_tokens), 1)
            t_first = _time(make(model, prompts, 1), 1)
            row[f"{name}_tok_s"] = batch * (new_tokens - 1) / (t_full - t_first)
            row[f"{name}_step_ms"] = (t_full - t_first) / (new_tokens - 1) * 1e3
        row["speedup"] = row["ours_tok_s"] / row["transformers_tok_s"]
        flops, nbytes = _decode_cost(llm.model_config, batch, prompt_len + new_tokens // 2, 2)
        step_s = row["ours_step_ms"] / 1e3
        row["ours_gflops"] = flops / step_s / 1e9
        row["ours_gbps"] = nbytes / step_s / 1e9
        row["fraction_of_peak_flops"] = row["ours_gflops"] / PEAK_GFLOPS
        row["fraction_of_peak_bandwidth"] = row["ours_gbps"] / PEAK_GBPS
        results["decode"][str(batch)] = row
        _print(f"decode batch {batch:>2}: ours {row['ours_tok_s']:.1f} tok/s, transformers "
               f"{row['transformers_tok_s']:.1f} tok/s, {row['speedup']:.2f}x; ours {row['ours_gflops']:.0f} "
               f"GFLOP/s ({row['fraction_of_peak_flops']:.0%} of {PEAK_GFLOPS:.0f}), {row['ours_gbps']:.1f} GB/s "
               f"({row['fraction_of_peak_bandwidth']:.0%} of {PEAK_GBPS:.0f})")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        _print(f"wrote {out}")
    return results


def _print(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
