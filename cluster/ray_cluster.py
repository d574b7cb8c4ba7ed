"""Ray bring-up: an embedded local Ray bound to 127.0.0.1, or joining a running cluster.

Ray is imported here and in `cluster.actors` only. Each worker instance gets
its own placement group (one bundle per rank: CPU threads, and GPUs where the
pool asks for them), so an instance's ranks land together and its resources
are held for as long as it lives.
"""
from __future__ import annotations

import logging
import os
import secrets

from engine.errors import ConfigError

log = logging.getLogger(__name__)
OBJECT_STORE_BYTES = 512 * 2**20


def start_ray(address: str | None, host: str, num_cpus: int) -> bool:
    """Connect to `address`, or start a local Ray bound to `host`. True when we started it."""
    if not address:
        # Token auth, explicitly (Ray's default changed between releases): a fresh token per
        # embedded cluster, inherited by the Ray processes it starts. Ray reads these when
        # it is imported, so this comes first.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        # Ray starts workers at nice 15 by default: ours are the service, not background work
        os.environ.setdefault("RAY_worker_niceness", "0")
        if _is_loopback(host):
            # _node_ip_address="127.0.0.1" alone is not honoured: Ray swaps a loopback
            # address for the machine's external one unless single-node mode is on.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    if ray.is_initialized():
        return False
    if not address and _is_loopback(host):
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False   # where ray was imported before the env was set
    if address:   # the cluster's token comes from the user's environment or ~/.ray/auth_token
        # ray.host names this node: Ray then joins the driver to that node's raylet (it would pick the
        # head's where it sees several raylets on one machine: test hosts sharing a process table)
        node_ip = None if host == "auto" or _is_loopback(host) else host
        ray.init(address=address, _node_ip_address=node_ip, logging_level=logging.WARNING, log_to_driver=True)
        return False
    ray.init(num_cpus=num_cpus, _node_ip_address=None if host == "auto" else host, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING, log_to_driver=True)
    gcs = ray.get_runtime_context().gcs_address
    if host != "auto" and not gcs.startswith(f"{host}:"):
        ray.shutdown()
        raise ConfigError(f"ray.host: Ray came up on {gcs}, not on {host}")
    return True


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost")


def stop_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def placement_group_for(name: str, num_cpus: int, num_gpus: float, num_ranks: int = 1, timeout_s: float = 60.0):
    """Reserve one bundle per rank for an instance; ConfigError when the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    pg = placement_group([dict(bundle) for _ in range(num_ranks)], strategy="PACK", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(pg)
        raise ConfigError(f"the Ray cluster cannot place {name}: it needs {num_ranks} x {bundle} "
                          f"and has {ray.available_resources()}")
    return pg


def remove_placement_groups(groups) -> None:
    from ray.util.placement_group import remove_placement_group
    for pg in groups:
        try:
            remove_placement_group(pg)
        except Exception as e:   # already gone with its cluster
            log.debug("placement group removal: %s", e)
