"""One engine change before and after, side by side: prefill of 512 tokens and decode steps at
batch 1, 8 and 32, two ModelRunners in one process (one per variant), alternating call by call.

    .venv/bin/python benchmarks/experiments/engine_ab.py EXPERIMENT [--repeats N]

EXPERIMENT names a change (see EXPERIMENTS below); its `before` and `after` set up one runner
each, after it is built. The default model, bf16, one thread. Decode contexts are 160 tokens
(the middle of `bench engine`'s 128-token prompts + 64 new tokens), in consecutive blocks.
Reported: each variant's thread CPU time per call (less disturbed by the shared machine's other
load than wall time), medians over the repeats, and after/before speed-up.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root

BATCHES = (1, 8, 32)
SWITCHES = ("fused", "decode-attention", "causal-softmax")   # experiments whose variants are process-wide: set before each call
CONTEXT = 160
PREFILL = 512


def _old_gemm(runner) -> None:
    # the engine before measured GEMM plans: ATen's GEMV for 1 row, (W @ xᵀ)ᵀ for 2-32 rows
    from engine.gemm import GemmPlan
    runner.model.use_gemm_plan(GemmPlan(plain=((1, "gemv"), (32, "weight_left"))))


def _measured_gemm(runner) -> None:
    from engine.gemm import choose_plan
    with _autotune():
        runner.model.use_gemm_plan(choose_plan(runner.model.linear_weights(), runner.dtype))


@contextlib.contextmanager
def _autotune():
    # the runners are built with the plain paths (PDCLUSTER_AUTOTUNE=0); an `after` measures its own
    os.environ["PDCLUSTER_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        os.environ["PDCLUSTER_AUTOTUNE"] = "0"


def _sdpa_prefill(runner) -> None:
    from engine.prefill_attention import DEFAULT
    runner.prefill_plan = DEFAULT


def _measured_prefill(runner) -> None:
    from engine.prefill_attention import choose_plan
    attn = runner.model.layers[0].self_attn
    with _autotune():
        runner.prefill_plan = choose_plan(attn.num_heads, attn.num_kv_heads, attn.head_dim, runner.dtype)


def _nothing(runner) -> None:
    pass


def _fused(on: bool):
    def use(runner) -> None:
        from pdkernels import cpu_fused
        cpu_fused.ENABLED = on
    return use


def _decode_kernel(name: str):
    # the C library's bf16 entry point: the AVX512-BF16 kernel, or the generic loop it falls back to
    def use(runner) -> None:
        import ctypes

        import torch

        from pdkernels import cpu_native
        fn = getattr(cpu_native.load(), name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float]
        cpu_native._FUNCTIONS[torch.bfloat16] = name
    return use


def _causal_softmax(on: bool):
    def use(runner) -> None:
        from pdkernels import cpu_native
        if not hasattr(cpu_native, "_causal_softmax_c"):
            cpu_native._causal_softmax_c = cpu_native.causal_softmax_
        cpu_native.causal_softmax_ = cpu_native._causal_softmax_c if on else (lambda *a: False)
    return use


EXPERIMENTS = {
    "gemm": (_old_gemm, _measured_gemm),
    "prefill-attention": (_sdpa_prefill, _measured_prefill),
    "fused": (_fused(False), _fused(True)),   # a process-wide switch: set before every call
    "decode-attention": (_decode_kernel("decode_attention_bf16_generic"), _decode_kernel("paged_decode_attention_bf16")),
    "causal-softmax": (_causal_softmax(False), _causal_softmax(True)),   # the blocked prefill's mask + softmax
    "noise": (_nothing, _nothing),   # the same engine twice: how far apart two equal variants land
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    os.environ["PDCLUSTER_AUTOTUNE"] = "0"   # built with the plain paths; each variant then sets its own
    # (both get the measured GEMM and prefill-attention plans, unless the experiment is about one)
    from cluster.bench.steps import seq_works
    from engine.instance import build_engine
    setups = dict(zip(("before", "after"), EXPERIMENTS[args.experiment]))
    runners = {}
    for name, setup in setups.items():
        runners[name] = build_engine(None, "bfloat16", 16, 1.0, None, 1, 0).runner
        if args.experiment != "gemm":   # today's engine around the change: the measured plans
            _measured_gemm(runners[name])
        if args.experiment != "prefill-attention":
            _measured_prefill(runners[name])
        setup(runners[name])
    vocab = runners["before"].cfg.vocab_size
    block_size = runners["before"].block_size
    cases = {f"prefill {PREFILL}": (seq_works([PREFILL], block_size, vocab), "prefill")}
    for b in BATCHES:
        cases[f"decode batch {b}"] = (seq_works([CONTEXT] * b, block_size, vocab, decode=True), "decode_step")
    print(f"{args.experiment}: thread CPU ms per call, median of {args.repeats}, 1 thread, bf16")
    for label, (works, method) in cases.items():
        times = {name: [] for name in runners}
        for rep in range(args.repeats + 1):
            for name, runner in runners.items():
                if args.experiment in SWITCHES:
                    setups[name](runner)
                t0 = time.thread_time()
                getattr(runner, method)(works)
                if rep:   # the first round warms up
                    times[name].append(time.thread_time() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{label:>16}: before {med['before']:.1f}  after {med['after']:.1f}  "
              f"speed-up {med['before'] / med['after']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
