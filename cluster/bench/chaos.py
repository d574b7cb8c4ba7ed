"""`pdcluster bench chaos`: serving while workers are killed, next to the same run without kills.

A cluster (default: 2 prefill + 2 decode instances, small KV caches) serves a
fixed set of streamed greedy requests of mixed lengths, `--concurrency` at a
time, while a chaos loop SIGKILLs a random live worker every `--kill-every-s`
seconds. Then the same requests run on a fresh cluster with no kills. Reported:

  * time to detect each death (kill -> the pool manager saw Ray report it);
  * the extra TTFT of requests that moved before their first token, and the
    longest gap between two tokens of requests that moved mid-stream, next to
    the same figures of requests that did not move;
  * completed requests, tokens/s and wall time, with and without kills;
  * every request's tokens compared with the undisturbed run (greedy): the
    number that differ must be 0.

The kills are bounded (`--max-kills`, below the cluster's router.migration_limit),
so however slow the machine, no request can run out of moves.

`run_chaos` is also what the CI chaos test runs (tests/integration).
"""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.client import Client
from cluster.config import ClusterConfig, load_config
from cluster.local import Cluster
from router.core import RequestObserver

DEFAULT_CLUSTER = {
    "model": {"dtype": "float32"},   # greedy output compared token for token with the calm run
    "prefill": {"num_instances": 2, "kv_cache_memory_gb": 0.1},
    "decode": {"num_instances": 2, "kv_cache_memory_gb": 0.1},
    "router": {"port": 0, "http_port": 0, "migration_limit": 12, "request_timeout_s": 120, "drain_timeout_s": 5},
    "restart": {"max_restarts": 50, "backoff_s": 0.5},
    "ray": {"address": None, "host": "127.0.0.1"},
}


@dataclass
class RequestRecord:
    index: int
    token_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    max_gap_s: float = 0.0         # longest wait between two streamed tokens
    migrations: int = 0
    first_moved_before_first_token: bool = False
    error: str = ""


@dataclass
class ChaosResult:
    wall_s: float
    records: list[RequestRecord]
    kills: list[dict]               # {name, pid, at_s (from start), detect_s}
    pools_back_to_size: bool

    @property
    def completed(self) -> int:
        return sum(1 for r in self.records if not r.error)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(r.token_ids) for r in self.records) / self.wall_s


def requests_for(tokenizer, num_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Mixed lengths: prompts of 8-160 tokens, 4-40 new tokens, seeded."""
    rng = random.Random(seed)
    words = ["river", "stone", "cloud", "engine", "garden", "signal", "paper", "winter", "copper", "voice"]
    out = []
    for i in range(num_requests):
        n = rng.choice([8, 16, 32, 64, 160])
        text = " ".join(rng.choice(words) for _ in range(n))
        ids = tokenizer.encode(f"Request {i}: {text}")[:n]
        out.append((ids, rng.choice([4, 8, 16, 24, 40])))
    return out


def _one(address: str, index: int, ids: list[int], max_tokens: int, state: dict) -> RequestRecord:
    rec = RequestRecord(index)
    start = last = time.monotonic()
    try:
        with Client(address, timeout_s=300) as client:
            for chunk in client.generate(token_ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                         request_id=f"chaos-{index}"):
                now = time.monotonic()
                if not rec.token_ids:
                    rec.ttft_s = now - start
                    rec.first_moved_before_first_token = state["moved"].get(f"chaos-{index}", 0) > 0
                else:
                    rec.max_gap_s = max(rec.max_gap_s, now - last)
                rec.token_ids.extend(chunk.token_ids)
                last = now
        rec.migrations = state["moved"].get(f"chaos-{index}", 0)
    except Exception as e:   # recorded, not raised: the result counts what did not finish
        rec.error = f"{type(e).__name__}: {e}"
    return rec


class _MoveCounter(RequestObserver):
    """How many times each request moved (read by the client threads)."""

    def __init__(self, moved: dict) -> None:
        self.moved = moved

    def migrated(self, st, why) -> None:
        self.moved[st.req_id] = st.attempt


def run_chaos(cfg: ClusterConfig, requests: list[tuple[list[int], int]], kill_every_s: float | None,
              concurrency: int = 16, seed: int = 0, log=print, max_kills: int = 10) -> ChaosResult:
    """Serve `requests` on a fresh cluster; with `kill_every_s`, SIGKILL a random worker that often,
    `max_kills` times at most (bounded: on a slow machine a request must not meet every kill;
    with router.migration_limit above it, none can run out of moves)."""
    rng = random.Random(seed)
    with Cluster(cfg, log=lambda *_: None) as cluster:
        state = {"moved": {}}
        cluster.router.core.observers.append(_MoveCounter(state["moved"]))
        with Client(cluster.address, timeout_s=120) as c:   # warm up: each pool's first step
            c.complete(token_ids=requests[0][0], max_tokens=2, temperature=0.0)
        kills: list[dict] = []
        done = threading.Event()
        start = time.monotonic()

        def chaos() -> None:
            while len(kills) < max_kills and not done.wait(kill_every_s):
                infos = cluster.infos
                if not infos:
                    continue
                name = rng.choice(sorted(infos))
                pid = infos[name]["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kills.append({"name": name, "pid": pid, "at": time.monotonic()})
                log(f"  killed {name} (pid {pid}) at {time.monotonic() - start:.1f}s")
        killer = threading.Thread(target=chaos, daemon=True) if kill_every_s else None
        if killer is not None:
            killer.start()
        with ThreadPoolExecutor(concurrency) as pool:
            records = list(pool.map(lambda a: _one(cluster.address, a[0], *a[1], state), enumerate(requests)))
        wall = time.monotonic() - start
        done.set()
        if killer is not None:
            killer.join(10)
        back = _wait_back_to_size(cluster, timeout_s=180)
        for k in kills:
            seen = next((d.seen_at for d in cluster.pools.deaths if d.name == k["name"]), None)
            k["detect_s"] = None if seen is None else seen - k["at"]
            k["at_s"] = k.pop("at") - start
    return ChaosResult(wall, records, kills, back)


def _wait_back_to_size(cluster: Cluster, timeout_s: float) -> bool:
    want = {role: pool.num_instances for role, pool in cluster.config.pools().items()}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        have = {role: sum(1 for i in cluster.infos.values() if i["role"] == role) for role in want}
        if have == want:
            return True
        time.sleep(0.2)
    return False


def summarize(chaos: ChaosResult, calm: ChaosResult | None) -> dict:
    def med(xs):
        return round(statistics.median(xs), 3) if xs else None
    recs = chaos.records
    moved_early = [r.ttft_s for r in recs if r.first_moved_before_first_token and not r.error]
    moved_mid = [r.max_gap_s for r in recs if r.migrations and not r.first_moved_before_first_token and not r.error]
    still = [r for r in recs if not r.migrations and not r.error]
    detect = [k["detect_s"] for k in chaos.kills if k["detect_s"] is not None]
    out = {
        "requests": len(recs), "completed": chaos.completed, "kills": len(chaos.kills),
        "moved": sum(1 for r in recs if r.migrations), "pools_back_to_size": chaos.pools_back_to_size,
        "detect_s": {"median": med(detect), "max": round(max(detect), 3) if detect else None},
        "ttft_s": {"moved_before_first_token": med(moved_early), "not_moved": med([r.ttft_s for r in still])},
        "max_token_gap_s": {"moved_mid_stream": med(moved_mid), "not_moved": med([r.max_gap_s for r in still])},
        "with_kills": {"wall_s": round(chaos.wall_s, 1), "tokens_per_s": round(chaos.tokens_per_s, 1)},
    }
    if calm is not None:
        out["without_kills"] = {"wall_s": round(calm.wall_s, 1), "tokens_per_s": round(calm.tokens_per_s, 1),
                                "completed": calm.completed}
        out["token_mismatches"] = sum(1 for a, b in zip(recs, calm.records) if not a.error and a.token_ids != b.token_ids)
    return out


def main(args) -> int:
    from engine.default_model import default_model_path
    from engine.tokenizer import load_tokenizer
    cfg = load_config(args.config, DEFAULT_CLUSTER if args.config is None else {"router": {"port": 0, "http_port": 0}})
    tok = load_tokenizer(cfg.model.path or default_model_path())
    requests = requests_for(tok, args.num_requests, args.seed)
    print(f"chaos: {len(requests)} requests, a kill every {args.kill_every_s}s", flush=True)
    chaos = run_chaos(cfg, requests, args.kill_every_s, args.concurrency, args.seed, max_kills=args.max_kills)
    print("calm: the same requests, no kills", flush=True)
    calm = run_chaos(cfg, requests, None, args.concurrency, args.seed)
    summary = summarize(chaos, calm)
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "kills": chaos.kills,
                                          "records": [asdict(r) for r in chaos.records]}, indent=1))
    return 0 if summary["completed"] == summary["requests"] and not summary.get("token_mismatches") else 1


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="cluster YAML (default: 2 prefill + 2 decode, small caches)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kill-every-s", type=float, default=6.0)
    p.add_argument("--max-kills", type=int, default=10, help="kills at most (keep it below router.migration_limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/chaos.json")
