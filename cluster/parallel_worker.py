"""The engine of a multi-rank (tp x pp) instance, built inside each rank's process.

Rank 0 gets a `ParallelRunner` (it broadcasts every step to the other ranks);
`cluster.worker_factory` builds the ordinary prefill, decode or colocated
worker over it exactly as over a one-rank `ModelRunner`, with the transfer
layer on its canonical full-model cache (`cluster.parallel_kv`). The other
ranks get a `RankServer`, whose loop `RankHost` runs on a thread until rank 0
closes the instance. In the cluster each rank is a Ray actor in the
instance's placement group (`cluster.local`): rank 0 a `WorkerActor`, the
others `RankActor`s.
"""
from __future__ import annotations

import logging
import threading
import traceback

import torch

from engine.block_manager import BlockManager
from engine.instance import EngineParts
from engine.parallel_runner import EngineArgs, ParallelRunner, RankServer, RankSpec, build_rank, leave_group

log = logging.getLogger(__name__)


def build_rank_engine(spec: RankSpec, args: EngineArgs, allocate_kv=torch.zeros) -> EngineParts | RankServer:
    """Join the instance's group; rank 0: its engine parts over a ParallelRunner (`allocate_kv`
    makes the canonical cache the transfer layer sees), any other rank: a RankServer."""
    runner, max_len = build_rank(spec, args, allocate_kv=allocate_kv)
    if spec.rank != 0:
        return runner
    return EngineParts(runner.cfg, runner, BlockManager(runner.kv_cache.num_blocks, runner.block_size), max_len)


def release_ranks(runner: ParallelRunner) -> None:
    """Rank 0's close: the other ranks leave their loops, this one the group, and the canonical
    cache loses its last reference here (a shared segment can be unmapped then)."""
    runner.close()
    leave_group()
    runner.kv_cache.data = None


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
