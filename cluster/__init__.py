"""Bring-up, configuration, the CLI and the client SDK.

    from cluster import Client, AsyncClient      # talk to a running router
    from cluster import Cluster, load_config      # start one in this process
"""
from importlib import import_module

_EXPORTS = {
    "Client": "cluster.client", "AsyncClient": "cluster.client", "Completion": "cluster.client",
    "Chunk": "cluster.client", "ClientError": "cluster.client", "InvalidRequest": "cluster.client",
    "Overloaded": "cluster.client", "Unavailable": "cluster.client", "Unauthenticated": "cluster.client",
    "Cluster": "cluster.local", "ClusterConfig": "cluster.config", "load_config": "cluster.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cluster' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
