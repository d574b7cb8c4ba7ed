"""Reproduce the measurements of docs/results.md: disaggregated 1P+1D against colocated and
colocated_chunked (2 instances each), one CPU thread per instance, on `chatbot` and `summarization`.

    .venv/bin/python benchmarks/run_results.py            # what `make bench` runs (~20 min)
    .venv/bin/python benchmarks/run_results.py --workloads chatbot --scale 0.3 --out /tmp/pilot

For each workload, each mode's cluster is started once (deploy/bench-*.yaml),
warmed up, swept over the workload's rates open loop and stopped; then
`<out>/<workload>/` holds serve.json (every request), tables.md, attainment.png
and latency_cdf.png, and `<out>/summary.md` the tables of all workloads. The
SLOs are this machine's (see SETTINGS and docs/results.md for how they were
chosen). Afterwards benchmarks/simulate_results.py replays the same requests
through the planner's simulator.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.serve import SweepSpec, run_configs, write_results  # noqa: E402
from cluster.bench.serve_metrics import SLO  # noqa: E402

CONFIGS = ("deploy/bench-disagg.yaml", "deploy/bench-colocated.yaml", "deploy/bench-colocated-chunked.yaml")


@dataclass(frozen=True)
class Setting:
    rates: tuple[float, ...]
    num_requests: int
    ttft_slo_s: float
    tpot_slo_s: float
    time_limit_s: float      # per rate point: the arrivals' span fits, plus a bounded drain
    cdf_rate: float          # the rate whose latency distributions are plotted (where the modes part)


# SLOs (docs/results.md, "SLOs"), from single requests through this cluster on this machine:
# TTFT ~2x the TTFT alone of the workload's 90th-percentile prompt (the target is 90%, so that
# prompt must be servable): chatbot 535 tokens, ~1.2 s alone -> 2.5 s; summarization 802
# tokens, ~2 s alone -> 4 s. TPOT ~2x the decode step at the batch the workload runs at:
# chatbot (batches of ~4-8, 60-80 ms) 150 ms; summarization (batches of 1-2 over ~512 tokens
# of context, ~57 ms) 100 ms.
SETTINGS = {
    "chatbot": Setting(rates=(0.5, 1.0, 1.5, 2.0), num_requests=24, ttft_slo_s=2.5, tpot_slo_s=0.15,
                       time_limit_s=90.0, cdf_rate=1.0),
    "summarization": Setting(rates=(0.25, 0.5, 0.75, 1.0), num_requests=20, ttft_slo_s=4.0, tpot_slo_s=0.1,
                             time_limit_s=110.0, cdf_rate=0.5),
}


def spec_for(workload: str, scale: float = 1.0, seed: int = 0) -> SweepSpec:
    s = SETTINGS[workload]
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
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in SETTINGS]
    if unknown:
        p.error(f"no settings for workloads {unknown}; known: {sorted(SETTINGS)}")
    configs = [c for c in args.configs.split(",") if c]
    t0 = time.monotonic()
    parts = []
    for wl in workloads:
        spec = spec_for(wl, args.scale, args.seed)
        load = os.getloadavg()
        print(f"=== {wl}: rates {list(spec.rates)}, {spec.num_requests} requests each, SLO TTFT "
              f"{spec.slo.ttft_s:g} s / TPOT {spec.slo.tpot_s:g} s; load average {load[0]:.2f}", flush=True)
        modes = run_configs(configs, spec, progress=not args.no_progress)
        write_results(str(Path(args.out) / wl), spec, modes, load, SETTINGS[wl].cdf_rate)
        parts.append((Path(args.out) / wl / "tables.md").read_text())
        print(f"=== {wl} done at {time.monotonic() - t0:.0f} s", flush=True)
    (Path(args.out) / "summary.md").write_text("\n".join(parts))
    print(f"wrote {args.out}/summary.md after {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
