"""`pdcluster bench transfer`: KV transfer bandwidth between two processes, per backend.

The sender runs in a child process with a cache shaped like the default
model's (30 layers, 3 KV heads, head_dim 64, bf16: 23,040 bytes per token);
this process pulls sequences of about 1, 16 and 128 MB into its own cache.
Time runs from `pull` to the DONE result (pack, wire, checksum, unpack and
the acknowledgement included). A plain memcpy of the same number of bytes,
measured in this process in the same run, is the reference. Backend `ray`
runs against a local Ray head this process starts on 127.0.0.1 (and stops).
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import secrets
import statistics
import sys
import time
from pathlib import Path

import torch

from engine.block_manager import blocks_needed

SIZES_MB = (1, 16, 128)
RAY_OBJECT_STORE_BYTES = 1024 * 2**20   # two 128 MB payloads alive at once, with room
_RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def _layout():
    from kv_transfer.layout import KVLayout
    return KVLayout(num_layers=30, layer_start=0, layer_end=30, num_kv_heads=3, head_start=0, head_end=3,
                    head_dim=64, block_size=16, dtype="bfloat16")


def _start_ray() -> str:
    """A local Ray head bound to 127.0.0.1 with token auth; its address."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # Ray swaps a loopback node address for the external one unless it thinks clusters are off.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=RAY_OBJECT_STORE_BYTES, logging_level=logging.WARNING, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    if not address.startswith("127.0.0.1:"):
        ray.shutdown()
        raise RuntimeError(f"Ray came up on {address}, not on 127.0.0.1")
    return address


def _join_ray(address: str, env: dict) -> None:
    os.environ.update(env)
    import ray
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)


def _sender_main(cmd_q, out_q, backend: str, num_blocks: int, checksum: bool, shared: bool,
                 ray_at: tuple[str, dict] | None) -> None:
    from engine.cpu_tuning import keep_freed_memory
    from kv_transfer import make_sender
    from kv_transfer.shared_cache import SharedKVCache
    torch.set_num_threads(1)
    keep_freed_memory()   # a worker process does this at start-up (engine.ModelRunner)
    if ray_at is not None:
        _join_ray(*ray_at)
    layout = _layout()
    shm = SharedKVCache(layout.cache_shape(num_blocks), torch.bfloat16) if shared else None
    cache = shm.tensor if shm else torch.empty(layout.cache_shape(num_blocks), dtype=torch.bfloat16)
    cache.copy_(torch.randn(cache.shape))
    sender = make_sender(backend, cache, layout, checksum=checksum,
                         shared_cache=shm)
    out_q.put(sender.endpoint)
    stop_at = time.monotonic() + 600
    try:
        while time.monotonic() < stop_at:
            try:
                cmd = cmd_q.get_nowait()
            except queue.Empty:
                cmd = None
            if cmd == "stop":
                break
            if cmd is not None:
                req_id, num_tokens = cmd
                while sender.leases.live():   # the last ACK may still be in flight: the
                    sender.poll(time.monotonic())   # blocks are reused, so wait for it
                    sender.wait(0.001)
                ids = list(range(blocks_needed(num_tokens, layout.block_size)))
                out_q.put(sender.offer(req_id, ids, num_tokens, time.monotonic()))
            sender.poll(time.monotonic())
            sender.wait(0.001)   # as a worker's step loop with nothing to compute: no spinning
    finally:
        sender.close()
        if shm is not None:
            cache = None
            shm.close()
        if ray_at is not None:
            import ray
            ray.shutdown()


def _memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def _bench_backend(backend: str, sizes_mb, repeats: int, checksum: bool, shared: bool) -> dict:
    from kv_transfer import TransferStatus, make_receiver
    layout = _layout()
    per_token = layout.bytes_per_token
    max_tokens = max(sizes_mb) * 2**20 // per_token + 1
    num_blocks = blocks_needed(max_tokens, layout.block_size) + 1
    ray_at = None
    if backend == "ray":
        import ray
        ray_at = (ray.get_runtime_context().gcs_address, {k: os.environ[k] for k in _RAY_ENV if k in os.environ})
    ctx = mp.get_context("spawn")
    cmd_q, out_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_sender_main, args=(cmd_q, out_q, backend, num_blocks, checksum, shared, ray_at),
                       daemon=True)
    proc.start()
    endpoint = out_q.get(timeout=120)
    assert endpoint.startswith("tcp://127.0.0.1:")
    cache = torch.zeros(layout.cache_shape(num_blocks), dtype=torch.bfloat16)
    receiver = make_receiver(backend, cache, layout, timeout_s=60.0)
    rows = {}
    try:
        for mb in sizes_mb:
            num_tokens = mb * 2**20 // per_token
            times = []
            for i in range(repeats + 1):   # the first is a warm-up
                cmd_q.put((f"{backend}-{mb}-{i}", num_tokens))
                offer = out_q.get(timeout=60)
                start = time.perf_counter()
                receiver.pull(offer, list(range(blocks_needed(num_tokens, layout.block_size))))
                result = None
                while result is None:
                    done = receiver.poll()
                    result = done[0] if done else None
                    if result is None:
                        receiver.wait(0.001)   # no spinning: the sender needs the other core
                if result.status is not TransferStatus.DONE:
                    raise RuntimeError(f"{backend} transfer failed: {result.error}")
                if i:
                    times.append(time.perf_counter() - start)
            nbytes = num_tokens * per_token
            rows[str(mb)] = {"bytes": nbytes, "seconds": statistics.median(times),
                             "gbps": nbytes / statistics.median(times) / 1e9}
    finally:
        receiver.close()
        cmd_q.put("stop")
        proc.join(timeout=30)
    return rows


# (label, backend, checksum, sender cache in shared memory)
VARIANTS = (
    ("shm", "shm", False, True),             # zero copy: one block copy out of the sender's cache
    ("shm+crc", "shm", True, False),         # staged through a segment, checksummed
    ("zmq", "zmq", False, False),
    ("zmq+crc", "zmq", True, False),
    ("torch_dist", "torch_dist", False, False),   # gloo send/recv in a per-pair process group
    ("torch_dist+crc", "torch_dist", True, False),
    ("ray", "ray", False, False),                 # Ray's object store, numpy views
)


def run(sizes_mb=SIZES_MB, repeats: int = 5, out: str | None = None, variants=None) -> dict:
    """`variants`: labels of VARIANTS to run (None: all)."""
    chosen = [v for v in VARIANTS if variants is None or v[0] in variants]
    if variants is not None and len(chosen) != len(set(variants)):
        raise ValueError(f"unknown variants {sorted(set(variants) - {v[0] for v in VARIANTS})}; "
                         f"choose from {[v[0] for v in VARIANTS]}")
    from engine.cpu_tuning import keep_freed_memory
    torch.set_num_threads(1)
    keep_freed_memory()
    results: dict = {"memcpy": {}, "backends": {}}
    for mb in sizes_mb:
        results["memcpy"][str(mb)] = _memcpy_gbps(mb * 2**20, repeats)
    backends = [label for label, *_ in chosen]
    ray_started = False
    try:
        for label, backend, checksum, shared in chosen:
            if backend == "ray" and not ray_started:
                _start_ray()
                ray_started = True
            results["backends"][label] = _bench_backend(backend, sizes_mb, repeats, checksum, shared)
    finally:
        if ray_started:
            import ray
            ray.shutdown()
    for mb in sizes_mb:
        ref = results["memcpy"][str(mb)]
        line = f"{mb:>4} MB: memcpy {ref:5.2f} GB/s"
        for backend in backends:
            row = results["backends"][backend][str(mb)]
            row["fraction_of_memcpy"] = row["gbps"] / ref
            line += f" | {backend} {row['gbps']:5.2f} GB/s ({row['fraction_of_memcpy']:.0%})"
        print(line, file=sys.stdout, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}", flush=True)
    return results
