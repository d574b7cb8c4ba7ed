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
from kv_transfer.curve import ZmqKeys


def node_address() -> str:
    """The address Ray knows this node by: every socket of a worker binds it (never 0.0.0.0)."""
    return ray.util.get_node_ip_address()


def with_store(rank_spec: dict | None, store_at: tuple[str, int] | None, host: str) -> dict | None:
    """A rank's spec completed with where rank 0's TCPStore listens and its own address."""
    if rank_spec is None:
        return None
    spec = {**rank_spec, "host": host}
    if store_at is not None:
        spec["master_addr"], spec["master_port"] = store_at[0], int(store_at[1])
    return spec


class _Watched:
    def _init_watch(self) -> None:
        self._stopped = threading.Event()

    @ray.method(concurrency_group="watch")
    def watch(self) -> bool:
        """Returns once the actor is stopped; fails with the actor's death otherwise."""
        self._stopped.wait()
        return True


def _data_endpoint(worker) -> str:
    """A prefill worker's KV data socket (kv_transfer.curve), "" for any other."""
    sender = getattr(worker, "sender", None)
    sender = getattr(sender, "inner", sender)   # a multi-rank instance's GatheringSender
    return getattr(sender, "data_endpoint", "") or ""


@ray.remote(max_restarts=0, concurrency_groups={"watch": 1})
class WorkerActor(_Watched):
    def __init__(self, role: str, name: str, cfg_dict: dict, model_path: str, router_endpoint: str,
                 rank_spec: dict | None = None, keys: ZmqKeys | None = None,
                 store_at: tuple[str, int] | None = None) -> None:
        """`keys`: the cluster's CURVE keys (every socket of this worker demands them);
        `store_at`: rank 0's TCPStore address of a multi-rank instance (resolved on its node)."""
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
        self._init_watch()
        host = node_address()
        node = ray.get_runtime_context().get_node_id()
        spec = with_store(rank_spec, store_at, host)
        self.store_address = f"{spec['master_addr']}:{spec['master_port']}" if spec else None
        worker = build_worker(role, name, from_dict(cfg_dict), model_path, host, spec, keys=keys, node=node)
        self.host = WorkerHost(worker, router_endpoint, host, keys)
        self.host.start()

    def info(self) -> dict:
        w = self.host.worker
        return {"name": w.name, "role": w.role, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_address": node_address(), "command_endpoint": self.host.command_endpoint,
                "transfer_endpoint": w.transfer_endpoint, "data_endpoint": _data_endpoint(w),
                "store_address": self.store_address,
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

    def __init__(self, role: str, name: str, cfg_dict: dict, model_path: str, rank_spec: dict,
                 store_at: tuple[str, int] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
        self._init_watch()
        host = node_address()
        server = build_worker(role, name, from_dict(cfg_dict), model_path, host, with_store(rank_spec, store_at, host))
        self.host = RankHost(server, name)

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_address": node_address(), "serving": self.host.serving}

    def stop(self, timeout_s: float = 10.0) -> dict:
        """Waits for the loop to end (rank 0's close releases it); reports how it ended."""
        report = {"stopped": self.host.join(timeout_s), "error": self.host.error}
        self._stopped.set()
        return report
