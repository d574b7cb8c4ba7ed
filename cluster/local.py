"""Start and stop a whole cluster from one `ClusterConfig`: Ray, the worker pools, the router.

    with Cluster(load_config("deploy/local.yaml")) as cluster:
        client = Client(cluster.address)

The router runs in this process, on its own asyncio loop in a thread; the
workers are Ray actors (one process each), started, watched and replaced by the
pool manager (cluster/pool_manager.py), which tells the router of deaths and
replacements. `stop` drains the router, stops every actor, removes their
placement groups and, if it started Ray, stops Ray.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

from cluster.autoscaler import Autoscaler
from cluster.config import ClusterConfig
from cluster.ray_cluster import start_ray, stop_ray
from engine.default_model import default_model_path
from engine.model_config import load_model_config
from engine.tokenizer import load_tokenizer
from kv_transfer.curve import ZmqKeys
from router.autoscale import make_policy
from router.conditional import ConditionalPolicy
from router.planner.profile import load_profile, resolve_profile
from router.links import WorkerLinks
from router.server import InstanceInfo, ModelInfo, Router


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
        self.pools = None                           # the PoolManager, once Ray is up
        self.autoscaler = None                      # with autoscaling.policy load or slo
        self.rank_stops: dict[str, dict] = {}       # how each rank > 0 ended, after stop()
        self._loop: _LoopThread | None = None
        self._started_ray = False
        self._links = None

    @property
    def address(self) -> str:
        return f"{self.config.router.host}:{self.router.port}"

    @property
    def reply_endpoint(self) -> str | None:
        """Where the workers' replies come in (the router's PULL socket)."""
        return self._links.endpoint if self._links is not None else None

    @property
    def infos(self) -> dict[str, dict]:
        """Rank 0's info of every ready, live instance, by name."""
        return {i.name: i.info for i in self.pools.ready_instances()} if self.pools else {}

    @property
    def actors(self) -> dict[str, object]:
        return {i.name: i.rank0 for i in self.pools.ready_instances()} if self.pools else {}

    @property
    def rank_infos(self) -> dict[str, dict]:
        """The other ranks of multi-rank instances: {"<name>.rank<r>": info}."""
        return {f"{i.name}.rank{r}": info for i in (self.pools.ready_instances() if self.pools else [])
                for r, info in enumerate(i.rank_infos, 1)}

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
        scaling = cfg.autoscaling.policy != "none"   # then the pools may grow to their maximum
        need = sum((cfg.autoscaling.bounds(role).max_instances if scaling else p.num_instances)
                   * p.num_threads * p.tp_size * p.pp_size for role, p in pools.items())
        self._started_ray = start_ray(cfg.ray.address, cfg.ray.host, cfg.ray.num_cpus or max(need, os.cpu_count() or 1))
        if cfg.router.host == "auto":   # the gRPC API on this node's own address, like every other socket
            self.config = cfg = cfg.replace(router={"host": self._bind_host()})
        counts = " + ".join(f"{p.num_instances} {role}" for role, p in pools.items())
        self.log(f"ray ready in {time.monotonic() - t0:.1f}s; mode {cfg.mode}: starting {counts} "
                 f"instance(s) of {model_path}")
        # one CURVE key pair per cluster: the workers get it in their actor arguments (Ray's channel
        # is token-authenticated); every zmq socket of the cluster then demands it
        keys = ZmqKeys.generate() if cfg.security.curve else None
        self._loop = _LoopThread()
        self._links = links = self._loop.run(_make_links(self._bind_host(), keys), timeout=30)
        # here, not at the top: Ray (which these import) reads its auth settings when it is
        # imported, and start_ray has just set them
        from cluster.pool_manager import PoolManager
        self.pools = PoolManager(cfg, model_path, links.endpoint, cfg.ray.host, self._instance_ready,
                                 self._instance_dead, self.log, keys=keys)
        started = self.pools.start_pools()
        self._start_router(model_path, links, [i.info for i in started])
        for inst in started:
            self.router.add_instance(self._instance_info(inst))
        self._loop.run(self.router.start(), timeout=30)
        self.pools.start_watching()
        if scaling:
            self._start_autoscaler()
        self.log(f"router listening on {self.address} ({time.monotonic() - t0:.1f}s after start)")

    def _start_autoscaler(self) -> None:
        a = self.config.autoscaling
        profile = load_profile(resolve_profile(a.profile)) if a.policy == "slo" else None
        policy = make_policy(a, profile, self.config.mode)
        self.autoscaler = Autoscaler(self.config, self.pools, self.router, self._loop.loop, policy, self.log)
        self.autoscaler.start()

    def _bind_host(self) -> str:
        """Where this process's sockets listen: ray.host, or in a cluster joined at ray.address
        (or with ray.host auto) the address Ray knows this node by, which the workers on
        other nodes can reach."""
        if self.config.ray.host != "auto" and not self.config.ray.address:
            return self.config.ray.host
        import ray
        return ray.util.get_node_ip_address()

    def _start_router(self, model_path: str, links, infos: list[dict]) -> None:
        cfg = self.config
        mc = load_model_config(model_path)
        max_len = min(cfg.model.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        # every instance of a pool has the same cache (a replacement too): the smallest bounds a request
        smallest = min(infos, key=lambda i: i["num_blocks"] * i["block_size"])
        model = ModelInfo(name=model_path, vocab_size=mc.vocab_size, max_model_len=max_len,
                          num_blocks=smallest["num_blocks"], block_size=smallest["block_size"],
                          transfer_backend=cfg.transfer.backend)
        conditional = None
        if cfg.local_prefills:   # router.disaggregation never / conditional: the placement model
            c = cfg.conditional
            latency = load_profile(resolve_profile(c.profile)).latency(1, 1)
            conditional = ConditionalPolicy(latency, c.ttft_slo_s, c.tpot_slo_s, c.local_prefill_tokens,
                                            remote_fits=c.remote_fits)
        self.router = Router(cfg.router, model, load_tokenizer(model_path), links, mode=cfg.mode,
                             conditional=conditional)

    @staticmethod
    def _instance_info(inst) -> InstanceInfo:
        return InstanceInfo(inst.name, inst.role, inst.pool.plan, inst.info["command_endpoint"],
                            inst.info["transfer_endpoint"], inst.pool.enable_prefix_caching)

    # -- the pool manager's news (its thread) -> the router's loop ---------------------------
    def _instance_ready(self, inst) -> None:
        self._loop.loop.call_soon_threadsafe(self.router.add_instance, self._instance_info(inst))

    def _instance_dead(self, inst, reason: str, replacing: bool) -> None:
        if inst.ready_at is None:   # never served: only a replacement the router was told of ends
            self._loop.loop.call_soon_threadsafe(self.router.core.replacement_abandoned, inst.role)
            return
        self._loop.loop.call_soon_threadsafe(self.router.instance_died, inst.name, reason, replacing)

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
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self.pools is not None:
            self.pools.stop()
            self.rank_stops = self.pools.stop_reports
        if self._loop is not None:
            if self._links is not None:
                self._loop.loop.call_soon_threadsafe(self._links.close)
                self._links = None
            self._loop.close()
            self._loop = None
        self.router = None
        if self._started_ray:
            stop_ray()
            self._started_ray = False


async def _make_links(host: str, keys: ZmqKeys | None) -> WorkerLinks:
    return WorkerLinks(host, keys)   # made on the router's loop: its zmq.asyncio sockets belong to that loop
