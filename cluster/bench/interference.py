"""Cross-core interference, for the profile: how much a step slows while another
instance on this node works.

The cores of one CPU share its last-level cache and memory bandwidth (on a VM
they may even be two hyperthreads of one physical core), so a one-thread step
on one core can run slower while the other core works. The main process times
a probe step of each phase alone and beside a neighbour process (its own
engine, one thread) looping a prefill or a decode step, alternating probe by
probe (the neighbour pauses between its steps), so a change in the machine's
other load hits both alike. k[probe][neighbour] = median(beside) / median(alone) - 1,
clamped at 0. Medians, not minima: the point is the typical disturbed step.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import statistics
import time

from cluster.bench.steps import seq_works

PROBE_PREFILL = [256]            # one prompt of a chatbot-like length
PROBE_DECODE = (8, 384)          # batch x context per sequence
NEIGHBOUR_PREFILL = [512]
NEIGHBOUR_DECODE = (16, 512)
KV_CACHE_GB = 0.5
NEIGHBOUR_LIMIT_S = 300          # a neighbour loops at most this long, whatever happens here


def _engine():
    import torch                                   # light start-up: torch only in a measuring process
    torch.set_num_threads(1)
    from engine.instance import build_engine       # light start-up: it imports torch
    parts = build_engine(None, "bfloat16", 16, KV_CACHE_GB, None, 1, 0)
    return parts.runner, parts.model_config.vocab_size


def _step(engine, phase: str, shape):
    """A callable running one step of `phase` (prefill: prompt lengths; decode: (batch, context))."""
    runner, vocab = engine
    bs = runner.block_size
    if phase == "prefill":
        works = seq_works(list(shape), bs, vocab)
        return lambda: runner.prefill(works)
    batch, ctx = shape
    works = seq_works([ctx] * batch, bs, vocab, decode=True)
    return lambda: runner.decode_step(works)


def _neighbour(phase: str, ready, go, stepping, stop) -> None:
    """Child process: loop one step of `phase` while `go` is set, until `stop` (bounded in time).
    `stepping` is 1 while a step runs, so the prober knows when the core is really idle."""
    step = _step(_engine(), phase, NEIGHBOUR_PREFILL if phase == "prefill" else NEIGHBOUR_DECODE)
    step()
    ready.put(True)
    stop_at = time.monotonic() + NEIGHBOUR_LIMIT_S
    while not stop.is_set() and time.monotonic() < stop_at:
        if not go.wait(0.05):
            continue
        stepping.value = 1
        step()
        stepping.value = 0


def _until(cond, timeout_s: float = 30.0) -> None:
    stop_at = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > stop_at:
            raise RuntimeError("the neighbour process stopped answering")
        time.sleep(0.001)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(repeats: int = 9, log=print) -> dict:
    """{"prefill": {"prefill": k, "decode": k}, "decode": {...}} measured on this machine.

    Alone and beside the neighbour alternate probe by probe (the neighbour pauses
    between its steps), so a change in the machine's other load hits both alike."""
    engine = _engine()
    probes = {"prefill": _step(engine, "prefill", PROBE_PREFILL), "decode": _step(engine, "decode", PROBE_DECODE)}
    reps = {"prefill": max(3, repeats // 2), "decode": 3 * repeats}
    for fn in probes.values():
        fn()                                            # warm-up
    k: dict = {phase: {} for phase in probes}
    ctx = mp.get_context("spawn")
    for neighbour in ("prefill", "decode"):
        ready, go, stop, stepping = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Value("i", 0)
        proc = ctx.Process(target=_neighbour, args=(neighbour, ready, go, stepping, stop), daemon=True)
        proc.start()
        try:
            try:
                ready.get(timeout=180)
            except queue.Empty:
                raise RuntimeError(f"the {neighbour} neighbour process did not start within 180 s") from None
            for phase, fn in probes.items():
                alone, beside = [], []
                for _ in range(reps[phase]):
                    go.clear()
                    _until(lambda: stepping.value == 0)
                    alone.append(_timed(fn))
                    go.set()
                    _until(lambda: stepping.value == 1)
                    beside.append(_timed(fn))
                a, b = statistics.median(alone), statistics.median(beside)
                k[phase][neighbour] = max(0.0, b / a - 1.0)
                log(f"  interference: {phase} step alone {a * 1e3:.1f} ms, beside a looping {neighbour} "
                    f"{b * 1e3:.1f} ms (k = {k[phase][neighbour]:.2f})")
        finally:
            stop.set()
            go.set()
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return k
