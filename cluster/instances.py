"""One worker instance on Ray: its placement group, its rank actors, launching, stopping, reclaiming.

An instance of a t x p plan is one placement group (a bundle per rank) holding a
WorkerActor (rank 0, with the worker object) and a RankActor per other rank.
`launch` returns at once: the instance is ready when rank 0's `info()` call
resolves (its model is loaded), which the pool manager waits for alongside
everything else. Each rank's `watch()` call is its liveness reference.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster.actors import RankActor, WorkerActor
from cluster.config import PoolConfig
from engine.errors import ConfigError

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0


@dataclass
class Instance:
    name: str
    role: str
    pool: PoolConfig
    group: object                               # its placement group
    rank0: object                               # WorkerActor handle
    followers: list = field(default_factory=list)   # RankActor handles, ranks 1..
    info_refs: list = field(default_factory=list)   # rank 0's info() first, then each follower's
    watch_refs: list = field(default_factory=list)  # one watch() per rank, same order
    launched_at: float = 0.0
    ready_at: float | None = None
    info: dict | None = None                    # rank 0's info() once ready
    rank_infos: list = field(default_factory=list)
    dead: bool = False
    retiring: bool = False                      # being stopped on purpose (scaling down)

    @property
    def actors(self) -> list:
        return [self.rank0, *self.followers]

    @property
    def pids(self) -> list[int]:
        return [i["pid"] for i in ([self.info] if self.info else []) + self.rank_infos]


def bundles(pool: PoolConfig) -> list[dict]:
    """One resource bundle per rank of an instance of this pool."""
    bundle = {"CPU": float(pool.num_threads)}
    if pool.num_gpus:
        bundle["GPU"] = float(pool.num_gpus)
    return [dict(bundle) for _ in range(pool.tp_size * pool.pp_size)]


def launch(name: str, role: str, pool: PoolConfig, cfg_dict: dict, model_path: str, router_endpoint: str,
           host: str) -> Instance:
    """Reserve the instance's placement group and start its rank actors; returns at once."""
    num_ranks = pool.tp_size * pool.pp_size
    pg = placement_group(bundles(pool), strategy="PACK", name=name)

    def place(rank: int) -> dict:
        return dict(num_cpus=pool.num_threads, num_gpus=pool.num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank))
    specs = _rank_specs(pool, pg, host) if num_ranks > 1 else [None]
    rank0 = WorkerActor.options(**place(0)).remote(role, name, cfg_dict, model_path, router_endpoint, host,
                                                   specs[0])
    inst = Instance(name, role, pool, pg, rank0, launched_at=time.monotonic())
    for rank, spec in enumerate(specs[1:], 1):   # the other ranks join rank 0's group
        inst.followers.append(RankActor.options(**place(rank)).remote(role, name, cfg_dict, model_path, host, spec))
    inst.info_refs = [a.info.remote() for a in inst.actors]
    inst.watch_refs = [a.watch.remote() for a in inst.actors]
    return inst


def _rank_specs(pool: PoolConfig, pg, host: str) -> list[dict]:
    """Where each rank finds the others: a TCPStore on rank 0's node (waits for the group)."""
    ray.get(pg.ready(), timeout=60)
    node_id = placement_group_table(pg)["bundles_to_node_id"][0]
    addr = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), host)
    with socket.socket() as s:   # free here; on another node it is a guess (multi-node: untested)
        s.bind((host if host != "auto" else addr, 0))
        port = s.getsockname()[1]
    # gloo: the engine runs its tensors on CPU (NCCL, the same code path, once they live on a GPU)
    return [dict(rank=r, tp_size=pool.tp_size, pp_size=pool.pp_size, master_addr=addr, master_port=port,
                 backend="gloo") for r in range(pool.tp_size * pool.pp_size)]


def stop_all(insts: list[Instance]) -> dict[str, dict]:
    """Graceful stop (rank 0 first: closing its worker releases the other ranks), then kill.
    Returns how each rank > 0 ended."""
    if not insts:
        return {}
    refs = [i.rank0.stop.remote() for i in insts]
    ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
    ranks = {f"{i.name}.rank{r}": a.stop.remote() for i in insts for r, a in enumerate(i.followers, 1)}
    ray.wait(list(ranks.values()), num_returns=len(ranks), timeout=STOP_TIMEOUT_S)
    reports = {name: _stop_report(ref) for name, ref in ranks.items()}
    # a graceful exit first (a kill mid-teardown prints tracebacks), a kill for the stuck
    exits = [a.__ray_terminate__.remote() for i in insts for a in i.actors]
    ray.wait(exits, num_returns=len(exits), timeout=10)
    for inst in insts:
        kill(inst)
    return reports


def wait_placed(insts: list[Instance], timeout_s: float) -> None:
    """Every instance's placement group is reserved, or ConfigError naming what it needs."""
    refs = {i.group.ready(): i for i in insts}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    missing = [refs[r] for r in refs if r not in ready]
    if missing:
        i = missing[0]
        need = f"{i.pool.tp_size * i.pool.pp_size} x {i.pool.num_threads} CPU"
        if i.pool.num_gpus:
            need += f" + {i.pool.num_gpus} GPU"
        raise ConfigError(f"the Ray cluster cannot place {', '.join(m.name for m in missing)}: each needs "
                          f"{need}; the cluster has {ray.available_resources()} free")


def kill(inst: Instance) -> None:
    """End every rank's process now and free the placement group (a dead or broken instance)."""
    for actor in inst.actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:   # already gone
            log.debug("kill %s: %s", inst.name, e)
    try:
        remove_placement_group(inst.group)
    except Exception as e:   # already gone with its cluster
        log.debug("placement group of %s: %s", inst.name, e)


def _stop_report(ref) -> dict:
    try:
        return ray.get(ref, timeout=0)
    except Exception as e:   # it did not answer in time, or its process is gone
        return {"stopped": False, "error": f"{type(e).__name__}: {e}"}


@ray.remote(num_cpus=0)
def _unlink_segments(pids: list[int]) -> list[str]:
    import glob
    import os
    gone = []
    for pid in pids:
        for path in glob.glob(f"/dev/shm/pdkv-{pid}-*"):
            try:
                os.unlink(path)
                gone.append(os.path.basename(path))
            except FileNotFoundError:
                pass
    return gone


def reclaim_shared_memory(inst: Instance, timeout_s: float = 10.0) -> list[str]:
    """Unlink the /dev/shm segments the instance's dead processes created (named pdkv-<pid>-...),
    on the node they ran on; returns their names."""
    nodes: dict[str, list[int]] = {}
    for i in ([inst.info] if inst.info else []) + inst.rank_infos:
        nodes.setdefault(i.get("node_id", ""), []).append(i["pid"])
    refs = [(_unlink_segments.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
             if node else _unlink_segments).remote(pids) for node, pids in nodes.items()]
    gone: list[str] = []
    for ref in refs:
        try:
            gone.extend(ray.get(ref, timeout=timeout_s))
        except Exception as e:   # the node itself is gone: its /dev/shm went with it
            log.warning("could not reclaim shared memory of %s: %s", inst.name, e)
    return gone
