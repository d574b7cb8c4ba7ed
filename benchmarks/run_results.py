"""Reproduce the measurements of docs/results.md: disaggregated 1P+1D against colocated and
colocated_chunked (2 instances each), one CPU thread per instance, on `chatbot` and `summarization`.

    .venv/bin/python benchmarks/run_results.py            # what `make bench` runs (12-23 min)
    .venv/bin/python benchmarks/run_results.py --workloads chatbot --scale 0.3 --out /tmp/pilot

For each workload, each mode's cluster is started once (deploy/bench-*.yaml),
warmed up, swept over the workload's rates open loop and stopped; then
`<out>/<workload>/` holds serve.json (every request), tables.md, attainment.png
and latency_cdf.png, and `<out>/summary.md` the tables of all workloads. The
SLOs and rates are this machine's: derived from its profile (`--profile`, which
`make bench` measures first) by the rules of benchmarks/bench_settings.py.
Afterwards benchmarks/simulate_results.py replays the same requests through the
planner's simulator.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.serve import SweepSpec, run_configs, write_results  # noqa: E402
from benchmarks.bench_settings import Setting, describe, settings_for  # noqa: E402
from cluster.bench.serve_metrics import SLO  # noqa: E402
from router.workload import WORKLOADS  # noqa: E402

CONFIGS = ("deploy/bench-disagg.yaml", "deploy/bench-colocated.yaml", "deploy/bench-colocated-chunked.yaml")


def spec_for(workload: str, s: Setting, scale: float = 1.0, seed: int = 0) -> SweepSpec:
    n = max(4, round(s.num_requests * scale))
    return SweepSpec(workload, s.rates, n, SLO(s.ttft_slo_s, s.tpot_slo_s), seed=seed,
                     time_limit_s=s.time_limit_s * max(scale, 0.3), warmup=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results")
    p.add_argument("--workloads", default="summarization,chatbot")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated cluster YAMLs, one mode each")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the requests per rate (pilots)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="docs/results/profile-cpu.json",
                   help="this machine's profile (`pdcluster profile`): the SLOs and rates are derived from it")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; known: {sorted(WORKLOADS)}")
    if not Path(args.profile).is_file():
        p.error(f"no profile at {args.profile}: run `pdcluster profile --out {args.profile}` first")
    from router.planner.profile import load_profile
    profile = load_profile(args.profile)
    configs = [c for c in args.configs.split(",") if c]
    t0 = time.monotonic()
    parts = []
    for wl in workloads:
        setting = settings_for(wl, profile)
        spec = spec_for(wl, setting, args.scale, args.seed)
        print(f"=== settings from {args.profile}: {describe(wl, setting)}", flush=True)
        load = os.getloadavg()
        print(f"=== {wl}: rates {list(spec.rates)}, {spec.num_requests} requests each, SLO TTFT "
              f"{spec.slo.ttft_s:g} s / TPOT {spec.slo.tpot_s:g} s; load average {load[0]:.2f}", flush=True)
        modes = run_configs(configs, spec, progress=not args.no_progress)
        write_results(str(Path(args.out) / wl), spec, modes, load, setting.cdf_rate)
        parts.append((Path(args.out) / wl / "tables.md").read_text())
        print(f"=== {wl} done at {time.monotonic() - t0:.0f} s", flush=True)
    (Path(args.out) / "summary.md").write_text("\n".join(parts))
    print(f"wrote {args.out}/summary.md after {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
