"""The baselines through real Ray and gRPC: two colocated instances, each running both phases.

One cluster per mode (`colocated`: whole prefills first; `colocated_chunked`:
prefill chunks piggybacked on decode steps, a small budget so that the long
prompt takes several chunks). Greedy output is token-identical to the
in-process engine, requests spread over both instances, an abort frees the
blocks, and nothing is left running after the stop.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.client import Client
from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import all_blocks_free, cluster_config, stop_and_check_nothing_left, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW = 12
PROMPTS = [
    "The capital of France is",
    "Hi",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "The history of the printing press begins in the fifteenth century. " * 12 + "In short,",
]
CHUNK_BUDGET = 64   # colocated_chunked: the ~160-token prompt runs in three chunks


@pytest.fixture(scope="module", params=["colocated", "colocated_chunked"])
def cluster(request):
    budget = CHUNK_BUDGET if request.param == "colocated_chunked" else None
    cfg = cluster_config(colocated={"num_instances": 2, "kv_cache_memory_gb": 0.2, "max_num_seqs": 16,
                                    "max_num_batched_tokens": budget})
    c = Cluster(cfg.replace(mode=request.param), log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout_s=120) as c:
        yield c


def test_only_the_colocated_pool_runs(cluster):
    assert sorted(cluster.infos) == ["colocated-0", "colocated-1"]
    assert {i["role"] for i in cluster.infos.values()} == {"colocated"}
    assert len({i["pid"] for i in cluster.infos.values()}) == 2


def test_concurrent_greedy_is_token_identical_to_engine_on_both_instances(client, cluster, llm):
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: client.complete(p, max_tokens=MAX_NEW, temperature=0.0), PROMPTS,
                            timeout=300))
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
        assert g.prefill_instance == g.decode_instance   # both phases where it was sent
        m = g.metrics
        assert m["transfer_s"] == 0 and m["queue_s"] >= 0 and m["prefill_s"] > 0
        assert 0 < m["ttft_s"] <= m["e2e_s"]
    assert {g.prefill_instance for g in got} == {"colocated-0", "colocated-1"}
    assert max(len(llm.tokenizer.encode(p)) for p in PROMPTS) > 2 * CHUNK_BUDGET
    assert wait_until(lambda: all_blocks_free(cluster))


def test_decode_timings_and_first_token_ending_the_request(client):
    r = client.complete("Tell me a story about a robot.", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert len(r.token_ids) == 8 and r.finish_reason == "length"
    assert r.metrics["decode_s"] > 0 and r.metrics["mean_tpot_s"] > 0
    one = client.complete("Hello", max_tokens=1, temperature=0.0)
    assert len(one.token_ids) == 1 and one.finish_reason == "length"


def test_abort_mid_stream_frees_the_blocks(client, cluster):
    chunks, done = [], threading.Event()

    def consume():
        for c in client.generate("Write a long essay.", max_tokens=400, temperature=0.0, ignore_eos=True,
                                 request_id="to-abort"):
            chunks.append(c)
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    assert wait_until(lambda: len(chunks) >= 3, timeout_s=60)
    stats = cluster.worker_stats()
    assert any(s["num_free_blocks"] < s["num_blocks"] for s in stats.values())
    with Client(cluster.address) as other:
        assert other.abort("to-abort") is True
    assert done.wait(60)
    t.join(10)
    assert client.last.finish_reason == "abort" and len(chunks) < 400
    # closing a stream cancels it too
    stream = client.generate("Count from one to a thousand:", max_tokens=400, temperature=0.0, ignore_eos=True)
    assert len([next(stream) for _ in range(3)]) == 3
    stream.close()
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30), cluster.worker_stats()


def test_admin_state_lists_the_colocated_instances(client):
    state = client.state()
    assert sorted(i.name for i in state.instances) == ["colocated-0", "colocated-1"]
    assert all(i.role == "colocated" and i.alive for i in state.instances)
