"""Conditional disaggregation and prefix caching on a real cluster (Ray + gRPC on 127.0.0.1).

The router prefills each request either on the prefill pool or on the decode
instance that decodes it, and a conversation's next turn goes back to where
its history is cached. Every answer is the in-process engine's, token for
token, and nothing is left at the end.
"""
from __future__ import annotations

import pytest

from cluster.client import Client
from cluster.local import Cluster
from engine import SamplingParams
from tests.integration.conftest import cluster_config, stop_and_check_nothing_left, stream_concurrently, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Write a short poem about rivers and stones and the sea.",
           "def fibonacci(n):\n    ", "List three colours:", "Explain what a CPU cache is, in one sentence.",
           "Once upon a time,"]


@pytest.fixture(scope="module")
def cluster():
    cfg = cluster_config(prefill={"enable_prefix_caching": True}, decode={"enable_prefix_caching": True},
                         router={"disaggregation": "conditional"},
                         conditional={"ttft_slo_s": 0.4, "tpot_slo_s": 0.5, "local_prefill_tokens": 64})
    c = Cluster(cfg, log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


def test_requests_prefilled_either_way_match_the_engine(cluster, llm):
    got = stream_concurrently(cluster.address, PROMPTS, 12)
    want = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert got == [w.token_ids for w in want]
    assert cluster.router.core.num_local_prefills > 0   # with one prefill instance busy, some went local


def test_a_conversation_returns_where_its_history_is_cached(cluster, llm):
    with Client(cluster.address, timeout_s=120) as c:
        history = [{"role": "user", "content": "Name a large river in Europe."}]
        first = c.complete(messages=history, max_tokens=16, temperature=0.0, ignore_eos=True)
        history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "How long is it?"}]
        second = c.complete(messages=history, max_tokens=16, temperature=0.0, ignore_eos=True)
    for messages, r in (([history[0]], first), (history, second)):
        ids = llm.apply_chat_template(messages)
        assert r.token_ids == llm.generate([ids], SamplingParams(max_tokens=16, temperature=0.0,
                                                                 ignore_eos=True))[0].token_ids
    assert second.prefill_instance == first.decode_instance   # its history was cached there
    stats = cluster.worker_stats()
    assert sum(s["prefix_hit_tokens"] for s in stats.values()) > 0
    assert wait_until(lambda: all(s["idle"] for s in cluster.worker_stats().values()), timeout_s=30)
