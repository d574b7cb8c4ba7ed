"""The serving benchmark's requests replayed through the planner's simulator, next to the measurement.

For each workload measured by `pdcluster bench results` (its serve.json) and
each mode in it, the *same requests* (same seed, lengths and arrival times at
every swept rate) go through `router.planner.simulator.simulate` with the
cluster's own settings (instances, batch limits, chunk budget, KV blocks),
driven by a latency profile measured on this machine (`pdcluster profile`).
Writes `<results>/<workload>/simulated.json`, `simulated.md` and
`attainment_sim.png` (measured solid, simulated dashed), and
`<results>/simulated.md`. The simulator also gets its own goodput by bisection
over a longer run (400 requests). `pdcluster bench results` runs this after its
sweeps (`--replay-only`: on the serve.json already there); the fidelity check
(fidelity.py) sets up its simulator the same way (`sim_setup`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from cluster.bench.profile import run as make_profile
from cluster.bench.serve import SweepSpec
from cluster.bench.serve_metrics import SLO, goodput, goodput_interpolated
from cluster.config import load_config
from router.planner.goodput import at_rate, unit_rate_requests
from router.planner.goodput import goodput as sim_goodput
from router.planner.profile import Profile, load_profile
from router.planner.simulator import NEVER, PoolSpec, SimConfig, simulate

SHM_GB_S = 2.0            # zero-copy shm at a few MB per prompt (docs/benchmarks.md: 1-6 GB/s)
LONG_RUN_REQUESTS = 400


PROFILES = ("bench-results/profile-cpu.json", "router/planner/profiles/smollm2-135m-cpu.json")


def load_or_make_profile(path: str | None) -> tuple[str, Profile]:
    """(path, profile): the one at `path`; without a path, the first of PROFILES that exists;
    where there is no file, one is measured there now (`pdcluster profile`)."""
    if path is None:
        path = next((p for p in PROFILES if Path(p).exists()), PROFILES[0])
    if not Path(path).exists():
        print(f"no profile at {path}: measuring one (pdcluster profile)", flush=True)
        make_profile(out=path)
    return path, load_profile(path)


def sim_setup(config_path: str, num_blocks: int | None, slo: SLO | None = None):
    """(mode, pools as simulate() keyword arguments, SimConfig) for a bench cluster config.

    A disaggregated config whose decode instances prefill too (router.disaggregation conditional
    or never) is simulated in that mode, its local chunk and the SLOs its router weighs taken from
    the config's `conditional:` section, or `slo` where given (`pdcluster bench results` hands the
    router the workload's SLOs). The policy's latency is the profile the simulation is run with.
    Prefix caching is on where any pool of the mode has it (the simulator has one switch)."""
    cfg = load_config(config_path)
    mode = getattr(cfg, "mode", "disaggregated")
    if mode == "disaggregated":
        if cfg.router.disaggregation != "always":
            mode = cfg.router.disaggregation    # the simulator's mode of that name
        pools = {"prefill": PoolSpec(1, 1, cfg.prefill.num_instances),
                 "decode": PoolSpec(1, 1, cfg.decode.num_instances)}
        if mode == NEVER:                       # its prefill pool takes no work
            del pools["prefill"]
        pool, budget = cfg.decode, cfg.prefill.max_num_batched_tokens
        chunk = budget
        caching = cfg.decode.enable_prefix_caching or (mode != NEVER and cfg.prefill.enable_prefix_caching)
    else:
        pools = {"colocated": PoolSpec(1, 1, cfg.colocated.num_instances)}
        pool, budget = cfg.colocated, cfg.colocated.budget("colocated")
        chunk = cfg.colocated.budget(mode)
        caching = cfg.colocated.enable_prefix_caching
    capacity = num_blocks * pool.block_size if num_blocks else None
    c = cfg.conditional
    config = SimConfig(max_num_batched_tokens=budget, max_num_seqs=pool.max_num_seqs, chunk_budget=chunk,
                       block_size=pool.block_size, transfer_gb_s=SHM_GB_S, kv_capacity_tokens=capacity,
                       prefix_caching=caching, local_chunk_tokens=c.local_prefill_tokens,
                       conditional_ttft_slo_s=slo.ttft_s if slo else c.ttft_slo_s,
                       conditional_tpot_slo_s=slo.tpot_s if slo else c.tpot_slo_s)
    return mode, pools, config


def replay(result: dict, profile: Profile, num_blocks: int | None) -> list[dict]:
    """Per mode of one workload's serve.json: simulated attainment at every measured rate, the
    goodputs, and the measured figures beside them."""
    slo, target = SLO(**result["slo"]), result["target"]
    spec = SweepSpec(result["workload"], tuple(result["rates"]), result["num_requests"], slo,
                     burstiness=result["burstiness"], seed=result["seed"])
    out = []
    for m in result["modes"]:
        mode, pools, config = sim_setup(m["config"], num_blocks, slo)

        def attain(specs) -> tuple[float, float, float]:
            rs = simulate(mode, profile, specs, config=config, **pools)
            ok = [r.ttft_s <= slo.ttft_s and r.tpot_s <= slo.tpot_s for r in rs]
            return (sum(ok) / len(rs), sum(r.ttft_s <= slo.ttft_s for r in rs) / len(rs),
                    sum(r.tpot_s <= slo.tpot_s for r in rs) / len(rs))

        points = []
        for p in m["points"]:
            a, a_ttft, a_tpot = attain(spec.requests(p["rate"]))
            points.append({"rate": p["rate"], "attainment": a, "ttft_attainment": a_ttft,
                           "tpot_attainment": a_tpot, "measured_attainment": p["attainment"]})
        pairs = [(p["rate"], p["attainment"]) for p in points]
        unit = unit_rate_requests(spec.workload, LONG_RUN_REQUESTS, seed=spec.seed, burstiness=spec.burstiness,
                                  max_total_tokens=spec.max_total_tokens)
        long_run = sim_goodput(lambda r: attain(at_rate(unit, r))[0], target=target,
                               start_rate=max(result["rates"]) / 2)
        out.append({"label": m["label"], "config": m["config"], "points": points,
                    "goodput": goodput(pairs, target), "goodput_interpolated": goodput_interpolated(pairs, target),
                    "goodput_long_run": long_run.rate,
                    "measured_goodput": m["goodput"], "measured_goodput_interpolated": m["goodput_interpolated"]})
    return out


def markdown(result: dict, sim: list[dict], profile_path: str) -> str:
    lines = [f"### {result['workload']}: simulated (profile `{profile_path}`) next to measured", "",
             "| mode | goodput measured | simulated, same requests | simulated, interpolated | "
             f"simulated, {LONG_RUN_REQUESTS} requests (bisection) |", "|---|---|---|---|---|"]
    for s in sim:
        lines.append(f"| {s['label']} | {s['measured_goodput']:g} ({s['measured_goodput_interpolated']:.2f}) | "
                     f"{s['goodput']:g} | {s['goodput_interpolated']:.2f} | {s['goodput_long_run']:.2f} |")
    rates = sorted({p["rate"] for s in sim for p in s["points"]})
    lines += ["", "Attainment per rate, measured / simulated:", "",
              "| rate | " + " | ".join(s["label"] for s in sim) + " |", "|---|" + "---|" * len(sim)]
    for rate in rates:
        cells = []
        for s in sim:
            p = next((p for p in s["points"] if p["rate"] == rate), None)
            cells.append("–" if p is None else f"{p['measured_attainment']:.0%} / {p['attainment']:.0%}")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replay_results(results_dir: str, workloads: Sequence[str], profile_path: str, profile: Profile,
                   num_blocks: int | None, log: Callable[[str], None] = print) -> list[str]:
    """Replay every workload's `<results_dir>/<workload>/serve.json` (those present); write the
    files named above; the markdown of each workload replayed."""
    from cluster.bench.plots import plot_measured_vs_simulated   # light start-up: matplotlib
    parts = []
    for wl in workloads:
        path = Path(results_dir) / wl / "serve.json"
        if not path.exists():
            log(f"skip {wl}: no {path} (the sweeps of `pdcluster bench results` write it)")
            continue
        result = json.loads(path.read_text())
        sim = replay(result, profile, num_blocks)
        out = path.parent
        (out / "simulated.json").write_text(json.dumps({"profile": profile_path, "modes": sim}, indent=1))
        md = markdown(result, sim, profile_path)
        (out / "simulated.md").write_text(md)
        plot_measured_vs_simulated(result["modes"], sim, result["target"], str(out / "attainment_sim.png"),
                                   f"{wl}: measured (solid) and simulated (dashed)")
        parts.append(md)
        log(md)
    if parts:
        (Path(results_dir) / "simulated.md").write_text("\n".join(parts))
    return parts
