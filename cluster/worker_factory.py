"""Builds any worker from the cluster config, one path for every kind and plan (inside the actors).

  1. The engine: a `ModelRunner` over the whole model (a one-rank instance),
     or on rank 0 of a tp x pp instance a `ParallelRunner`
     (`cluster.parallel_worker`); any other rank gets a `RankServer` and
     stops here (`RankHost` serves it).
  2. The transfer side over the runner's cache (what the transfer layer sees:
     rank 0's canonical cache on a multi-rank instance, through the
     `cluster.parallel_kv` wrappers): a sender for prefill, a receiver for
     decode, none for colocated.
  3. The worker object over both, with the test-only fault points the config
     names for it (`faults.instance` matching its name, or every worker).
"""
from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from cluster.config import ClusterConfig, FaultConfig
from cluster.parallel_kv import GatheringSender, ScatteringReceiver
from cluster.parallel_worker import build_rank_engine, release_ranks
from colocated_worker.worker import ColocatedWorker
from decode_worker.worker import DecodeWorker
from engine.chunked_scheduler import ChunkedScheduler
from engine.errors import ConfigError
from engine.instance import EngineParts, build_engine
from engine.parallel_runner import EngineArgs, RankServer, RankSpec
from engine.scheduler import Scheduler, SchedulerConfig
from kv_transfer import make_receiver, make_sender
from kv_transfer.curve import ZmqKeys
from kv_transfer.layout import KVLayout
from kv_transfer.shared_cache import SharedKVCache
from prefill_worker.scheduler import PrefillSchedulerConfig
from prefill_worker.worker import PrefillWorker
from router import modes
from worker_shell.base import WorkerShell
from worker_shell.faults import FaultPoints

ROLES = ("prefill", "decode", "colocated")


def build_worker(role: str, name: str, cfg: ClusterConfig, model_path: str, host: str = "127.0.0.1",
                 rank_spec: dict | None = None, keys: ZmqKeys | None = None,
                 node: str | None = None) -> WorkerShell | RankServer:
    """The worker of instance `name`. `rank_spec` (a RankSpec's fields): this process is one rank
    of a multi-rank instance; rank 0 gets the worker, any other rank a RankServer. `keys`: the
    cluster's CURVE keys for the KV channel; `node`: the Ray node it runs on (backend auto)."""
    if role not in ROLES:
        raise ConfigError(f"a worker's role must be one of {ROLES}, got {role!r}")
    pool = {"prefill": cfg.prefill, "decode": cfg.decode, "colocated": cfg.colocated}[role]
    t = cfg.transfer
    if rank_spec is not None and role == "prefill" and t.stream_layers:
        raise ConfigError(f"transfer.stream_layers: a {pool.plan} prefill instance does not stream layers yet")
    shared: list[SharedKVCache] = []

    def allocate_shared(shape, dtype):
        shared.append(SharedKVCache(shape, dtype))
        return shared[-1].tensor

    # decode reads the prefill cache in place; a cache on a GPU is sent through host memory or NCCL instead
    use_shared = role == "prefill" and t.zero_copy and cfg.model.device == "cpu"
    allocate_kv = allocate_shared if use_shared else torch.zeros
    if rank_spec is None:
        parts = build_engine(model_path, cfg.model.dtype, pool.block_size, pool.kv_cache_memory_gb,
                             cfg.model.max_model_len, pool.num_threads, allocate_kv=allocate_kv,
                             enable_prefix_caching=pool.enable_prefix_caching, device=cfg.model.device)
        release: Callable[[], None] = parts.runner.release_kv_cache
    else:
        args = EngineArgs(model_path, cfg.model.dtype, pool.block_size, pool.kv_cache_memory_gb,
                          cfg.model.max_model_len, pool.num_threads, device=cfg.model.device)
        built = build_rank_engine(RankSpec(**rank_spec), args, allocate_kv)
        if isinstance(built, RankServer):
            return built
        parts, release = built, lambda: release_ranks(built.runner)
    mc, runner, parallel = parts.model_config, parts.runner, rank_spec is not None
    faults = fault_points(name, cfg.faults)
    if role == "colocated":
        return ColocatedWorker(name, runner, parts.blocks, _colocated_scheduler(cfg, parts),
                               vocab_size=mc.vocab_size, max_model_len=parts.max_model_len,
                               on_close=release, faults=faults)
    cache = runner.kv_cache.data   # [num_layers, 2, blocks, block_size, num_kv_heads, head_dim]
    layout = KVLayout.from_cache(cache, num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads)
    common = dict(vocab_size=mc.vocab_size, eos_token_ids=mc.eos_token_ids, max_model_len=parts.max_model_len,
                  faults=faults)
    if role == "decode":
        receiver = make_receiver(t.backend, cache, layout, keys=keys, node=node)
        if parallel:
            receiver = ScatteringReceiver(receiver, runner)
        return DecodeWorker(name, runner, parts.blocks, receiver, **common,
                            config=SchedulerConfig(pool.max_num_seqs, pool.max_num_batched_tokens),
                            on_close=release, on_failure=t.on_failure,
                            local_chunk_tokens=cfg.conditional.local_prefill_tokens if cfg.local_prefills else None)
    kwargs = dict(host=host, lease_ttl_s=t.lease_ttl_s, checksum=t.checksum, compress=t.compress, keys=keys,
                  node=node, encrypt_data=cfg.security.encrypt_kv)
    if use_shared:
        kwargs["shared_cache"] = shared[0]
    inner = make_sender(t.backend, cache, layout, **kwargs)

    def release_shared():
        # every view of the shared segment must go before it can be unmapped
        release()
        inner.cache_data = None
        gc.collect()
        for s in shared:
            s.close()

    return PrefillWorker(name, runner, parts.blocks, GatheringSender(inner, runner) if parallel else inner,
                         **common, config=PrefillSchedulerConfig(pool.max_num_batched_tokens, pool.max_num_seqs),
                         on_close=release_shared, stream_layers=t.stream_layers)


def fault_points(name: str, faults: FaultConfig) -> FaultPoints | None:
    """The faults of worker `name` (tests and drills only); None: it has none."""
    if faults.instance not in (None, name) or not (faults.die_at or faults.step_delay_s):
        return None
    return FaultPoints(faults.die_at, faults.after, faults.step_delay_s)


def _colocated_scheduler(cfg: ClusterConfig, parts: EngineParts) -> Scheduler:
    """Both phases on one instance: the engine's scheduler (chunked in colocated_chunked)."""
    pool = cfg.colocated
    sched_cfg = SchedulerConfig(pool.max_num_seqs, pool.budget(cfg.mode), parts.max_model_len)
    if cfg.mode == modes.COLOCATED_CHUNKED:
        return ChunkedScheduler(sched_cfg, parts.blocks, parts.model_config.eos_token_ids)
    return Scheduler(sched_cfg, parts.blocks, parts.model_config.eos_token_ids)
