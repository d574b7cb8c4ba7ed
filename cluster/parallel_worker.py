"""The worker of a multi-rank (tp x pp) instance, built inside each rank's process.

Rank 0 gets the ordinary prefill or decode worker object over a
`ParallelRunner` (it broadcasts every step to the other ranks), with the
transfer layer on its canonical full-model cache (`cluster.parallel_kv`). The
other ranks get a `RankServer`, whose loop `RankHost` runs on a thread until
rank 0 closes the instance. In the cluster each rank is a Ray actor in the
instance's placement group (`cluster.local`): rank 0 a `WorkerActor`, the
others `RankActor`s.
"""
from __future__ import annotations

import gc
import logging
import threading
import traceback

import torch

from cluster.config import ClusterConfig
from cluster.parallel_kv import GatheringSender, ScatteringReceiver
from decode_worker.worker import DecodeWorker
from engine.block_manager import BlockManager
from engine.errors import ConfigError
from engine.parallel_runner import EngineArgs, RankServer, RankSpec, build_rank, leave_group
from engine.scheduler import SchedulerConfig
from kv_transfer import make_receiver, make_sender
from kv_transfer.layout import KVLayout
from kv_transfer.shared_cache import SharedKVCache
from prefill_worker.scheduler import PrefillSchedulerConfig
from prefill_worker.worker import PrefillWorker

log = logging.getLogger(__name__)


def build_parallel_worker(role: str, name: str, cfg: ClusterConfig, model_path: str, host: str, rank_spec: dict):
    """Rank 0: a PrefillWorker / DecodeWorker; any other rank: a RankServer (serve it with RankHost)."""
    pool = cfg.prefill if role == "prefill" else cfg.decode
    spec = RankSpec(**rank_spec)
    if role == "prefill" and cfg.transfer.stream_layers:
        raise ConfigError(f"transfer.stream_layers: a {pool.plan} prefill instance does not stream layers yet")
    shared: list[SharedKVCache] = []

    def allocate_shared(shape, dtype):
        shared.append(SharedKVCache(shape, dtype))
        return shared[-1].tensor

    use_shared = role == "prefill" and cfg.transfer.zero_copy
    args = EngineArgs(model_path, cfg.model.dtype, pool.block_size, pool.kv_cache_memory_gb,
                      cfg.model.max_model_len, pool.num_threads)
    runner, max_len = build_rank(spec, args, allocate_kv=allocate_shared if use_shared else torch.zeros)
    if spec.rank != 0:
        return runner
    mc = runner.cfg
    cache = runner.kv_cache.data   # [num_layers, 2, blocks, block_size, num_kv_heads, head_dim]
    layout = KVLayout.from_cache(cache, num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads)
    blocks = BlockManager(runner.kv_cache.num_blocks, runner.block_size)
    t = cfg.transfer
    common = dict(vocab_size=mc.vocab_size, eos_token_ids=mc.eos_token_ids, max_model_len=max_len)
    if role == "prefill":
        kwargs = dict(host=host, lease_ttl_s=t.lease_ttl_s, checksum=t.checksum, compress=t.compress)
        if use_shared:
            kwargs["shared_cache"] = shared[0]
        inner = make_sender(t.backend, cache, layout, **kwargs)

        def release():
            runner.close()
            leave_group()
            # every view of the shared segment must go before it can be unmapped
            runner.kv_cache.data = inner.cache_data = None
            gc.collect()
            for s in shared:
                s.close()

        return PrefillWorker(name, runner, blocks, GatheringSender(inner, runner), **common,
                             config=PrefillSchedulerConfig(pool.max_num_batched_tokens, pool.max_num_seqs),
                             on_close=release)

    def stop_ranks():
        runner.close()
        leave_group()

    receiver = ScatteringReceiver(make_receiver(t.backend, cache, layout), runner)
    return DecodeWorker(name, runner, blocks, receiver, **common,
                        config=SchedulerConfig(pool.max_num_seqs, pool.max_num_batched_tokens), on_close=stop_ranks)


class RankHost:
    """Runs a RankServer's loop on a thread (an actor's constructor must return)."""

    def __init__(self, server: RankServer, name: str) -> None:
        self.server, self.name = server, name
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-rank", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.server.serve()
        except Exception:   # rank 0 went away or a step failed: say so; the instance is broken
            self.error = traceback.format_exc()
            log.error("%s stopped serving:\n%s", self.name, self.error)
        finally:
            leave_group()

    @property
    def serving(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
