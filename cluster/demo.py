"""`make demo` / `pdcluster demo`: a real local cluster answering a few chat prompts.

Starts Ray on 127.0.0.1, one prefill and one decode worker of the default
model (deploy/local.yaml) and the router; streams each answer through the
gRPC client SDK (the router applies the chat template); prints each
request's TTFT, TPOT and phase timings; shuts everything down.
"""
from __future__ import annotations

import os
import time

from cluster.client import Client
from cluster.config import load_config
from cluster.local import Cluster
from cluster.serve import describe, stream_answer

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Write a haiku about autumn.",
    "Explain in one sentence what a GPU is.",
]
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "local.yaml")


def main(max_tokens: int = 48, config_path: str | None = None) -> int:
    path = config_path or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    cfg = load_config(path, {"router": {"port": 0, "http_port": 0}, "ray": {"address": None}})
    start = time.monotonic()
    with Cluster(cfg) as cluster, Client(cluster.address) as client:
        print(f"cluster up in {time.monotonic() - start:.1f}s\n", flush=True)
        for question in DEMO_PROMPTS:
            print(f"> {question}", flush=True)
            r = stream_answer(client, messages=[{"role": "user", "content": question}],
                              max_tokens=max_tokens, temperature=0.0)
            print(f"\n  {describe(r)}\n", flush=True)
        print("shutting down ...", flush=True)
    print("done", flush=True)
    return 0
