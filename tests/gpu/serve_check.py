"""A short serving run on a CUDA GPU (`make gpu-check`): one prefill and one decode instance of the
default model with `model.device: cuda`, through Ray and gRPC on 127.0.0.1, KV over zmq (through
host memory; with two GPUs also torch_dist over NCCL). Greedy fp32 outputs must equal the in-process
engine's on the same GPU. Prints per-request timings; exits non-zero on any mismatch.

    .venv/bin/python tests/gpu/serve_check.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "The history of the printing press begins in the fifteenth century. " * 12 + "In short,",
           "Once upon a time, in a small village by the mountains, there lived an old clockmaker who"]
MAX_TOKENS = 16


def serve_once(backend: str, want: list[list[int]]) -> bool:
    from cluster.client import Client
    from cluster.config import load_config
    from cluster.local import Cluster
    # zmq: both instances on one GPU, half of it each as Ray counts it; NCCL needs a GPU per process
    pool = {"kv_cache_memory_gb": 0.5, "num_gpus": 1.0 if backend == "torch_dist" else 0.5}
    cfg = load_config(None, {"model": {"dtype": "float32", "device": "cuda"}, "prefill": pool, "decode": pool,
                             "transfer": {"backend": backend}, "router": {"host": "127.0.0.1", "port": 0},
                             "ray": {"address": None, "host": "127.0.0.1"}})
    cluster = Cluster(cfg, log=lambda *_: None).start()
    ok = True
    try:
        with Client(cluster.address, timeout_s=300) as client:
            for prompt, expected in zip(PROMPTS, want):
                got = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
                same = got.token_ids == expected
                ok &= same
                print(f"  [{backend}] {'ok ' if same else 'MISMATCH'} ttft {got.metrics.get('ttft_s', 0) * 1e3:.0f} ms, "
                      f"tpot {got.metrics.get('mean_tpot_s', 0) * 1e3:.1f} ms, {got.prefill_instance} -> "
                      f"{got.decode_instance}: {got.text[:40]!r}")
    finally:
        cluster.stop()
    return ok


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print("serve_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    from engine import LLM, SamplingParams
    llm = LLM(device="cuda", dtype="float32", kv_cache_memory_gb=0.25)
    want = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))]
    del llm
    torch.cuda.empty_cache()
    backends = ["zmq"] + (["torch_dist"] if torch.cuda.device_count() >= 2 else [])
    results = {b: serve_once(b, want) for b in backends}
    print("serve_check:", ", ".join(f"{b} {'ok' if r else 'FAILED'}" for b, r in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
