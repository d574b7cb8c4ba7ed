"""`pdcluster bench cpu-share`: where the two cores go while a cluster serves, CPU seconds per
process over one rate point.

    pdcluster bench cpu-share --config deploy/bench-disagg.yaml --workload summarization \
        --rate 1.8 --num-requests 24

Starts the cluster (127.0.0.1), warms it up, then serves one open-loop point of the named
workload (the serving benchmark's requests, seed 0) and reads every process's user + system
CPU time from /proc before and after. Prints the busiest processes as cores (CPU seconds per
wall second): the workers (`ray::WorkerActor`), this process (the gRPC router and the load
generator), Ray's own daemons. Also the median ratio of each request's prefill time, as the
prefill worker reports it, to the prefill time of the latency profile given (`--profile`).
Linux only.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from cluster.bench.serve import PromptMaker, SweepSpec, run_point, wait_idle, warm_up
from cluster.bench.serve_metrics import SLO, BenchError
from cluster.client import AsyncClient
from cluster.config import load_config
from cluster.local import Cluster
from engine.default_model import default_model_path
from router.planner.profile import load_profile
from router.workload import WORKLOADS


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """{pid: (user + system CPU seconds, command line)} of every process now."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = cmd or stat[stat.index("(") + 1:stat.rindex(")")]   # kernel threads have no command line
        out[int(p.name)] = ((int(fields[11]) + int(fields[12])) / tick, name)
    return out


async def serve_point(address: str, args: argparse.Namespace) -> tuple[list, float, list]:
    """(the requests' results, wall seconds, [(cores, pid, command line)] busiest first) of one
    open-loop rate point, after a warm-up."""
    spec = SweepSpec(args.workload, (args.rate,), args.num_requests, SLO(1e9, 1e9), seed=0)
    prompts = PromptMaker.for_model(default_model_path(), spec.seed)
    client = AsyncClient(address)
    try:
        await warm_up(client, spec, prompts)
        await wait_idle(client)
        before, t0 = cpu_seconds(), time.monotonic()
        results, _ = await run_point(client, spec.requests(args.rate), prompts, args.time_limit, False,
                                     f"{args.workload} @ {args.rate:g} req/s")
        wall, after = time.monotonic() - t0, cpu_seconds()
    finally:
        await client.close()
    rows = sorted(((after[pid][0] - before[pid][0]) / wall, pid, after[pid][1]) for pid in after if pid in before)
    return results, wall, rows[::-1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="deploy/bench-disagg.yaml")
    p.add_argument("--workload", default="summarization", choices=sorted(WORKLOADS))
    p.add_argument("--rate", type=float, default=1.8, help="req/s")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds for the rate point")
    p.add_argument("--profile", default="docs/results/profile-cpu.json",
                   help="the profile whose prefill time each request's is compared with")
    p.add_argument("--top", type=int, default=6, help="processes listed")


def main(args: argparse.Namespace) -> int:
    if not Path("/proc/self/stat").exists():
        raise BenchError("bench cpu-share reads /proc: Linux only")
    profile = load_profile(args.profile)       # a bad path fails before the cluster starts
    with Cluster(load_config(args.config, {"router": {"port": 0, "http_port": 0}}),
                 log=lambda m: None) as cluster:
        results, wall, rows = asyncio.run(serve_point(cluster.address, args))
    print(f"{args.config}, {args.workload} at {args.rate:g} req/s, {args.num_requests} requests, "
          f"{wall:.1f} s: CPU per process, in cores")
    for share, pid, cmd in rows[:args.top]:
        print(f"  {share:5.2f}  {pid:>7}  {cmd[:80]}")
    print(f"  {sum(r[0] for r in rows):5.2f}  all processes")
    prefill = profile.latency(1, 1).prefill
    ratios = [r.timings["prefill_s"] / prefill(r.prompt_tokens, r.prompt_tokens ** 2)
              for r in results if r.timings and r.timings.get("prefill_s")]
    if ratios:
        print(f"prefill time over the profile's ({args.profile}): median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} requests")
    return 0
