"""Workers die under real Ray and gRPC, and requests still finish token for token.

The cluster learns of a death from Ray (the rank's liveness call fails), moves
the dead instance's requests to live ones (prompt + streamed tokens), reclaims
what the dead process held and starts a replacement. Every test checks the
streamed tokens against the in-process engine, and that nothing is left: no
block, no lease, no /dev/shm segment of a dead process, the pools back to size.
"""
from __future__ import annotations

import glob
import os
import signal
import time

import pytest

from cluster.client import Client
from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import (all_blocks_free, cluster_config, stop_and_check_nothing_left,
                                       stream_concurrently, wait_until)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Once upon a time, there was a lighthouse keeper who",
           "def fibonacci(n):\n    ", "List three colours:"]
MAX_NEW = 24


def _pool_back_to_size(cluster: Cluster) -> bool:
    infos = cluster.infos
    want = {role: pool.num_instances for role, pool in cluster.config.pools().items()}
    have = {role: sum(1 for i in infos.values() if i["role"] == role) for role in want}
    return have == want


def _segments_of(pids) -> list[str]:
    return [p for pid in pids for p in glob.glob(f"/dev/shm/pdkv-{pid}-*")]


@pytest.fixture(scope="module")
def cluster():
    cfg = cluster_config(prefill={"num_instances": 1}, decode={"num_instances": 2},
                         restart={"backoff_s": 0.2})
    c = Cluster(cfg, log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


def test_a_decode_worker_killed_mid_stream_loses_no_request_and_is_replaced(cluster, llm):
    want = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                                      ignore_eos=True))]
    victim = {}

    def kill_once(i: int, n: int) -> None:   # the first stream past 6 tokens: kill its decode worker
        if n >= 6 and not victim:
            busy = [st for st in cluster.router.core.requests.values() if st.decode]
            if busy:
                name = busy[0].decode
                victim.update(name=name, pid=cluster.infos[name]["pid"], at=time.monotonic())
                os.kill(victim["pid"], signal.SIGKILL)
    got = stream_concurrently(cluster.address, PROMPTS, MAX_NEW, kill_once)
    assert got == want
    assert victim and cluster.router.core.num_migrations >= 1
    death = next(d for d in cluster.pools.deaths if d.name == victim["name"])
    assert death.seen_at - victim["at"] < 2.0, "the death was seen late"
    assert wait_until(lambda: _pool_back_to_size(cluster), timeout_s=120), cluster.infos
    assert victim["name"] not in cluster.infos and death.replaced_by in cluster.infos
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30), cluster.worker_stats()
    assert not _segments_of([victim["pid"]])


def test_the_prefill_worker_killed_is_replaced_and_serves_again(cluster, llm):
    name = next(n for n, i in cluster.infos.items() if i["role"] == "prefill")
    pid = cluster.infos[name]["pid"]
    os.kill(pid, signal.SIGKILL)
    # a request sent now waits for the replacement (no prefill instance is alive meanwhile)
    with Client(cluster.address, timeout_s=180) as c:
        r = c.complete(PROMPTS[0], max_tokens=8, temperature=0.0)
    want = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert r.token_ids == want.token_ids and r.prefill_instance != name
    assert wait_until(lambda: _pool_back_to_size(cluster), timeout_s=120)
    assert not _segments_of([pid]), "the dead prefill worker's shared KV cache was not reclaimed"
