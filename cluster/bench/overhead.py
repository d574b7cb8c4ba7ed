"""`pdcluster bench overhead`: what the router and the KV transport add over the in-process engine.

Same run, same machine, same model and dtype, one request at a time:
  * in-process: `engine.LLM` with one thread; TTFT = arrival -> first token,
    TPOT = mean time between later tokens (the engine's own metrics);
  * cluster: 1 prefill + 1 decode worker (one thread each, `shm` transfer)
    behind the gRPC router; TTFT and TPOT measured by the client, from the
    call to the first streamed chunk and between later chunks.
Prompt lengths 16, 128 and 512 tokens, 32 new tokens (EOS ignored), medians
over the repeats, the two sides interleaved so that drift hits both.
Overhead = cluster - in-process; the targets are <= 5 ms TTFT, <= 1 ms TPOT.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

PROMPT_TOKENS = (16, 128, 512)
NEW_TOKENS = 32


def _prompt_ids(tokenizer, n: int, salt: int) -> list[int]:
    words = tokenizer.encode(" ".join(f"word{salt}-{i}" for i in range(n)))
    return words[:n]


def _in_process(llm, ids: list[int]) -> tuple[float, float]:
    from engine import SamplingParams
    out = llm.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))[0]
    return out.metrics["ttft_s"], out.metrics["tpot_s"]


def _cluster(client, ids: list[int]) -> tuple[float, float, float]:
    """(TTFT, TPOT, TTFT minus the worker's own prefill compute) seen by the client."""
    start = time.perf_counter()
    stamps = []
    for chunk in client.generate(token_ids=ids, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True):
        stamps.extend([time.perf_counter()] * len(chunk.token_ids))
    ttft = stamps[0] - start
    return ttft, (stamps[-1] - stamps[0]) / (len(stamps) - 1), ttft - client.last.metrics["prefill_s"]


def _decode_step_totals(client) -> tuple[int, float]:
    """(steps, seconds of stepping) of every decode instance so far, from the admin state."""
    decode = [i for i in client.state().instances if i.role == "decode"]
    return sum(i.num_steps for i in decode), sum(i.num_steps * i.mean_step_s for i in decode)


def run(repeats: int = 5, out: str = "bench-results/overhead.json", dtype: str = "bfloat16") -> dict:
    from cluster.client import Client
    from cluster.config import load_config
    from cluster.local import Cluster
    from engine import LLM

    llm = LLM(dtype=dtype, num_threads=1, kv_cache_memory_gb=0.25)
    cfg = load_config(None, {"model": {"dtype": dtype}, "router": {"port": 0, "http_port": 0},
                             "prefill": {"kv_cache_memory_gb": 0.25}, "decode": {"kv_cache_memory_gb": 0.25}})
    rows = []
    with Cluster(cfg, log=lambda *_: None) as cluster, Client(cluster.address) as client:
        for n in PROMPT_TOKENS:
            _in_process(llm, _prompt_ids(llm.tokenizer, n, -1))   # warm both sides for this shape
            _cluster(client, _prompt_ids(llm.tokenizer, n, -2))
            local, remote = [], []
            before = _decode_step_totals(client)
            for r in range(repeats):
                local.append(_in_process(llm, _prompt_ids(llm.tokenizer, n, 2 * r)))
                remote.append(_cluster(client, _prompt_ids(llm.tokenizer, n, 2 * r + 1)))
            row = {"prompt_tokens": n, "new_tokens": NEW_TOKENS, "repeats": repeats,
                   "ttft_ms_in_process": 1e3 * statistics.median(t for t, _ in local),
                   "ttft_ms_cluster": 1e3 * statistics.median(r[0] for r in remote),
                   "tpot_ms_in_process": 1e3 * statistics.median(p for _, p in local),
                   "tpot_ms_cluster": 1e3 * statistics.median(r[1] for r in remote),
                   # the part of the cluster's TTFT that is not the prefill forward pass itself
                   "ttft_ms_cluster_outside_prefill": 1e3 * statistics.median(r[2] for r in remote)}
            steps, seconds = (a - b for a, b in zip(_decode_step_totals(client), before))
            # the decode worker's own time per step over these requests: TPOT minus this is
            # what the token's way back (zmq, router, gRPC) adds
            row["decode_step_ms_worker"] = 1e3 * seconds / steps if steps else 0.0
            row["ttft_overhead_ms"] = row["ttft_ms_cluster"] - row["ttft_ms_in_process"]
            row["tpot_overhead_ms"] = row["tpot_ms_cluster"] - row["tpot_ms_in_process"]
            rows.append(row)
            print(f"prompt {n:4d} tok: TTFT {row['ttft_ms_in_process']:7.1f} -> {row['ttft_ms_cluster']:7.1f} ms "
                  f"(+{row['ttft_overhead_ms']:.1f}); TPOT {row['tpot_ms_in_process']:6.2f} -> "
                  f"{row['tpot_ms_cluster']:6.2f} ms (+{row['tpot_overhead_ms']:.2f}); cluster TTFT outside the "
                  f"prefill pass {row['ttft_ms_cluster_outside_prefill']:.1f} ms, TPOT over the decode worker's "
                  f"step {row['tpot_ms_cluster'] - row['decode_step_ms_worker']:.2f} ms", flush=True)
    result = {"dtype": dtype, "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result
