"""`pdcluster bench results`: the serving benchmark behind docs/results.md (what `make bench` runs).

    pdcluster bench results --out docs/results                 # `make bench`: 12-25 min on the 2-core VMs
    pdcluster bench results --workloads chatbot --scale 0.3 --profile docs/results/profile-cpu.json \\
        --out /tmp/pilot                                       # a pilot on the profile already there
    pdcluster bench results --replay-only --out docs/results   # the simulator replay alone

Three steps, each one's output in `--out`:

1. profile: `pdcluster profile` of this machine into `profile-cpu.json`, unless
   `--profile` names one to reuse. The SLOs and rates are derived from it by
   the rules of cluster/bench/settings.py: the VM's hardware and speed change,
   so fixed settings would measure nothing on a faster machine.
2. sweeps: disaggregated 1P+1D (always, and conditional: each request
   prefilled on the prefill or the decode instance, as its router predicts
   better) against colocated and colocated_chunked (2 instances each), one CPU
   thread per instance, on each workload. Each mode's
   cluster is started once (deploy/bench-*.yaml), warmed up, swept over the
   workload's rates open loop and stopped; `<workload>/` holds serve.json
   (every request), tables.md, attainment.png and latency_cdf.png, and
   `summary.md` the tables of all workloads.
3. replay: the same requests through the planner's simulator, driven by the
   same profile (cluster/bench/replay.py).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cluster.bench.profile import run as make_profile
from cluster.bench.replay import replay_results
from cluster.bench.serve import SweepSpec, run_configs, write_results
from cluster.bench.serve_metrics import SLO, BenchError
from cluster.bench.settings import Setting, describe, settings_for
from cluster.config import load_config
from router.planner.profile import Profile, load_profile
from router.workload import WORKLOADS

CONFIGS = ("deploy/bench-disagg.yaml", "deploy/bench-disagg-conditional.yaml", "deploy/bench-colocated.yaml",
           "deploy/bench-colocated-chunked.yaml")
PROFILE_NAME = "profile-cpu.json"
NUM_BLOCKS = 1456          # KV blocks per instance: 0.5 GB of the default model's cache, as the bench clusters log


def spec_for(workload: str, s: Setting, scale: float = 1.0, seed: int = 0) -> SweepSpec:
    """The sweep of one workload: `scale` multiplies the requests per rate (at least 4) and,
    down to 0.3, the time limit of a rate point."""
    n = max(4, round(s.num_requests * scale))
    return SweepSpec(workload, s.rates, n, SLO(s.ttft_slo_s, s.tpot_slo_s), seed=seed,
                     time_limit_s=s.time_limit_s * max(scale, 0.3), warmup=2)


def sweep_all(out: Path, workloads: list[str], configs: list[str], profile_path: str, profile: Profile,
              scale: float = 1.0, seed: int = 0, progress: bool = True) -> None:
    """Every mode of `configs` swept on each workload at the settings `profile` gives; summary.md."""
    t0 = time.monotonic()
    parts = []
    for wl in workloads:
        setting = settings_for(wl, profile)
        spec = spec_for(wl, setting, scale, seed)
        print(f"=== settings from {profile_path}: {describe(wl, setting)}", flush=True)
        load = os.getloadavg()
        print(f"=== {wl}: rates {list(spec.rates)}, {spec.num_requests} requests each, SLO TTFT "
              f"{spec.slo.ttft_s:g} s / TPOT {spec.slo.tpot_s:g} s; load average {load[0]:.2f}", flush=True)
        # a conditional router weighs its paths against the workload's SLOs on this machine's profile
        conditional = {"conditional": {"ttft_slo_s": spec.slo.ttft_s, "tpot_slo_s": spec.slo.tpot_s,
                                       "profile": profile_path}}
        modes = run_configs(configs, spec, progress=progress, overrides=conditional)
        write_results(str(out / wl), spec, modes, load, setting.cdf_rate)
        parts.append((out / wl / "tables.md").read_text())
        print(f"=== {wl} done at {time.monotonic() - t0:.0f} s", flush=True)
    (out / "summary.md").write_text("\n".join(parts))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="docs/results", help="results directory (default: %(default)s)")
    p.add_argument("--workloads", default="summarization,chatbot", help="comma-separated (default: %(default)s)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated cluster YAMLs, one mode each")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the requests per rate (pilots)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None,
                   help=f"reuse this profile JSON instead of measuring one into OUT/{PROFILE_NAME}")
    p.add_argument("--num-blocks", type=int, default=NUM_BLOCKS, help="the simulator's KV blocks per instance")
    p.add_argument("--replay-only", action="store_true",
                   help="no profile, no sweeps: replay the serve.json files already in OUT through the simulator")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise BenchError(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
    if args.scale <= 0:
        raise BenchError(f"--scale must be > 0, got {args.scale:g}")
    configs = [c for c in args.configs.split(",") if c]
    if not args.replay_only:
        for path in configs:           # a bad config fails now, not after the profile's minutes
            load_config(path)
    out = Path(args.out)
    t0 = time.monotonic()
    profile_path = args.profile or str(out / PROFILE_NAME)
    if args.profile or args.replay_only:
        if not Path(profile_path).is_file():
            raise BenchError(f"no profile at {profile_path}: run `pdcluster profile --out {profile_path}`, "
                             "or leave out --profile (and --replay-only) to measure one")
    else:
        print(f"=== profile: measuring this machine into {profile_path}", flush=True)
        make_profile(out=profile_path)
    profile = load_profile(profile_path)
    if not args.replay_only:
        sweep_all(out, workloads, configs, profile_path, profile, args.scale, args.seed, not args.no_progress)
    print(f"=== replay through the simulator, profile {profile_path}", flush=True)
    parts = replay_results(str(out), workloads, profile_path, profile, args.num_blocks,
                           log=lambda m: print(m, flush=True))
    if not parts:
        raise BenchError(f"nothing to replay: no <workload>/serve.json in {out}")
    written = "simulated.md" if args.replay_only else "summary.md and simulated.md"
    print(f"wrote {written} in {out} after {time.monotonic() - t0:.0f} s")
    return 0
