"""The Ray actor shells around a worker: build it, host its step loop, report, stop.

A multi-rank instance is one WorkerActor (rank 0, with the worker object) and a
RankActor per other rank, all in the instance's placement group.

Everything a worker does happens in the worker object and its host loop;
the actor only exists so Ray can place the process and keep it alive.

`watch()` is the instance's liveness reference: a call that returns only when
the actor is stopped, in its own concurrency group so that it never waits
behind (or holds up) the other calls. When the process dies, Ray fails the
pending call at once, which is how the pool manager learns of a death, however
long a step the worker is running.
"""
from __future__ import annotations

import logging
import os
import threading

import ray

from cluster.config import from_dict
from cluster.parallel_worker import RankHost
from cluster.worker_factory import build_worker
from cluster.worker_host import WorkerHost


class _Watched:
    def _init_watch(self) -> None:
        self._stopped = threading.Event()

    @ray.method(concurrency_group="watch")
    def watch(self) -> bool:
        """Returns once the actor is stopped; fails with the actor's death otherwise."""
        self._stopped.wait()
        return True


@ray.remote(max_restarts=0, concurrency_groups={"watch": 1})
class WorkerActor(_Watched):
    def __init__(self, role: str, name: str, cfg_dict: dict, model_path: str, router_endpoint: str,
                 host: str, rank_spec: dict | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
        self._init_watch()
        if host == "auto":   # multi-node: bind the address Ray knows this node by
            host = ray.util.get_node_ip_address()
        worker = build_worker(role, name, from_dict(cfg_dict), model_path, host, rank_spec)
        self.host = WorkerHost(worker, router_endpoint, host)
        self.host.start()

    def info(self) -> dict:
        w = self.host.worker
        return {"name": w.name, "role": w.role, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "command_endpoint": self.host.command_endpoint, "transfer_endpoint": w.transfer_endpoint,
                "num_blocks": w.blocks.num_blocks, "block_size": w.blocks.block_size}

    def stats(self) -> dict:
        return {**self.host.worker.stats(), "loop_error": self.host.error}

    def stop(self) -> bool:
        self.host.stop()
        self._stopped.set()
        return True


@ray.remote(max_restarts=0, concurrency_groups={"watch": 1})
class RankActor(_Watched):
    """A rank other than 0 of a multi-rank instance: runs what rank 0 broadcasts (cluster.parallel_worker)."""

    def __init__(self, role: str, name: str, cfg_dict: dict, model_path: str, host: str, rank_spec: dict) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
        self._init_watch()
        server = build_worker(role, name, from_dict(cfg_dict), model_path, host, rank_spec)
        self.host = RankHost(server, name)

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "serving": self.host.serving}

    def stop(self, timeout_s: float = 10.0) -> dict:
        """Waits for the loop to end (rank 0's close releases it); reports how it ended."""
        report = {"stopped": self.host.join(timeout_s), "error": self.host.error}
        self._stopped.set()
        return report
