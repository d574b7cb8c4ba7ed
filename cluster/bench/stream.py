"""`pdcluster bench stream`: layer-wise KV streaming against a whole transfer after prefill.

A prefill worker (`prefill_worker.PrefillWorker` over the default model, bf16,
one thread) runs in a child process; this process is the decode side, with a
receiver and a cache of its own. For one prompt (2048 tokens by default):

  whole     the prefill runs, then offers; the KV is pulled after it ended.
  streamed  `stream_layers`: the offer comes out before the forward pass, this
            process pulls at once and each layer arrives as the child's
            per-layer hook sends it.

"end of prefill" is the moment the child's `runner.execute` returned (forward
and first-token sampling done); "KV ready" the moment this process's receiver
reported DONE. Both on CLOCK_MONOTONIC, which is system-wide on Linux, so the
two processes' stamps compare. The figure of merit is (ready - end) streamed
over the whole transfer's pull-to-DONE time (target: <= 20%). The receiver
waits on its sockets (`ChannelReceiver.wait`), not in a busy loop, so it
leaves the cores to the prefill.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.block_manager import blocks_needed

PROMPT_TOKENS = 2048
BACKENDS = ("zmq", "shm")   # shm: zero copy out of the prefill worker's shared cache


def _config(backend: str):
    from cluster.config import load_config
    return load_config(None, {
        "model": {"dtype": "bfloat16", "max_model_len": 4096},
        "prefill": {"block_size": 16, "kv_cache_memory_gb": 0.2, "num_threads": 1},
        "decode": {"block_size": 16, "kv_cache_memory_gb": 0.2, "num_threads": 1},
        "transfer": {"backend": backend, "checksum": False, "stream_layers": True}})


def _prefill_main(cmd_q, out_q, backend: str) -> None:
    """The prefill worker: one request per command, the offer out early or at the end."""
    from cluster.worker_factory import build_worker
    from engine.default_model import default_model_path
    from protos import pdcluster_pb2 as pb
    from protos import worker_pb2 as wpb
    worker = build_worker("prefill", "p0", _config(backend), default_model_path())
    real_execute, stamps = worker.runner.execute, {}

    def execute(plan, on_layer=None):
        result = real_execute(plan, on_layer=on_layer)
        stamps["end"] = time.monotonic()
        return result
    worker.runner.execute = execute
    worker.on_offer = lambda req_id, offer: out_q.put(("early", offer))
    out_q.put(("ready", worker.sender.layout))
    try:
        while True:
            cmd = cmd_q.get(timeout=600)
            if cmd[0] == "stop":
                return
            _, req_id, prompt, streamed = cmd
            worker.stream_layers = streamed
            worker.submit(wpb.PrefillWork(req_id=req_id, prompt_token_ids=prompt,
                                          sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True)),
                          time.monotonic())
            out = worker.step(time.monotonic())
            done = out.prefilled[0]
            out_q.put(("done", done.offer, stamps["end"], done.prefill_s))
            stop_at = time.monotonic() + 120
            while not worker.is_idle() and time.monotonic() < stop_at:   # serve the pull to its end
                worker.step(time.monotonic())
                time.sleep(0.0002)
    finally:
        worker.close()


def _expect(out_q, kind: str):
    event = out_q.get(timeout=300)
    if event[0] != kind:
        raise RuntimeError(f"prefill child sent {event[0]!r}, expected {kind!r}")
    return event[1:]


def _pull_until_done(receiver, offer, dst_ids) -> tuple[float, float]:
    """(pull started, DONE) on the monotonic clock."""
    from kv_transfer import TransferStatus
    start = time.monotonic()
    receiver.pull(offer, dst_ids)
    stop_at = start + 300
    while time.monotonic() < stop_at:
        for result in receiver.poll():
            if result.status is not TransferStatus.DONE:
                raise RuntimeError(f"transfer failed: {result.error}")
            return start, time.monotonic()
        receiver.wait(0.05)
    raise TimeoutError("transfer not done in 300 s")


def _bench_backend(backend: str, prompt_tokens: int, repeats: int) -> dict:
    from decode_worker.worker import load_offer
    from kv_transfer import make_receiver
    ctx = mp.get_context("spawn")
    cmd_q, out_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_prefill_main, args=(cmd_q, out_q, backend), daemon=True)
    proc.start()
    rows: dict[str, list] = {"whole": [], "streamed": []}
    receiver = None
    try:
        (layout,) = _expect(out_q, "ready")   # the prefill rank's whole cache: ours is the same
        num_blocks = blocks_needed(prompt_tokens + 1, 16)
        cache = torch.zeros(layout.cache_shape(num_blocks), dtype=torch.bfloat16)
        receiver = make_receiver(backend, cache, layout, timeout_s=120.0)
        dst_ids = list(range(num_blocks))
        prompt = [(7 * i) % 40000 + 100 for i in range(prompt_tokens)]
        for i in range(repeats + 1):          # the first round is a warm-up
            for mode in ("whole", "streamed"):
                cmd_q.put(("run", f"{mode}-{i}", prompt, mode == "streamed"))
                if mode == "streamed":
                    (offer,) = _expect(out_q, "early")
                    started, ready = _pull_until_done(receiver, load_offer(offer), dst_ids)
                    offer_bytes, end, prefill_s = _expect(out_q, "done")
                else:
                    offer_bytes, end, prefill_s = _expect(out_q, "done")
                    started, ready = _pull_until_done(receiver, load_offer(offer_bytes), dst_ids)
                if i:
                    rows[mode].append({"prefill_s": prefill_s, "pull_to_ready_s": ready - started,
                                       "end_to_ready_s": ready - end})
                time.sleep(0.2)               # the child serves the last ACK and goes idle
    finally:
        if receiver is not None:
            receiver.close()
        cmd_q.put(("stop",))
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in rows.items()}
    whole_transfer = med["whole"]["pull_to_ready_s"]
    return {"runs": rows, "median": med, "kv_bytes": prompt_tokens * layout.bytes_per_token,
            "streamed_end_to_ready_over_whole_transfer": max(0.0, med["streamed"]["end_to_ready_s"]) / whole_transfer}


def run(prompt_tokens: int = PROMPT_TOKENS, repeats: int = 3, out: str | None = None,
        backends=BACKENDS) -> dict:
    results = {"prompt_tokens": prompt_tokens, "backends": {}}
    for backend in backends:
        r = results["backends"][backend] = _bench_backend(backend, prompt_tokens, repeats)
        w, s = r["median"]["whole"], r["median"]["streamed"]
        print(f"{backend}: {prompt_tokens} tokens, {r['kv_bytes'] / 2**20:.1f} MB of KV, prefill "
              f"{w['prefill_s']:.2f} s | whole: pull->ready {w['pull_to_ready_s'] * 1e3:.1f} ms, "
              f"end->ready {w['end_to_ready_s'] * 1e3:.1f} ms | streamed: end->ready "
              f"{s['end_to_ready_s'] * 1e3:.1f} ms = "
              f"{r['streamed_end_to_ready_over_whole_transfer']:.0%} of the whole transfer", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}", file=sys.stderr, flush=True)
    return results
