"""The `pdcluster` command line."""
from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> int:
    if not args.local:
        from cluster.serve import generate
        return generate(args.address, args.prompt, args.raw, max_tokens=args.max_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    from engine import LLM, SamplingParams
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads)
    prompt = args.prompt if args.raw else llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    out = llm.generate([prompt], params)[0]
    print(out.text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "engine":
        from cluster.bench.engine import run
        run(repeats=args.repeats, out=args.out or "bench-results/engine.json")
        return 0
    if args.what == "transfer":
        from cluster.bench.transfer import run
        run(repeats=args.repeats, out=args.out or "bench-results/transfer.json",
            variants=args.variants.split(",") if args.variants else None)
        return 0
    if args.what == "stream":
        from cluster.bench.stream import run
        run(repeats=args.repeats, out=args.out or "bench-results/stream.json")
        return 0
    if args.what == "overhead":
        from cluster.bench.overhead import run
        run(repeats=args.repeats, out=args.out or "bench-results/overhead.json")
        return 0
    if args.what == "serve":
        from cluster.bench.serve import main as serve_main
        return serve_main(args)
    print(f"unknown benchmark {args.what!r}", file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    from cluster.demo import main as demo_main
    return demo_main(max_tokens=args.max_tokens, config_path=args.config)


def _serve(args: argparse.Namespace) -> int:
    from cluster.serve import serve
    return serve(args.config, args.address, args.port, plan_path=args.plan)


def _plan(args: argparse.Namespace) -> int:
    from cluster.planning import plan_main
    return plan_main(args)


def _profile(args: argparse.Namespace) -> int:
    from cluster.planning import profile_main
    return profile_main(args)


def _status(args: argparse.Namespace) -> int:
    from cluster.serve import status
    return status(args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="start a cluster in the foreground (Ctrl-C drains and stops)")
    srv.add_argument("--config", default=None, help="cluster YAML (default: built-in defaults)")
    srv.add_argument("--address", default=None, help="join this running Ray cluster instead of starting one")
    srv.add_argument("--port", type=int, default=None, help="router port (overrides router.port)")
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
    gen.set_defaults(fn=_generate)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("what", choices=["engine", "transfer", "overhead", "serve", "stream"])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default=None, help="JSON results file (serve: a directory)")
    bench.add_argument("--variants", default=None,
                       help="transfer: comma-separated variants (shm,shm+crc,zmq,zmq+crc,torch_dist,...)")
    from cluster.bench.serve import add_arguments as add_serve_arguments
    add_serve_arguments(bench)
    bench.set_defaults(fn=_bench)

    demo = sub.add_parser("demo", help="answer a few prompts on the default model and print timings")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--config", default=None, help="cluster YAML (default: deploy/local.yaml)")
    demo.set_defaults(fn=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.client import ClientError
    from cluster.bench.serve_metrics import BenchError
    from engine.errors import EngineError
    from router.workload import WorkloadError
    try:
        return args.fn(args)
    except (EngineError, ClientError, BenchError, WorkloadError) as e:
        print(f"pdcluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
