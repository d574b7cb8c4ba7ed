"""Builds a prefill, decode or colocated worker object from the cluster config (used inside the actors)."""
from __future__ import annotations

import gc

import torch

from cluster.config import ClusterConfig
from cluster.parallel_worker import build_parallel_worker
from decode_worker.colocated import ColocatedWorker
from decode_worker.worker import DecodeWorker
from engine.chunked_scheduler import ChunkedScheduler
from engine.instance import build_engine
from engine.scheduler import Scheduler, SchedulerConfig
from kv_transfer import make_receiver, make_sender
from kv_transfer.layout import KVLayout
from kv_transfer.shared_cache import SharedKVCache
from prefill_worker.scheduler import PrefillSchedulerConfig
from prefill_worker.worker import PrefillWorker
from router import modes


def build_worker(role: str, name: str, cfg: ClusterConfig, model_path: str, host: str = "127.0.0.1",
                 rank_spec: dict | None = None):
    """`rank_spec` (a RankSpec's fields): this process is one rank of a multi-rank instance."""
    if role == "colocated":
        return build_colocated_worker(name, cfg, model_path)
    if rank_spec is not None:
        return build_parallel_worker(role, name, cfg, model_path, host, rank_spec)
    pool = cfg.prefill if role == "prefill" else cfg.decode
    shared: list[SharedKVCache] = []

    def allocate_shared(shape, dtype):
        shared.append(SharedKVCache(shape, dtype))
        return shared[-1].tensor

    use_shared = role == "prefill" and cfg.transfer.zero_copy
    parts = build_engine(model_path, cfg.model.dtype, pool.block_size, pool.kv_cache_memory_gb,
                         cfg.model.max_model_len, pool.num_threads,
                         allocate_kv=allocate_shared if use_shared else torch.zeros)
    mc = parts.model_config
    cache = parts.runner.kv_cache.data
    layout = KVLayout.from_cache(cache, num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads)
    t = cfg.transfer
    common = dict(vocab_size=mc.vocab_size, eos_token_ids=mc.eos_token_ids, max_model_len=parts.max_model_len)
    if role == "prefill":
        kwargs = dict(host=host, lease_ttl_s=t.lease_ttl_s, checksum=t.checksum, compress=t.compress)
        if use_shared:
            kwargs["shared_cache"] = shared[0]
        sender = make_sender(t.backend, cache, layout, **kwargs)

        def release():
            # every view of the shared segment must go before it can be unmapped
            parts.runner.release_kv_cache()
            sender.cache_data = None
            gc.collect()
            for s in shared:
                s.close()

        return PrefillWorker(name, parts.runner, parts.blocks, sender, **common,
                             config=PrefillSchedulerConfig(pool.max_num_batched_tokens, pool.max_num_seqs),
                             on_close=release, stream_layers=t.stream_layers)
    receiver = make_receiver(t.backend, cache, layout)
    return DecodeWorker(name, parts.runner, parts.blocks, receiver, **common,
                        config=SchedulerConfig(pool.max_num_seqs, pool.max_num_batched_tokens))


def build_colocated_worker(name: str, cfg: ClusterConfig, model_path: str) -> ColocatedWorker:
    """Both phases on one instance: the engine's scheduler (chunked in colocated_chunked), no transfer."""
    pool = cfg.colocated
    parts = build_engine(model_path, cfg.model.dtype, pool.block_size, pool.kv_cache_memory_gb,
                         cfg.model.max_model_len, pool.num_threads)
    mc = parts.model_config
    sched_cfg = SchedulerConfig(pool.max_num_seqs, pool.budget(cfg.mode), parts.max_model_len)
    if cfg.mode == modes.COLOCATED_CHUNKED:
        scheduler = ChunkedScheduler(sched_cfg, parts.blocks, mc.eos_token_ids)
    else:
        scheduler = Scheduler(sched_cfg, parts.blocks, mc.eos_token_ids)
    return ColocatedWorker(name, parts.runner, parts.blocks, scheduler, vocab_size=mc.vocab_size,
                           max_model_len=parts.max_model_len)
