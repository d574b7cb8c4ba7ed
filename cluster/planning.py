"""`pdcluster plan` and `pdcluster profile`: the planner from the command line.

    pdcluster profile [--out bench-results/profile-cpu.json]
    pdcluster plan --profile llama13b-a100-80g --workload chatbot --ttft-slo 0.25 --tpot-slo 0.1 \\
                   --nodes 4 --gpus-per-node 8 [--affinity high|low] [--out deploy/plans/X.yaml]
    pdcluster plan --profile smollm2-135m-cpu --workload multiturn --prefix-caching ...
    pdcluster serve --plan deploy/plans/X.yaml

--profile takes a JSON path or the name of a profile shipped in
router/planner/profiles/. The search itself is pure (router/planner); the
wall-clock time is measured here.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from router.planner.plan_file import render, write_plan
from router.planner.profile import PlannerError, load_profile, resolve_profile
from router.planner.search import ClusterShape, SearchSettings, search_plan
from router.planner.simulator import SimConfig
from router.workload import WorkloadError



def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="profile JSON path, or a shipped name (llama13b-a100-80g)")
    p.add_argument("--workload", default="chatbot",
                   help="named workload: chatbot, code, summarization, multiturn (conversations)")
    p.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    p.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--affinity", choices=["high", "low", "both"], default="both",
                   help="DistServe's regime: high (fast inter-node links), low (KV over intra-node links only)")
    p.add_argument("--intra-node-gb-s", type=float, default=None, help="default: the profile's")
    p.add_argument("--inter-node-gb-s", type=float, default=None, help="default: the profile's")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment goodput must keep")
    p.add_argument("--num-requests", type=int, default=160, help="minimum requests per simulation")
    p.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; > 1 burstier (Gamma)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-colocated", action="store_true", help="skip the colocated baseline")
    p.add_argument("--no-conditional", action="store_true",
                   help="do not weigh conditional disaggregation (local prefills on 1 x 1 decode instances)")
    p.add_argument("--local-prefill-tokens", type=int, default=256,
                   help="conditional: prompt tokens a decode step carries at most (conditional.local_prefill_tokens)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="simulate prefix caching on 1 x 1 instances (a multi-turn workload reuses its turns' KV)")
    p.add_argument("--out", default=None, help="plan YAML (default deploy/plans/<profile>-<workload>.yaml)")


def plan_main(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(resolve_profile(args.profile))
        shape = ClusterShape(args.nodes, args.gpus_per_node,
                             args.intra_node_gb_s or profile.intra_node_gb_s,
                             args.inter_node_gb_s or profile.inter_node_gb_s)
        sim = SimConfig(prefix_caching=args.prefix_caching, local_chunk_tokens=args.local_prefill_tokens)
        settings = SearchSettings(args.ttft_slo, args.tpot_slo, workload=args.workload, target=args.target,
                                  num_requests=args.num_requests, seed=args.seed, burstiness=args.burstiness,
                                  sim=sim, conditional=not args.no_conditional)
        regimes = ("high", "low") if args.affinity == "both" else (args.affinity,)
        t0 = time.perf_counter()
        result = search_plan(profile, shape, settings, regimes=regimes, with_colocated=not args.no_colocated)
        elapsed = time.perf_counter() - t0
    except (PlannerError, WorkloadError) as e:
        print(f"pdcluster: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("deploy", "plans", f"{profile.name}-{args.workload}.yaml")
    command = (f"pdcluster plan --profile {shlex.quote(args.profile)} --workload {args.workload} "
               f"--ttft-slo {args.ttft_slo} --tpot-slo {args.tpot_slo} --nodes {args.nodes} "
               f"--gpus-per-node {args.gpus_per_node} --affinity {args.affinity}"
               + (" --prefix-caching" if args.prefix_caching else "")
               + (" --no-conditional" if args.no_conditional else "")
               + (f" --local-prefill-tokens {args.local_prefill_tokens}" if args.local_prefill_tokens != 256 else ""))
    text = render(result, profile, command, profile_ref=args.profile)
    write_plan(out, text)
    print(text, end="")
    print(f"searched {result.num_plans} configurations ({result.num_sims} simulations) in {elapsed:.1f} s; "
          f"wrote {out}", file=sys.stderr)
    return 0


def profile_main(args: argparse.Namespace) -> int:
    from cluster.bench.profile import run   # here: it needs torch and the model, `plan` does not
    run(out=args.out, repeats=args.repeats, plans=tuple(x for x in args.plans.split(",") if x),
        interference=getattr(args, "interference", True))
    return 0
