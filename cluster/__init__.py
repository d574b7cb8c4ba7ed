"""Bring-up, configuration, the CLI and the client SDK.

    from cluster import Client, AsyncClient      # talk to a running router
    from cluster import Cluster, load_config      # start one in this process
"""
from engine.lazy_exports import lazy_exports

_EXPORTS = {
    "Client": "cluster.client", "AsyncClient": "cluster.client", "Completion": "cluster.client",
    "Chunk": "cluster.client", "ClientError": "cluster.client", "InvalidRequest": "cluster.client",
    "Overloaded": "cluster.client", "Unavailable": "cluster.client", "Unauthenticated": "cluster.client",
    "Cluster": "cluster.local", "ClusterConfig": "cluster.config", "load_config": "cluster.config",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
