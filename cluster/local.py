"""Start and stop a whole cluster from one `ClusterConfig`: Ray, the worker pools, the router.

    with Cluster(load_config("deploy/local.yaml")) as cluster:
        client = Client(cluster.address)

The router runs in this process, on its own asyncio loop in a thread; the
workers are Ray actors (one process each). `stop` drains the router, stops
every actor, removes their placement groups and, if it started Ray, stops Ray.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

from cluster.config import ClusterConfig, to_dict
from cluster.ray_cluster import placement_group_for, remove_placement_groups, start_ray, stop_ray
from engine.default_model import default_model_path
from engine.errors import ConfigError
from engine.tokenizer import load_tokenizer
from engine.model_config import load_model_config
from router.links import WorkerLinks
from router.server import InstanceInfo, ModelInfo, Router

# Ray itself (and cluster.actors, which imports it) is imported inside the functions that use
# it: Ray reads its auth settings when it is imported, and start_ray sets them first.

START_TIMEOUT_S = 300.0


class _LoopThread:
    """An asyncio loop on a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Cluster:
    def __init__(self, config: ClusterConfig, log=print) -> None:
        self.config = config.check()
        self.log = log
        self.router = None
        self.actors: dict[str, object] = {}
        self._rank_actors: dict[str, object] = {}   # ranks > 0 of multi-rank instances
        self.rank_infos: dict[str, dict] = {}       # their pids
        self.rank_stops: dict[str, dict] = {}       # how each of them ended, after stop()
        self.infos: dict[str, dict] = {}
        self._groups: list = []
        self._loop: _LoopThread | None = None
        self._started_ray = False
        self._links = None

    @property
    def address(self) -> str:
        return f"{self.config.router.host}:{self.router.port}"

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------
    def start(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        model_path = cfg.model.path or default_model_path()
        pools = cfg.pools()
        need = sum(p.num_instances * p.num_threads * p.tp_size * p.pp_size for p in pools.values())
        self._started_ray = start_ray(cfg.ray.address, cfg.ray.host, cfg.ray.num_cpus or max(need, os.cpu_count() or 1))
        counts = " + ".join(f"{p.num_instances} {role}" for role, p in pools.items())
        self.log(f"ray ready in {time.monotonic() - t0:.1f}s; mode {cfg.mode}: starting {counts} "
                 f"instance(s) of {model_path}")
        self._loop = _LoopThread()
        self._links = links = self._loop.run(_make_links(self._bind_host()), timeout=30)
        self._start_actors(model_path, links.endpoint)
        self._start_router(model_path, links)
        self.log(f"router listening on {self.address} ({time.monotonic() - t0:.1f}s after start)")

    def _bind_host(self) -> str:
        if self.config.ray.host != "auto":
            return self.config.ray.host
        import ray
        return ray.util.get_node_ip_address()

    def _start_actors(self, model_path: str, router_endpoint: str) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.actors import RankActor, WorkerActor
        cfg, cfg_dict = self.config, to_dict(self.config)
        pending = {}
        for role, pool in cfg.pools().items():
            for i in range(pool.num_instances):
                name = f"{role}-{i}"
                pg = placement_group_for(name, pool.num_threads, pool.num_gpus, pool.tp_size * pool.pp_size)
                self._groups.append(pg)
                specs = _rank_specs(pool, pg, self._bind_host())   # [None] for a one-rank instance

                def place(rank: int, pg=pg) -> dict:
                    return dict(num_cpus=pool.num_threads, num_gpus=pool.num_gpus, scheduling_strategy=
                                PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank))
                actor = WorkerActor.options(name=None, **place(0)).remote(
                    role, name, cfg_dict, model_path, router_endpoint, cfg.ray.host, specs[0])
                self.actors[name] = actor
                pending[actor.info.remote()] = name
                for rank, spec in enumerate(specs[1:], 1):   # the other ranks join rank 0's group
                    follower = RankActor.options(**place(rank)).remote(role, name, cfg_dict, model_path,
                                                                       cfg.ray.host, spec)
                    self._rank_actors[f"{name}.rank{rank}"] = follower
                    pending[follower.info.remote()] = f"{name}.rank{rank}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ConfigError(f"workers {sorted(pending.values())} did not start in {START_TIMEOUT_S:.0f}s")
            name = pending.pop(ready[0])
            info = ray.get(ready[0])   # raises the actor's own error if it failed
            if name in self._rank_actors:
                self.rank_infos[name] = info
                continue
            self.infos[name] = info
            plan = cfg.pools()[info["role"]].plan
            self.log(f"  {name} ready (pid {info['pid']}, {plan}, {info['num_blocks']} KV blocks)")

    def _start_router(self, model_path: str, links) -> None:
        cfg = self.config
        mc = load_model_config(model_path)
        max_len = min(cfg.model.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        last_role = "colocated" if cfg.is_colocated else "decode"   # the pool that streams the tokens
        decode_infos = [i for i in self.infos.values() if i["role"] == last_role]
        smallest = min(self.infos.values(), key=lambda i: i["num_blocks"] * i["block_size"])
        model = ModelInfo(name=model_path, vocab_size=mc.vocab_size, max_model_len=max_len,
                          num_blocks=smallest["num_blocks"], block_size=smallest["block_size"],
                          transfer_backend=cfg.transfer.backend)
        if not decode_infos:
            raise ConfigError(f"{last_role}.num_instances must be >= 1")
        self.router = Router(cfg.router, model, load_tokenizer(model_path), links, mode=cfg.mode)
        pools = cfg.pools()
        for name, info in self.infos.items():
            self.router.add_instance(InstanceInfo(name, info["role"], pools[info["role"]].plan,
                                                  info["command_endpoint"], info.get("transfer_endpoint", "")))
        self._loop.run(self.router.start(), timeout=30)

    # -- stop ------------------------------------------------------------------------------
    def worker_stats(self) -> dict[str, dict]:
        import ray
        return {name: ray.get(a.stats.remote(), timeout=30) for name, a in self.actors.items()}

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain and stop everything this cluster started; safe to call twice."""
        drain = self.config.router.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self.router is not None and self._loop is not None:
            try:
                self._loop.run(self.router.stop(drain), timeout=drain + 30)
            except Exception as e:   # keep tearing down: actors and Ray must not be left behind
                self.log(f"router stop: {e}")
        self._stop_actors()
        if self._loop is not None:
            if self._links is not None:
                self._loop.loop.call_soon_threadsafe(self._links.close)
                self._links = None
            self._loop.close()
            self._loop = None
        self.router = None
        remove_placement_groups(self._groups)
        self._groups.clear()
        if self._started_ray:
            stop_ray()
            self._started_ray = False

    def _stop_actors(self) -> None:
        if not self.actors and not self._rank_actors:
            return
        import ray
        # rank 0 first: closing its worker releases the other ranks of its instance from their loops
        refs = [a.stop.remote() for a in self.actors.values()]
        ray.wait(refs, num_returns=len(refs), timeout=30)
        rank_refs = {name: a.stop.remote() for name, a in self._rank_actors.items()}
        ray.wait(list(rank_refs.values()), num_returns=len(rank_refs), timeout=30)
        self.rank_stops = {name: _stop_report(ref) for name, ref in rank_refs.items()}
        actors = [*self.actors.values(), *self._rank_actors.values()]
        # a graceful exit first (a kill mid-teardown prints tracebacks), a kill for the stuck
        exits = [a.__ray_terminate__.remote() for a in actors]
        ray.wait(exits, num_returns=len(exits), timeout=10)
        for actor in actors:
            ray.kill(actor)
        self.actors.clear()
        self._rank_actors.clear()


def _rank_specs(pool, pg, host: str) -> list[dict | None]:
    """Where each rank of a multi-rank instance finds the others: a TCPStore on rank 0's node."""
    num_ranks = pool.tp_size * pool.pp_size
    if num_ranks == 1:
        return [None]

    import ray
    from ray.util.placement_group import placement_group_table
    node_id = placement_group_table(pg)["bundles_to_node_id"][0]
    addr = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), host)
    with socket.socket() as s:   # free here; on another node it is a guess (multi-node: untested)
        s.bind((host, 0))
        port = s.getsockname()[1]
    # gloo: the engine runs its tensors on CPU (NCCL, the same code path, once they live on a GPU)
    return [dict(rank=r, tp_size=pool.tp_size, pp_size=pool.pp_size, master_addr=addr, master_port=port,
                 backend="gloo") for r in range(num_ranks)]


def _stop_report(ref) -> dict:
    """How a rank > 0 ended: {"stopped": its loop ended, "error": what ended it, if anything}."""
    import ray
    try:
        return ray.get(ref, timeout=0)
    except Exception as e:   # it did not answer in time, or its process is gone
        return {"stopped": False, "error": f"{type(e).__name__}: {e}"}


async def _make_links(host: str) -> WorkerLinks:
    return WorkerLinks(host)   # made on the router's loop: its zmq.asyncio sockets belong to that loop
