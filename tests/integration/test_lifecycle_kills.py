"""A worker killed at each point of a request's life; every request still finishes, token for token.

Each case starts a real cluster (Ray + gRPC on 127.0.0.1) whose `faults`
section makes one named worker SIGKILL itself at one point: a request queued
at prefill, inside the prefill forward pass, its KV leased and waiting for the
pull, a pull under way, decoding mid-stream. A last case kills a rank of a
tp2 decode instance from outside. The requests must come out exactly as the
in-process engine makes them, and nothing may be left: no block, lease or
/dev/shm segment of the dead process, the pools back to full size.
"""
from __future__ import annotations

import glob
import os
import signal
import threading

import pytest

from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import all_blocks_free, cluster_config, stream_concurrently, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Write one sentence about the sea.", "def add(a, b):\n    ",
           "Name a colour:"]
MAX_NEW = 12


def _check_recovered(cluster: Cluster, victim: str) -> None:
    death = next((d for d in cluster.pools.deaths if d.name == victim), None)
    assert death is not None, f"{victim} did not die"
    want = {role: p.num_instances for role, p in cluster.config.pools().items()}

    def back() -> bool:
        have = {role: sum(1 for i in cluster.infos.values() if i["role"] == role) for role in want}
        return have == want
    assert wait_until(back, timeout_s=120), cluster.infos
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30), cluster.worker_stats()
    assert all(s["loop_error"] is None for s in cluster.worker_stats().values())


@pytest.fixture(scope="module")
def expected(llm) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("point, victim", [
    ("prefill.queued", "prefill-0"),
    ("prefill.forward", "prefill-0"),
    ("prefill.leased", "prefill-0"),
    ("decode.pull", "decode-0"),
    ("decode.stream", "decode-0"),
])
def test_a_worker_killed_at_each_point_of_a_request(point, victim, expected):
    after = 3 if point == "decode.stream" else 1   # mid-stream: some tokens are out already
    cfg = cluster_config(prefill={"num_instances": 2}, decode={"num_instances": 2},
                         faults={"die_at": point, "instance": victim, "after": after},
                         restart={"backoff_s": 0.2})
    with Cluster(cfg, log=lambda *_: None) as cluster:
        pids = {n: i["pid"] for n, i in cluster.infos.items()}
        assert stream_concurrently(cluster.address, PROMPTS, MAX_NEW) == expected
        _check_recovered(cluster, victim)
        assert not glob.glob(f"/dev/shm/pdkv-{pids[victim]}-*")


def test_a_rank_of_a_tp2_instance_killed_mid_stream(expected):
    cfg = cluster_config(decode={"tp_size": 2}, restart={"backoff_s": 0.2})
    with Cluster(cfg, log=lambda *_: None) as cluster:
        rank1 = cluster.rank_infos["decode-0.rank1"]["pid"]
        killed = threading.Event()

        def kill_rank1(i: int, n: int) -> None:
            if n >= 4 and not killed.is_set():
                killed.set()
                os.kill(rank1, signal.SIGKILL)
        assert stream_concurrently(cluster.address, PROMPTS, MAX_NEW, kill_rank1) == expected
        assert killed.is_set()
        death = next(d for d in cluster.pools.deaths if d.name == "decode-0")
        assert "rank 1" in death.reason
        _check_recovered(cluster, "decode-0")
        assert "decode-0.rank1" not in cluster.rank_infos and len(cluster.rank_infos) == 1
