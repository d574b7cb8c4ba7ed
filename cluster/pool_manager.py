"""The pool manager: starts instances, learns of their deaths from Ray, replaces them.

One thread watches, with one `ray.wait`, every live rank's liveness reference
(`watch()`, which fails the moment the rank's process dies) and every starting
instance's `info()` (which resolves once its model is loaded):

  - a rank died -> the instance is dead: the router hears it at once
    (`on_dead`, which moves its requests), the instance's other ranks are
    killed, its placement group freed, its /dev/shm segments unlinked; a
    replacement is launched after the restart backoff while the pool's
    restart budget (`restart.max_restarts`) lasts;
  - an instance became ready -> the router adds it (`on_ready`): it takes work
    only now, with its model loaded;
  - an instance failed to start (or did not within START_TIMEOUT_S) -> it is
    cleaned up and retried under the same budget.

Placement (cluster/placement.py): an instance reserves its own placement group,
or under low node affinity takes a free slot of its unit's groups (the pool
manager reserves those first, and gives a dead instance's slot to its
replacement). A pool that cannot be placed stops the start with a ConfigError
after ray.placement_timeout_s, and so does a transfer backend that cannot work
between where the pools landed (shm across nodes).

Liveness comes from Ray, not from heartbeats, so a worker busy in a long step is
never taken for dead. The callbacks run on this thread: they must hand over to
the router's loop themselves.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import ray

from cluster import instances, placement
from cluster.config import ClusterConfig, to_dict
from cluster.instances import Instance
from cluster.placement import Units
from engine.errors import ConfigError
from kv_transfer.backends import ONE_NODE
from kv_transfer.curve import ZmqKeys

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0
POLL_S = 0.2          # a death is seen within this of Ray reporting it


@dataclass
class DeathRecord:
    name: str
    role: str
    reason: str
    seen_at: float           # monotonic, when the pool manager saw it
    replaced_by: str = ""


class PoolManager:
    def __init__(self, cfg: ClusterConfig, model_path: str, router_endpoint: str, host: str,
                 on_ready: Callable[[Instance], None], on_dead: Callable[[Instance, str, bool], None],
                 log_fn: Callable[[str], None] = print, keys: ZmqKeys | None = None) -> None:
        self.cfg, self.model_path, self.router_endpoint, self.host = cfg, model_path, router_endpoint, host
        self.keys = keys                               # the cluster's CURVE keys, handed to every worker
        self.units = Units(cfg) if cfg.affinity.regime == "low" else None
        self._cfg_dict = to_dict(cfg)
        # the workers need no router secrets: what they are handed can be read in Ray's logs
        self._cfg_dict["router"] = {**self._cfg_dict["router"], "auth_token": None}
        self.on_ready, self.on_dead, self.log = on_ready, on_dead, log_fn
        self.instances: dict[str, Instance] = {}      # live or starting
        self.deaths: list[DeathRecord] = []
        self.restarts: Counter[str] = Counter()      # role -> replacements launched
        self._next_index: Counter[str] = Counter()
        self._slots: dict[str, set[int]] = {}         # role -> slots held (cluster/placement.py)
        self._due: list[tuple[float, str]] = []      # (when, role): replacements waiting out their backoff
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stop_reports: dict[str, dict] = {}

    # -- start ---------------------------------------------------------------------------
    def launch(self, role: str) -> Instance:
        name = f"{role}-{self._next_index[role]}"
        self._next_index[role] += 1
        with self._lock:
            held = self._slots.setdefault(role, set())
            slot = next(i for i in range(len(held) + 1) if i not in held)   # a dead one's, or the next
            held.add(slot)
        inst = instances.launch(name, role, self.cfg.pools()[role], self._cfg_dict, self.model_path,
                                self.router_endpoint, self.keys, slot,
                                slots=self.units.slots(role, slot) if self.units is not None else None)
        with self._lock:
            self.instances[name] = inst
        return inst

    def start_pools(self, timeout_s: float = START_TIMEOUT_S) -> list[Instance]:
        """Launch every pool's instances and wait until all are ready (the cluster's start);
        returns them (`on_ready` is for the instances that come later)."""
        if self.units is not None:
            self.units.reserve()
            self.units.wait(self.cfg.ray.placement_timeout_s)
        for role, pool in self.cfg.pools().items():
            for _ in range(pool.num_instances):
                self.launch(role)
        instances.wait_placed(list(self.instances.values()), self.cfg.ray.placement_timeout_s)
        self._check_backend(list(self.instances.values()))
        deadline = time.monotonic() + timeout_s
        while True:
            starting = [i for i in self.instances.values() if i.ready_at is None]
            if not starting:
                return list(self.instances.values())
            refs = [r for i in starting for r in i.info_refs]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            if len(ready) < len(refs):
                raise ConfigError(f"workers {sorted(i.name for i in starting)} did not start in {timeout_s:.0f}s")
            for inst in starting:
                self._became_ready(inst)   # raises the actor's own error if it failed to build
                self.log(f"  {inst.name} ready (pid {inst.info['pid']}, {inst.pool.plan}, "
                         f"{inst.info['num_blocks']} KV blocks, on {where(inst)})")

    def _became_ready(self, inst: Instance) -> None:
        infos = ray.get(inst.info_refs)
        inst.info, inst.rank_infos = infos[0], infos[1:]
        inst.ready_at = time.monotonic()

    def _check_backend(self, insts: list[Instance]) -> None:
        """A backend that works on one node only (shm) with prefill and decode instances placed on
        different nodes would fail every transfer: a ConfigError now, before any model loads."""
        backend = self.cfg.transfer.backend
        if backend not in ONE_NODE or self.cfg.is_colocated:
            return
        nodes = {i.name: node for i in insts if (node := _rank0_node(i)) is not None}
        if len(set(nodes.values())) > 1:
            where_ = ", ".join(f"{name} on node {node[:12]}" for name, node in sorted(nodes.items()))
            raise ConfigError(f"transfer.backend {backend} works within one node only, but the pools were placed "
                              f"on {len(set(nodes.values()))} nodes ({where_}); use backend auto (shm within a "
                              f"node, zmq across) or zmq")

    # -- watch ---------------------------------------------------------------------------
    def start_watching(self) -> None:
        self._thread = threading.Thread(target=self._watch_loop, name="pool-manager", daemon=True)
        self._thread.start()

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except Exception:   # never let the watcher die: the cluster's recovery depends on it
                log.exception("pool manager: an iteration failed")
                time.sleep(POLL_S)

    def _watch_once(self) -> None:
        with self._lock:
            live = [i for i in self.instances.values() if not i.dead and not i.retiring]
        watched = {ref: inst for inst in live if inst.ready_at is not None for ref in inst.watch_refs}
        starting = {ref: inst for inst in live if inst.ready_at is None for ref in inst.info_refs[:1]}
        refs = [*watched, *starting]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
        else:
            ready = []
            self._stop.wait(POLL_S)
        if self._stop.is_set():
            return
        for ref in ready:
            if ref in watched and not watched[ref].dead:
                self._rank_ended(watched[ref], ref)
            elif ref in starting and not starting[ref].dead:
                self._start_ended(starting[ref])
        now = time.monotonic()
        for inst in [i for i in starting.values() if not i.dead and i.ready_at is None
                     and now - i.launched_at > START_TIMEOUT_S]:
            self._failed(inst, f"did not start in {START_TIMEOUT_S:.0f}s")
        self._launch_due(now)

    def _rank_ended(self, inst: Instance, ref) -> None:
        try:
            ray.get(ref, timeout=0)
            return   # watch() returned: the rank was stopped on purpose
        except ray.exceptions.GetTimeoutError:
            return
        except Exception as e:
            rank = inst.watch_refs.index(ref)
            self._died(inst, f"rank {rank} process died ({type(e).__name__})")

    def _start_ended(self, inst: Instance) -> None:
        try:
            self._became_ready(inst)
            self._check_backend([inst, *self.ready_instances()])
            self.on_ready(inst)
            waited = inst.ready_at - inst.launched_at
            self.log(f"  {inst.name} ready (pid {inst.info['pid']}, {inst.pool.plan}, on {where(inst)}) "
                     f"{waited:.1f}s after launch")
        except Exception as e:   # it failed to build: its error says why
            self._failed(inst, f"failed to start: {type(e).__name__}: {e}")

    def _died(self, inst: Instance, reason: str) -> None:
        replacing = self.restarts[inst.role] < self.cfg.restart.max_restarts
        inst.dead = True
        self.deaths.append(DeathRecord(inst.name, inst.role, reason, time.monotonic()))
        self.log(f"  {inst.name} died: {reason}")
        self.on_dead(inst, reason, replacing)
        self._clean_up(inst)
        if replacing:
            self._schedule_replacement(inst.role)

    def _failed(self, inst: Instance, reason: str) -> None:
        """A replacement (or an added instance) that did not come up: counts against the budget."""
        inst.dead = True
        log.error("%s %s", inst.name, reason)
        self.log(f"  {inst.name} {reason}")
        self._clean_up(inst)
        if self.restarts[inst.role] < self.cfg.restart.max_restarts:
            self._schedule_replacement(inst.role)
        else:
            self.on_dead(inst, reason, False)

    def _clean_up(self, inst: Instance) -> None:
        instances.kill(inst)
        self._free_slot(inst)
        gone = instances.reclaim_shared_memory(inst)
        if gone:
            log.info("reclaimed %d shared-memory segment(s) of %s", len(gone), inst.name)
        with self._lock:
            self.instances.pop(inst.name, None)

    def _schedule_replacement(self, role: str) -> None:
        delay = self.cfg.restart.backoff(self.restarts[role])
        self.restarts[role] += 1
        self._due.append((time.monotonic() + delay, role))

    def _launch_due(self, now: float) -> None:
        for entry in [e for e in self._due if e[0] <= now]:
            self._due.remove(entry)
            inst = self.launch(entry[1])
            self.log(f"  replacing a dead {entry[1]} instance: {inst.name}")
            if self.deaths:
                for d in reversed(self.deaths):
                    if d.role == entry[1] and not d.replaced_by:
                        d.replaced_by = inst.name
                        break

    # -- scaling (the autoscaler's actuator) -----------------------------------------------
    def starting(self, role: str) -> int:
        """Instances of `role` launched whose model is still loading (replacements included)."""
        with self._lock:
            return sum(1 for i in self.instances.values()
                       if i.role == role and i.ready_at is None and not i.dead and not i.retiring)

    def retire(self, name: str) -> None:
        """Stop an instance on purpose (scaling down): no replacement, not a death."""
        with self._lock:
            inst = self.instances.get(name)
            if inst is None:
                return
            inst.retiring = True
        self.stop_reports.update(instances.stop_all([inst]))
        self._free_slot(inst)
        with self._lock:
            self.instances.pop(name, None)

    def _free_slot(self, inst: Instance) -> None:
        with self._lock:
            self._slots.get(inst.role, set()).discard(inst.slot)

    def request_capacity(self) -> None:
        """Tell Ray's autoscaler what every instance we run or start needs, so a launched Ray
        cluster grows (or keeps) the nodes for it; without one this is a no-op."""
        bundles = [b for i in list(self.instances.values()) if not i.dead and not i.retiring
                   for b in placement.bundles(i.pool, i.pool.placement.for_instance(i.slot))]
        try:
            from ray.autoscaler.sdk import request_resources
            request_resources(bundles=bundles)
        except Exception as e:   # no autoscaler to ask (a local Ray): nothing to do
            log.debug("request_resources: %s", e)

    # -- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop watching, then stop every instance (graceful, then killed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            live = list(self.instances.values())
            self.instances.clear()
        self.stop_reports.update(instances.stop_all(live))
        if self.units is not None:
            self.units.remove()

    def ready_instances(self) -> list[Instance]:
        with self._lock:
            return [i for i in self.instances.values() if i.ready_at is not None and not i.dead]


def _rank0_node(inst: Instance) -> str | None:
    """The Ray node rank 0 of a placed instance runs on (its info once ready, else its bundle's)."""
    if inst.info:
        return inst.info["node_id"]
    from ray.util.placement_group import placement_group_table
    group, index = inst.slots[0]
    return (placement_group_table(group).get("bundles_to_node_id") or {}).get(index)


def where(inst: Instance) -> str:
    """The node address of each rank, e.g. "10.251.0.2" or "10.251.0.2 + 10.251.0.3"."""
    infos = ([inst.info] if inst.info else []) + inst.rank_infos
    return " + ".join(i.get("node_address", "?") for i in infos)
