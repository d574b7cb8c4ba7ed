"""Real clusters for integration tests: Ray, worker actors and the gRPC router, all on 127.0.0.1."""
from __future__ import annotations

import glob
import os
import socket
import time

import pytest

from cluster.config import load_config
from cluster.local import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cluster_config(**sections):
    base = {
        "model": {"dtype": "float32"},   # fp32: token-for-token against transformers
        "prefill": {"kv_cache_memory_gb": 0.2},
        "decode": {"kv_cache_memory_gb": 0.2},
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0, "drain_timeout_s": 5},
        "ray": {"address": None, "host": "127.0.0.1"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_config(None, base)


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll `predicate` until true (bounded); returns its last value."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


def all_blocks_free(cluster: Cluster) -> bool:
    stats = cluster.worker_stats()
    return all(s["num_free_blocks"] == s["num_blocks"] and s["idle"] for s in stats.values())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def stop_and_check_nothing_left(cluster: Cluster) -> None:
    """Stop the cluster; no worker process, router port or Ray left behind."""
    import ray
    assert all_blocks_free(cluster), cluster.worker_stats()
    assert all(s["loop_error"] is None for s in cluster.worker_stats().values())
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    pids = [info["pid"] for info in cluster.infos.values()]
    port = cluster.router.port
    cluster.stop()
    assert not ray.is_initialized()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout_s=30), "a worker process survived"
    assert not port_open("127.0.0.1", port), "the router port is still open"
    left = [p for pid in pids for p in glob.glob(f"/dev/shm/pdkv-{pid}-*")]
    assert not left, f"shared-memory segments of stopped workers are left: {left}"


def stream_concurrently(address: str, prompts, max_tokens: int, on_token=None) -> list:
    """Each prompt streamed greedily on its own thread (EOS ignored); the token ids per prompt
    (None where a stream failed). `on_token(i, n)` runs after prompt i's n-th token."""
    import threading

    from cluster.client import Client
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        with Client(address, timeout_s=180) as c:
            ids = []
            for chunk in c.generate(prompts[i], max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
                ids.extend(chunk.token_ids)
                if on_token is not None:
                    on_token(i, len(ids))
            results[i] = ids
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    return results
