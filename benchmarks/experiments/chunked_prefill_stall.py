"""How long running decodes stall when a long prompt arrives: whole prefill vs chunked prefill.

One engine instance (default model, bf16, one thread), the engine's own step
loop: `--num-decodes` short requests are decoding when one long prompt
arrives. With whole prefills first (`colocated`) their next token waits for
the whole prompt; with chunked prefill (`colocated_chunked`, Sarathi-Serve)
every step carries their decode rows plus a chunk of the prompt.

    .venv/bin/python benchmarks/experiments/chunked_prefill_stall.py [--prompt-len 1024] [--budgets 256 512]

Prints, per policy: the longest gap between two tokens of a decoding request
(its worst TPOT), their mean TPOT, the long prompt's TTFT and the wall time.
"""
from __future__ import annotations

import argparse
import json
import time

from engine import LLM, SamplingParams
from engine.sequence import SeqState


def run(llm: LLM, num_decodes: int, prompt_len: int, decode_tokens: int) -> dict:
    short = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    shorts = [SeqState(f"s{i}", [1000 + i + j for j in range(32)], short) for i in range(num_decodes)]
    long = SeqState("long", [2000 + j % 500 for j in range(prompt_len)],
                    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    for s in shorts:
        llm.scheduler.add(s)
    token_times: dict[str, list[float]] = {s.req_id: [] for s in shorts + [long]}
    arrived = None
    t0 = time.perf_counter()
    for step in range(100_000):
        if not llm.scheduler.has_unfinished():
            break
        if step == 4:   # the short requests are decoding now
            llm.scheduler.add(long)
            arrived = time.perf_counter()
        plan = llm.scheduler.schedule(float(step))
        before = {w.req_id: len(llm.scheduler.get(w.req_id).output_token_ids) for w in plan.seqs}
        llm.scheduler.update(plan, llm.runner.execute(plan))
        now = time.perf_counter()
        for w in plan.seqs:
            seq = next(s for s in shorts + [long] if s.req_id == w.req_id)
            if len(seq.output_token_ids) > before[w.req_id]:
                token_times[w.req_id].append(now)
    wall = time.perf_counter() - t0
    gaps = [b - a for s in shorts for a, b in zip(token_times[s.req_id], token_times[s.req_id][1:])]
    return {"max_tpot_ms": max(gaps) * 1e3, "mean_tpot_ms": sum(gaps) / len(gaps) * 1e3,
            "long_ttft_ms": (token_times["long"][0] - arrived) * 1e3, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--num-decodes", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = {}
    for name, chunked, budget in [("whole (colocated)", False, 4096)] + [
            (f"chunked {b} (colocated_chunked)", True, b) for b in args.budgets]:
        llm = LLM(dtype="bfloat16", num_threads=1, kv_cache_memory_gb=0.25, max_num_seqs=args.num_decodes + 1,
                  max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
        run(llm, args.num_decodes, 64, 16)   # warm-up
        results[name] = r = run(llm, args.num_decodes, args.prompt_len, args.decode_tokens)
        print(f"{name:<34} worst TPOT {r['max_tpot_ms']:7.0f} ms  mean TPOT {r['mean_tpot_ms']:6.0f} ms  "
              f"long TTFT {r['long_ttft_ms']:7.0f} ms  wall {r['wall_s']:5.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
