"""`pdcluster bench autoscale`: autoscaled pools against static pools sized for the peak and the mean.

    pdcluster bench autoscale                       # --where sim: GPU scale, in the planner's simulator
    pdcluster bench autoscale --where cluster --config deploy/autoscale.yaml --duration-s 240 \\
        --low-rate 0.5 --high-rate 1.5              # the real cluster on this machine

--where sim runs the 13B A100 profile (router/planner/profiles/llama13b-a100-80g.json) with each
pool's plan from deploy/plans/llama13b-a100-80g-chatbot.yaml (prefill tp4, decode tp1, KV over
the intra-node link as the plan's low-affinity placement has it) and a 4 x 8 GPU budget
(max_total_instances = 32 ranks), on two traces (cluster/bench/autoscale_traces.py): a rate
that steps 3x up and back down, and a bursty trace written in BurstGPT's layout. Per trace,
three clusters serve the same requests in router/planner/elastic.py's simulation:

  * autoscaled: the `slo` policy (router/autoscale.py) every --interval-s, starting from the
    static-mean pools; an added instance loads its model for --startup-s before it takes work;
  * static-peak / static-mean: the fewest instances per pool whose joint SLO attainment is
    >= 90% (the plan file's target) at the trace's peak / mean rate, found with the same
    simulator on the trace's lengths and burstiness.

Reported: SLO attainment (both SLOs, per request), GPU-hours (ranks x time each instance holds
its GPUs, start-up and draining included, to the end of the run), every scaling event; the
target: autoscaled attainment within 5 points of static-peak at <= 70% of its GPU-hours.
Output in --out: autoscale.json, autoscale.md, <trace>.png and bursty-trace.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cluster.bench.autoscale_traces import Trace, bursty_trace, rate_series, step_trace
from cluster.bench.serve_metrics import BenchError
from router.planner.goodput import attainment
from router.planner.profile import Profile
from router.planner.simulator import PoolSpec, SimConfig, simulate
from router.workload import RequestSpec, get_workload, sample_requests

PROFILE = "router/planner/profiles/llama13b-a100-80g.json"
PLAN = "deploy/plans/llama13b-a100-80g-chatbot.yaml"
TARGET = 0.9                # attainment the static clusters are sized for (the plan file's target)
SIZING_S = 120.0            # seconds of constant-rate requests a static size is judged on
BIN_S = 30.0                # the plots' and the per-window attainment's bins
SIM_TTFT_SLO_S, SIM_TPOT_SLO_S = 0.25, 0.1   # the 13B plan's SLOs (docs/planner.md)


@dataclass(frozen=True)
class Setup:
    profile: Profile
    prefill: PoolSpec        # the plan of one instance (num_instances 1)
    decode: PoolSpec
    sim: SimConfig
    ttft_s: float
    tpot_s: float
    budget_ranks: int


# -- static sizes ---------------------------------------------------------------------------------
def _ok(results, ttft: float, tpot: float) -> bool:
    return attainment(results, ttft, tpot) >= TARGET


def fewest_static(s: Setup, requests: list[RequestSpec]) -> tuple[int, int]:
    """The fewest prefill and decode instances meeting the SLOs on `requests` (joint attainment >=
    TARGET): each phase alone first, then the phase that misses grows, within the budget."""
    max_p = s.budget_ranks // (s.prefill.tp * s.prefill.pp)
    n_p = next((n for n in range(1, max_p + 1)
                if _ok(simulate("prefill_only", s.profile, requests, prefill=replace(s.prefill, num_instances=n),
                                config=s.sim), s.ttft_s, 1e9)), max_p)
    max_d = (s.budget_ranks - n_p * s.prefill.tp * s.prefill.pp) // (s.decode.tp * s.decode.pp)
    n_d = next((n for n in range(1, max_d + 1)
                if _ok(simulate("decode_only", s.profile, requests, decode=replace(s.decode, num_instances=n),
                                config=s.sim), 1e9, s.tpot_s)), max_d)
    while ranks(s, n_p, n_d) <= s.budget_ranks:
        res = simulate("disaggregated", s.profile, requests, prefill=replace(s.prefill, num_instances=n_p),
                       decode=replace(s.decode, num_instances=n_d), config=s.sim)
        if _ok(res, s.ttft_s, s.tpot_s):
            return n_p, n_d
        if attainment(res, s.ttft_s, 1e9) < TARGET:
            n_p += 1
        else:
            n_d += 1
    raise BenchError(f"no static cluster within {s.budget_ranks} ranks meets the SLOs on these requests: "
                     "lower the rate")


def ranks(s: Setup, n_p: int, n_d: int) -> int:
    return n_p * s.prefill.tp * s.prefill.pp + n_d * s.decode.tp * s.decode.pp


def sizing_requests(trace: Trace, rate: float, workload: str, seed: int) -> list[RequestSpec]:
    """SIZING_S of arrivals at `rate`, gaps as bursty as the trace's, its workload's lengths."""
    return sample_requests(workload, rate, max(200, int(rate * SIZING_S)), seed=seed + 7,
                           burstiness=trace.burstiness)


# -- one trace, three clusters ----------------------------------------------------------------------
def _cluster_record(name: str, run, trace: Trace, s: Setup, sizes: tuple[int, int] | None) -> dict:
    res = run.results
    return {
        "cluster": name,
        "prefill": sizes[0] if sizes else None, "decode": sizes[1] if sizes else None,
        "ranks": ranks(s, *sizes) if sizes else None,
        "attainment": attainment(res, s.ttft_s, s.tpot_s),
        "ttft_attainment": attainment(res, s.ttft_s, 1e9),
        "tpot_attainment": attainment(res, 1e9, s.tpot_s),
        "gpu_hours": run.gpu_seconds / 3600, "instance_hours": run.instance_seconds / 3600,
        "end_s": run.end_s, "num_moved": run.num_moved, "decisions": run.decisions,
        "window_attainment": window_attainment(res, trace.duration_s, s.ttft_s, s.tpot_s),
        "gpus_over_time": [gpus_at(run, s, t) for t in _grid(trace)],
    }


def window_attainment(results, duration_s: float, ttft: float, tpot: float) -> list[float | None]:
    """Joint attainment of the requests arriving in each BIN_S window (None: no arrivals)."""
    n = max(1, int(-(-duration_s // BIN_S)))
    ok, total = [0] * n, [0] * n
    for r in results:
        i = min(n - 1, int(r.arrival_s // BIN_S))
        total[i] += 1
        ok[i] += r.ttft_s <= ttft and r.tpot_s <= tpot
    return [o / t if t else None for o, t in zip(ok, total)]


def _grid(trace: Trace) -> list[float]:
    return [i * BIN_S / 3 for i in range(int(trace.duration_s // (BIN_S / 3)) + 1)]


def gpus_at(run, s: Setup, t: float) -> int:
    sizes = run.pool_sizes(t)
    return ranks(s, sizes["prefill"], sizes["decode"])


def run_trace(trace: Trace, s: Setup, settings, make_policy, startup_s: float, workload: str, seed: int,
              log) -> dict:
    """Static-peak, static-mean and autoscaled on one trace: a dict for the JSON."""
    from router.autoscale import make_policy as fixed_policy
    from router.planner.elastic import simulate_elastic
    from cluster.config import AutoscalingConfig

    t0 = time.monotonic()
    sizes = {name: fewest_static(s, sizing_requests(trace, rate, workload, seed))
             for name, rate in (("static-peak", trace.peak_rate), ("static-mean", trace.mean_rate))}
    log(f"  sizes: static-peak {sizes['static-peak']} at {trace.peak_rate:.1f} req/s, static-mean "
        f"{sizes['static-mean']} at {trace.mean_rate:.1f} req/s ({time.monotonic() - t0:.0f} s)")
    out = {"trace": trace.name, "source": trace.source, "num_requests": len(trace.requests),
           "duration_s": trace.duration_s, "mean_rate": trace.mean_rate, "peak_rate": trace.peak_rate,
           "segments": trace.segments, "rate_series": rate_series(trace.requests, trace.duration_s, BIN_S),
           "grid_s": _grid(trace), "clusters": []}
    for name, (n_p, n_d) in sizes.items():
        t1 = time.monotonic()
        run = simulate_elastic(s.profile, trace.requests, fixed_policy(AutoscalingConfig()),
                               replace(s.prefill, num_instances=n_p), replace(s.decode, num_instances=n_d),
                               interval_s=settings.interval_s, window_s=settings.window_s, startup_s=startup_s,
                               config=s.sim, duration_s=trace.duration_s)
        out["clusters"].append(_cluster_record(name, run, trace, s, (n_p, n_d)))
        log(f"  {name}: {_brief(out['clusters'][-1])} ({time.monotonic() - t1:.0f} s)")
    t1 = time.monotonic()
    n_p, n_d = sizes["static-mean"]
    run = simulate_elastic(s.profile, trace.requests, make_policy(), replace(s.prefill, num_instances=n_p),
                           replace(s.decode, num_instances=n_d), interval_s=settings.interval_s,
                           window_s=settings.window_s, startup_s=startup_s, config=s.sim,
                           duration_s=trace.duration_s)
    auto = _cluster_record("autoscaled", run, trace, s, None)
    auto["events"] = [asdict(e) for e in run.events]
    auto["instances"] = [asdict(life) for life in run.instances]
    auto["ready_over_time"] = [run.ready_sizes(t) for t in out["grid_s"]]
    auto["held_over_time"] = [run.pool_sizes(t) for t in out["grid_s"]]
    auto["sim_wall_s"] = time.monotonic() - t1
    out["clusters"].insert(0, auto)
    log(f"  autoscaled: {_brief(auto)}, {len(run.events)} scaling events ({auto['sim_wall_s']:.0f} s)")
    return out


def _brief(c: dict) -> str:
    return f"attainment {c['attainment']:.1%}, {c['gpu_hours']:.2f} GPU-hours"


def _gap(v: dict) -> str:
    gap = v["points_below_static_peak"]
    return f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'} static-peak"


def verdict(trace: dict) -> dict:
    by = {c["cluster"]: c for c in trace["clusters"]}
    auto, peak = by["autoscaled"], by["static-peak"]
    gap = 100 * (peak["attainment"] - auto["attainment"])
    ratio = auto["gpu_hours"] / peak["gpu_hours"]
    return {"points_below_static_peak": gap, "gpu_hours_vs_static_peak": ratio,
            "met": gap <= 5.0 and ratio <= 0.70}


# -- report --------------------------------------------------------------------------------------------
def markdown(record: dict) -> str:
    st = record["settings"]
    lines = [f"# Autoscaling in the simulator ({record['machine']}, {record['date']})", "",
             f"Profile `{st['profile']}`, plans from `{st['plan']}` (prefill tp{st['prefill_tp']}, decode "
             f"tp{st['decode_tp']}), budget {st['budget_ranks']} ranks; SLOs TTFT {st['ttft_s']:g} s, TPOT "
             f"{st['tpot_s']:g} s (both, per request); policy `{st['policy']}` every {st['interval_s']:g} s over "
             f"{st['window_s']:g} s windows, start-up {st['startup_s']:g} s. Run time {record['wall_s']:.0f} s.", "",
             "| trace | cluster | pools (P+D) | attainment | TTFT only | TPOT only | GPU-hours | vs static-peak |",
             "|---|---|---|---|---|---|---|---|"]
    for tr in record["traces"]:
        peak = next(c for c in tr["clusters"] if c["cluster"] == "static-peak")
        for c in tr["clusters"]:
            pools = f"{c['prefill']}+{c['decode']}" if c["prefill"] is not None else "varies"
            lines.append(f"| {tr['trace']} | {c['cluster']} | {pools} | {c['attainment']:.1%} | "
                         f"{c['ttft_attainment']:.1%} | {c['tpot_attainment']:.1%} | {c['gpu_hours']:.2f} | "
                         f"{c['gpu_hours'] / peak['gpu_hours']:.0%} |")
    lines.append("")
    for tr in record["traces"]:
        v = tr["verdict"]
        lines += [f"**{tr['trace']}**: {tr['source']}; {tr['num_requests']} requests, mean {tr['mean_rate']:.1f} "
                  f"req/s, peak {tr['peak_rate']:.1f} req/s. Autoscaled: {_gap(v)} "
                  f"at {v['gpu_hours_vs_static_peak']:.0%} of its GPU-hours: target "
                  f"{'met' if v['met'] else 'missed'}.", ""]
    for tr in record["traces"]:
        auto = tr["clusters"][0]
        lines += [f"## Scaling events, {tr['trace']} ({len(auto['events'])})", "", "| t (s) | pool | change | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {e['t']:.0f} | {e['role']} | {e['change']:+d} | {e['reason']} |" for e in auto["events"]]
        lines.append("")
    return "\n".join(lines)


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{os.cpu_count()} cores of {name or platform.processor() or 'an unknown CPU'}"


# -- the command ---------------------------------------------------------------------------------------
def setup_from(args) -> Setup:
    from cluster.config import load_config
    from cluster.serve import plan_fragment
    from router.planner.profile import load_profile

    profile = load_profile(args.profile)
    cfg = load_config(None, plan_fragment(args.plan))
    sim = SimConfig(max_num_batched_tokens=cfg.prefill.max_num_batched_tokens, max_num_seqs=cfg.decode.max_num_seqs,
                    block_size=cfg.decode.block_size, transfer_gb_s=profile.intra_node_gb_s)
    return Setup(profile, PoolSpec(cfg.prefill.tp_size, cfg.prefill.pp_size, 1),
                 PoolSpec(cfg.decode.tp_size, cfg.decode.pp_size, 1), sim,
                 SIM_TTFT_SLO_S if args.ttft_slo is None else args.ttft_slo,
                 SIM_TPOT_SLO_S if args.tpot_slo is None else args.tpot_slo, args.budget_ranks)


def autoscaling_settings(args, s: Setup):
    from cluster.config import AutoscalingConfig, PoolScaling

    def pool(spec: PoolSpec, most: int) -> PoolScaling:
        return PoolScaling(min_instances=1, max_instances=min(most, s.budget_ranks // (spec.tp * spec.pp)),
                           upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
                           max_step=args.max_step)
    settings = AutoscalingConfig(policy=args.policy, interval_s=args.interval_s, window_s=args.window_s,
                                 prefill=pool(s.prefill, args.max_prefill), decode=pool(s.decode, args.max_decode),
                                 ttft_p90_s=s.ttft_s, tpot_p90_s=s.tpot_s, profile=args.profile,
                                 queued_tokens_high=args.queued_tokens_high, queued_tokens_low=args.queued_tokens_low,
                                 kv_use_high=args.kv_use_high, kv_use_low=args.kv_use_low,
                                 max_total_instances=s.budget_ranks)
    settings.check("autoscaling")
    return settings


def policy_factory(args, s: Setup, settings):
    """A fresh policy per run (the slo proposer keeps its correction factors)."""
    from router.autoscale import Policy, SloProposer, make_policy

    if args.policy != "slo":
        return lambda: make_policy(settings)
    return lambda: Policy(settings, SloProposer(settings, s.profile, sim=s.sim, horizon_s=args.horizon_s,
                                                max_requests=args.max_requests, headroom=args.headroom,
                                                seed=args.seed))


def run_sim(args) -> dict:
    t0 = time.monotonic()
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    get_workload(args.workload)
    s = setup_from(args)
    settings = autoscaling_settings(args, s)
    make = policy_factory(args, s, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = []
    names = [t for t in args.traces.split(",") if t]
    for name in names:
        if name == "step":
            trace = step_trace(args.step_rate, args.step_minutes * 60, args.workload, args.seed)
        elif name == "bursty":
            trace = bursty_trace(str(out / "bursty-trace.csv"), args.bursty_rate, args.bursty_minutes * 60,
                                 args.burstiness, args.workload, args.seed)
        else:
            raise BenchError(f"unknown trace {name!r}: step, bursty")
        log(f"=== {name}: {trace.source}; {len(trace.requests)} requests")
        record = run_trace(trace, s, settings, make, args.startup_s, args.workload, args.seed, log)
        record["verdict"] = verdict(record)
        traces.append(record)
    settings_record = {"profile": args.profile, "plan": args.plan, "prefill_tp": s.prefill.tp,
                       "prefill_pp": s.prefill.pp, "decode_tp": s.decode.tp, "decode_pp": s.decode.pp,
                       "budget_ranks": s.budget_ranks, "ttft_s": s.ttft_s, "tpot_s": s.tpot_s,
                       "startup_s": args.startup_s, "transfer_gb_s": s.sim.transfer_gb_s,
                       **{k: v for k, v in vars(args).items() if k not in ("fn", "where")},
                       "autoscaling": asdict(settings)}
    return {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "settings": settings_record,
            "traces": traces, "wall_s": time.monotonic() - t0}


def write(record: dict, out: Path) -> None:
    from cluster.bench.autoscale_plots import plot_trace

    (out / "autoscale.json").write_text(json.dumps(record, indent=1))
    (out / "autoscale.md").write_text(markdown(record))
    for tr in record["traces"]:
        plot_trace(tr, record["settings"], str(out / f"{tr['trace']}.png"), BIN_S)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--where", choices=("sim", "cluster"), default="sim",
                   help="sim: GPU scale in the planner's simulator (default); cluster: the real cluster here")
    p.add_argument("--out", default="bench-results/autoscale", help="results directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    real = p.add_argument_group("real cluster only (--where cluster)")
    real.add_argument("--config", default=None, help="cluster YAML with an autoscaling section")
    real.add_argument("--duration-s", type=float, default=None, help="length of the low-high-low trace (120)")
    real.add_argument("--low-rate", type=float, default=None, help="req/s before and after the step (1)")
    real.add_argument("--high-rate", type=float, default=None, help="req/s during the step (3)")
    p.add_argument("--ttft-slo", type=float, default=None,
                   help="seconds (default: 0.25 in the simulator, docs/planner.md; 1.5 on the cluster)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: 0.1 in both)")
    sim = p.add_argument_group("simulator (--where sim)")
    sim.add_argument("--profile", default=PROFILE, help="latency profile (default: %(default)s)")
    sim.add_argument("--plan", default=PLAN, help="plan YAML giving each pool's tp/pp (default: %(default)s)")
    sim.add_argument("--budget-ranks", type=int, default=32, help="GPUs over every pool (default: 4 x 8)")
    sim.add_argument("--workload", default="chatbot", help="lengths of both traces (default: %(default)s)")
    sim.add_argument("--traces", default="step,bursty", help="comma-separated: step, bursty")
    sim.add_argument("--step-rate", type=float, default=50.0, help="r of the r / 3r / r step (default: %(default)s)")
    sim.add_argument("--step-minutes", type=float, default=10.0, help="length of each step segment")
    sim.add_argument("--bursty-rate", type=float, default=60.0, help="the bursty trace's mean rate before clipping")
    sim.add_argument("--bursty-minutes", type=float, default=30.0)
    sim.add_argument("--burstiness", type=float, default=4.0, help="squared CV of the bursty gaps (4: CV 2)")
    sim.add_argument("--startup-s", type=float, default=30.0, help="model load of an added instance")
    pol = p.add_argument_group("the policy (router/autoscale.py)")
    pol.add_argument("--policy", choices=("slo", "load"), default="slo")
    pol.add_argument("--interval-s", type=float, default=5.0)
    pol.add_argument("--window-s", type=float, default=10.0)
    pol.add_argument("--upscale-delay-s", type=float, default=0.0)
    pol.add_argument("--downscale-delay-s", type=float, default=60.0)
    pol.add_argument("--max-step", type=int, default=8, help="instances added or removed per decision")
    pol.add_argument("--max-prefill", type=int, default=8, help="prefill max_instances")
    pol.add_argument("--max-decode", type=int, default=24, help="decode max_instances")
    pol.add_argument("--headroom", type=float, default=1.1, help="slo: the rate sized for, over the window's")
    pol.add_argument("--horizon-s", type=float, default=30.0, help="slo: seconds of arrivals per candidate")
    pol.add_argument("--max-requests", type=int, default=6000, help="slo: at most this many per candidate")
    pol.add_argument("--queued-tokens-high", type=int, default=2048, help="load: prefill grows above")
    pol.add_argument("--queued-tokens-low", type=int, default=128)
    pol.add_argument("--kv-use-high", type=float, default=0.8, help="load: decode grows above")
    pol.add_argument("--kv-use-low", type=float, default=0.2)
    p.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.where == "cluster":
        from cluster.bench.autoscale_cluster import main as cluster_main   # the real-cluster run
        return cluster_main(args)
    record = run_sim(args)
    out = Path(args.out)
    write(record, out)
    for tr in record["traces"]:
        v = tr["verdict"]
        print(f"{tr['trace']}: autoscaled {_gap(v)} at {v['gpu_hours_vs_static_peak']:.0%} of its GPU-hours: "
              f"target {'met' if v['met'] else 'missed'}")
    print(f"wrote autoscale.json, autoscale.md and plots in {out} after {record['wall_s']:.0f} s")
    return 0
