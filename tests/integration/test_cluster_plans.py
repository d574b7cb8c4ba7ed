"""Instances of different parallelism plans working together, through real Ray and gRPC.

Two clusters: a tensor-parallel prefill instance (tp 2: the default model's 9 q /
3 kv heads split 6+3 / 2+1 over two rank actors) with a pipeline-parallel decode
instance (pp 2: layers 0-14 / 15-29); and the reverse direction, a one-rank
prefill instance with a tp 2 decode instance. A multi-rank prefill instance
gathers the KV on its rank 0 into the whole model's layout, a multi-rank decode
instance lands it there and scatters it to its ranks (cluster.parallel_kv).
Greedy output must be token-identical to the in-process engine, every block
free at the end, every rank stopped.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.client import Client
from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import cluster_config, pid_alive, stop_and_check_nothing_left, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW = 12
PROMPTS = [
    "The capital of France is",
    "Hi",
    "def fibonacci(n):\n    ",
    "The history of the printing press begins in the fifteenth century. " * 10 + "In short,",
]


PLANS = {   # prefill pool, decode pool: each pair is one cluster start (~15 s + model loads)
    "tp2-prefill_pp2-decode": ({"tp_size": 2}, {"pp_size": 2}),
    "tp1-prefill_tp2-decode": ({}, {"tp_size": 2}),
}


@pytest.fixture(scope="module", params=list(PLANS))
def cluster(request):
    prefill, decode = PLANS[request.param]
    c = Cluster(cluster_config(prefill=prefill, decode=decode), log=lambda *_: None).start()
    yield c
    rank_pids = [info["pid"] for info in c.rank_infos.values()]
    num_ranks = sum(p.tp_size * p.pp_size - 1 for p in (c.config.prefill, c.config.decode))
    assert len(rank_pids) == num_ranks >= 1   # the ranks beyond rank 0 of each instance
    stop_and_check_nothing_left(c)
    assert c.rank_stops and all(r == {"stopped": True, "error": None} for r in c.rank_stops.values()), c.rank_stops
    assert wait_until(lambda: not any(pid_alive(p) for p in rank_pids), timeout_s=30), "a rank process survived"


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout_s=180) as c:
        yield c


def test_greedy_is_token_identical_to_the_engine(client, cluster, llm):
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    got = [client.complete(p, max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True) for p in PROMPTS]
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.text == w.text
        assert (g.prefill_instance, g.decode_instance) == ("prefill-0", "decode-0")
        assert g.metrics["transfer_s"] > 0
    assert len(llm.tokenizer.encode(PROMPTS[-1])) > 100   # several blocks crossed over
    assert got[0].text.strip().startswith("Paris")


def test_concurrent_requests_batch_across_the_stages(client, llm):
    prompts = [f"Request {i}: tell me about the sea. " * (1 + i % 4) for i in range(8)]
    lengths = [3 + (i * 5) % 11 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: client.complete(a[0], max_tokens=a[1], temperature=0.0), zip(prompts, lengths)))
    for prompt, n, g in zip(prompts, lengths, got):
        w = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0]
        assert g.token_ids == w.token_ids


def test_every_block_is_free_after_the_requests(cluster):
    from tests.integration.conftest import all_blocks_free
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30), cluster.worker_stats()
