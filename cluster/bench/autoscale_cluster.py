"""`pdcluster bench autoscale --where cluster`: a stepped load through the real cluster, scaled down.

The shape of the GPU-scale run (`--where sim`), on this machine: chatbot-length
requests arrive open loop at `--low-rate`, then 3x (`--high-rate`), then the low
rate again, a third of `--duration-s` each, through a cluster whose pools
autoscale (`--config`, default: the `load` policy, 1-2 instances per pool,
one CPU thread each). The same requests then run through a static cluster
sized for the peak. Reported side by side: SLO attainment, instance-seconds
(instances alive, loading and draining included, sampled every 0.25 s), and
for the autoscaled run every scaling event with the scale-up reaction time
(decision -> model loaded -> first request given).
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

from cluster.bench.serve import PromptMaker, run_point
from cluster.bench.serve_metrics import SLO, summarize
from cluster.client import AsyncClient
from cluster.config import ClusterConfig, load_config
from cluster.local import Cluster
from engine.default_model import default_model_path
from router.workload import RequestSpec, get_workload

DEFAULT_SCALING = {
    "model": {"dtype": "bfloat16"},
    "prefill": {"num_instances": 1, "kv_cache_memory_gb": 0.3},
    "decode": {"num_instances": 1, "kv_cache_memory_gb": 0.3},
    "router": {"port": 0, "http_port": 0, "drain_timeout_s": 5},
    "ray": {"address": None, "host": "127.0.0.1"},
    "autoscaling": {
        "policy": "load", "interval_s": 2.0, "window_s": 10.0,
        "prefill": {"min_instances": 1, "max_instances": 2, "upscale_delay_s": 2.0, "downscale_delay_s": 10.0},
        "decode": {"min_instances": 1, "max_instances": 2, "upscale_delay_s": 2.0, "downscale_delay_s": 10.0},
        "queued_tokens_high": 400, "queued_tokens_low": 50, "kv_use_high": 0.2, "kv_use_low": 0.08,
    },
}


# the trace and SLOs on this machine unless given: chatbot lengths, 1 -> 3 -> 1 req/s over two
# minutes, a TTFT SLO of 1.5 s and a TPOT SLO of 100 ms
CLUSTER_DEFAULTS = {"duration_s": 120.0, "low_rate": 1.0, "high_rate": 3.0, "ttft_slo": 1.5, "tpot_slo": 0.1}


def step_trace(low: float, high: float, duration_s: float, seed: int = 0) -> list[RequestSpec]:
    """Poisson arrivals at low, high, low rate (a third of the time each), chatbot lengths."""
    rng = random.Random(seed)
    lengths = get_workload("chatbot")
    out, t, third = [], 0.0, duration_s / 3
    while True:
        rate = high if third <= t < 2 * third else low
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(RequestSpec(t, lengths.prompt.sample(rng), lengths.output.sample(rng)))


class InstanceClock:
    """Integrates instances alive (loading and draining included) over time, by pool."""

    def __init__(self, cluster: Cluster, every_s: float = 0.25) -> None:
        self.cluster, self.every_s = cluster, every_s
        self.seconds: dict[str, float] = {}
        self.series: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            counts: dict[str, int] = {}
            for inst in list(self.cluster.pools.instances.values()):
                counts[inst.role] = counts.get(inst.role, 0) + 1
            self.series.append((round(time.monotonic() - self.t0, 2), counts))
            for role, n in counts.items():
                self.seconds[role] = self.seconds.get(role, 0.0) + n * self.every_s

    def __enter__(self) -> InstanceClock:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_once(cfg: ClusterConfig, specs: list[RequestSpec], slo: SLO, label: str, log=print) -> dict:
    with Cluster(cfg, log=lambda *_: None) as cluster:
        prompts = PromptMaker.for_model(cluster.config.model.path or default_model_path())

        async def go():
            async with AsyncClient(cluster.address) as client:
                await client.complete(token_ids=prompts.ids(32, -1), max_tokens=4, temperature=0.0)   # warm up
                return await run_point(client, specs, prompts, specs[-1].arrival_s + 120, desc=label)
        with InstanceClock(cluster) as clock:
            results, duration = asyncio.run(go())
        out = {"label": label, "summary": summarize(results, slo, len(specs) / specs[-1].arrival_s, duration),
               "instance_seconds": {r: round(s, 1) for r, s in clock.seconds.items()},
               "instances_over_time": clock.series}
        scaler = cluster.autoscaler
        if scaler is not None:
            out["events"] = [e.as_dict(clock.t0) for e in scaler.events]
            reactions = [e.first_work_at[n] - e.at for e in scaler.events if e.change > 0 for n in e.first_work_at]
            out["scale_up_reaction_s"] = [round(r, 2) for r in reactions]
    log(f"{label}: attainment {out['summary']['attainment']:.0%}, instance-seconds {out['instance_seconds']}")
    return out


def main(args) -> int:
    for name, value in CLUSTER_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    base = load_config(args.config) if args.config else load_config(None, DEFAULT_SCALING)
    base = base.replace(router={"port": 0, "http_port": 0}, ray={"address": None})
    specs = step_trace(args.low_rate, args.high_rate, args.duration_s, args.seed)
    slo = SLO(args.ttft_slo, args.tpot_slo)
    print(f"autoscale (cluster): {len(specs)} requests over {args.duration_s:.0f}s, "
          f"{args.low_rate} -> {args.high_rate} -> {args.low_rate} req/s, SLO TTFT {slo.ttft_s}s TPOT {slo.tpot_s}s")
    scaled = run_once(base, specs, slo, "autoscaled")
    peak = {role: base.autoscaling.bounds(role).max_instances for role in base.pools()}
    static = base.replace(autoscaling={"policy": "none"}, **{r: {"num_instances": n} for r, n in peak.items()})
    fixed = run_once(static, specs, slo, "static-peak")
    report = {"trace": {"low_rate": args.low_rate, "high_rate": args.high_rate, "duration_s": args.duration_s,
                        "num_requests": len(specs)}, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
              "runs": [scaled, fixed]}
    a, b = sum(scaled["instance_seconds"].values()), sum(fixed["instance_seconds"].values())
    report["instance_seconds_ratio"] = round(a / b, 3) if b else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("trace", "slo", "instance_seconds_ratio")}, indent=1))
    return 0
