"""One worker instance on Ray: its placement group, its rank actors, launching, stopping, reclaiming.

An instance of a t x p plan is one placement group (a bundle per rank, placed
as its pool's `placement` says: cluster/placement.py) holding a WorkerActor
(rank 0, with the worker object) and a RankActor per other rank; under low
node affinity its ranks take a slot of its unit's groups instead.
`launch` returns at once: the instance is ready when rank 0's `info()` call
resolves (its model is loaded), which the pool manager waits for alongside
everything else. Each rank's `watch()` call is its liveness reference.
"""
from __future__ import annotations

import glob
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from cluster import placement
from cluster.actors import RankActor, WorkerActor
from cluster.config import PoolConfig
from engine.errors import ConfigError
from kv_transfer.curve import ZmqKeys

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 30.0


@dataclass
class Instance:
    name: str
    role: str
    pool: PoolConfig
    group: object                               # its placement group (None: it holds a unit slot)
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
    slot: int = 0                               # its place in the pool (cluster/placement.py)
    slots: list = field(default_factory=list)   # (placement group, bundle index) of each rank

    @property
    def actors(self) -> list:
        return [self.rank0, *self.followers]

    @property
    def pids(self) -> list[int]:
        return [i["pid"] for i in ([self.info] if self.info else []) + self.rank_infos]


def launch(name: str, role: str, pool: PoolConfig, cfg_dict: dict, model_path: str, router_endpoint: str,
           keys: ZmqKeys | None = None, slot: int = 0, slots: list | None = None) -> Instance:
    """Reserve the instance's placement group (placed as its pool's `placement` says for the
    instance in `slot`), or run in `slots` (a unit's (group, bundle index) per rank), and start
    its rank actors; returns at once. `keys`: the cluster's CURVE keys."""
    num_ranks = pool.tp_size * pool.pp_size
    pg = None
    where = pool.placement.for_instance(slot)
    if slots is None:
        pg = placement_group(placement.bundles(pool, where), strategy=where.strategy, name=name,
                             bundle_label_selector=placement.label_selectors(pool, where))
        slots = [(pg, r) for r in range(num_ranks)]

    def place(rank: int) -> dict:
        group, index = slots[rank]
        return dict(num_cpus=pool.num_threads, num_gpus=pool.num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index))
    specs, store_at = [None], None
    if num_ranks > 1:   # where the others find rank 0: a port on rank 0's node, resolved there
        store_at = _store_address.options(scheduling_strategy=place(0)["scheduling_strategy"]).remote()
        specs = [dict(rank=r, tp_size=pool.tp_size, pp_size=pool.pp_size, backend="gloo") for r in range(num_ranks)]
    rank0 = WorkerActor.options(**place(0)).remote(role, name, cfg_dict, model_path, router_endpoint, specs[0],
                                                   keys, store_at)
    inst = Instance(name, role, pool, pg, rank0, launched_at=time.monotonic(), slot=slot, slots=list(slots))
    for rank, spec in enumerate(specs[1:], 1):   # the other ranks join rank 0's group
        inst.followers.append(RankActor.options(**place(rank)).remote(role, name, cfg_dict, model_path, spec,
                                                                      store_at))
    inst.info_refs = [a.info.remote() for a in inst.actors]
    inst.watch_refs = [a.watch.remote() for a in inst.actors]
    return inst


@ray.remote(num_cpus=0)
def _store_address() -> tuple[str, int]:
    """A free port on this node's own address (runs in rank 0's bundle): where rank 0's TCPStore
    listens. Rank 0 binds it again a moment later; a port taken meanwhile fails the instance
    at start, and it is started again."""
    addr = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((addr, 0))
        return addr, s.getsockname()[1]


def stop_all(insts: list[Instance]) -> dict[str, dict]:
    """Graceful stop (rank 0 first: closing its worker releases the other ranks), then kill.
    Returns how each rank > 0 ended."""
    unplaced = [i for i in insts if not _placed(i)]   # their actors never started: nothing to stop gracefully
    for inst in unplaced:
        kill(inst)
    insts = [i for i in insts if i not in unplaced]
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


def _placed(inst: Instance) -> bool:
    if inst.group is None:   # a unit's slot: its group was placed before the instance launched
        return True
    try:
        return placement_group_table(inst.group).get("state") == "CREATED"
    except Exception:   # its cluster is gone
        return False


def wait_placed(insts: list[Instance], timeout_s: float) -> None:
    """Every instance's placement group is reserved, or ConfigError naming what it needs."""
    refs = {i.group.ready(): i for i in insts if i.group is not None}
    if not refs:
        return
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    missing = [refs[r] for r in refs if r not in ready]
    if missing:
        needs = "; ".join(f"{m.name} needs {placement.describe_needs(m.pool, m.pool.placement.for_instance(m.slot))}"
                          for m in missing)
        raise ConfigError(f"the Ray cluster cannot place {', '.join(m.name for m in missing)} within "
                          f"{timeout_s:.0f}s: {needs}; the cluster has {ray.available_resources()} free")


def kill(inst: Instance) -> None:
    """End every rank's process now and free the placement group (a dead or broken instance)."""
    for actor in inst.actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:   # already gone
            log.debug("kill %s: %s", inst.name, e)
    if inst.group is None:   # a unit's slot: the group stays for its replacement
        return
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
