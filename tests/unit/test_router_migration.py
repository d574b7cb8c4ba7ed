"""The router's core moving requests off dead instances, over real workers stepped in-process.

Two prefill and two decode workers (tiny random Llama, float32, zmq KV transfer,
tests/inprocess_cluster.py). The oracle is `engine.LLM.generate` on the same
model: every request, moved or not, must stream exactly the oracle's tokens,
none lost or repeated.
"""
from __future__ import annotations

import asyncio

import pytest

from engine import SamplingParams
from protos import pdcluster_pb2 as pb
from router.errors import RequestError, Status
from tests.inprocess_cluster import Cluster, collect, drive, expected, run
from tests.worker_pair import prompt_ids, oracle, tiny_dir  # noqa: F401

pytestmark = pytest.mark.slow     # builds four tiny engines per test


def test_undisturbed_requests_match_the_engine(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [prompt_ids(9 + i, seed=i) for i in range(4)]
        results = run(c, prompts, 12)
        assert [t for t, _ in results] == expected(oracle, prompts, 12)
        assert all(f.migrations == 0 and f.finish_reason == "length" for _, f in results)
        assert c.core.num_migrations == 0 and not c.core.requests
    finally:
        c.close()


def test_decode_instance_dies_mid_stream_and_the_stream_goes_on_token_identical(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [prompt_ids(11 + i, seed=10 + i) for i in range(4)]

        def hook(cluster, events):
            def kill_when_streaming():   # once some request has 5 tokens out, its decode instance dies
                if "decode-0" in cluster.workers and any(n >= 5 for _, n in events):
                    busy = [st for st in cluster.core.requests.values() if st.decode == "decode-0"]
                    if busy:
                        cluster.kill("decode-0")
            return kill_when_streaming
        results = run(c, prompts, 16, hook)
        assert [t for t, _ in results] == expected(oracle, prompts, 16)
        assert "decode-0" in c.dead and c.core.num_migrations >= 1
        moved = [f for _, f in results if f.migrations]
        assert moved and all(f.decode_instance == "decode-1" for f in moved)
        assert all(f.completion_tokens == 16 for _, f in results)
    finally:
        c.close()


def test_prefill_instance_dies_with_requests_queued(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [prompt_ids(20, seed=30 + i) for i in range(4)]

        async def main():
            tasks = [asyncio.ensure_future(collect(c.core, p, 8)) for p in prompts]
            await asyncio.sleep(0)   # every request dispatched, none stepped yet
            queued = [st for st in c.core.requests.values() if st.prefill == "prefill-0"]
            assert queued
            c.links.inbox["prefill-0"].clear()   # they reached it: it holds them...
            c.kill("prefill-0")                  # ...and dies before its first step
            await drive(c, tasks)
            return [t.result() for t in tasks]
        results = asyncio.run(main())
        assert [t for t, _ in results] == expected(oracle, prompts, 8)
        assert all(f.prefill_instance == "prefill-1" for _, f in results)
        assert sum(f.migrations for _, f in results) >= 1
    finally:
        c.close()


def test_seeded_sampling_is_unchanged_by_a_move(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        prompts = [prompt_ids(13, seed=50), prompt_ids(7, seed=51)]
        kw = dict(seed=1234, temperature=0.8)

        def hook(cluster, events):
            def kill_when_streaming():
                if "decode-0" in cluster.workers and any(n >= 4 for _, n in events):
                    if any(st.decode == "decode-0" for st in cluster.core.requests.values()):
                        cluster.kill("decode-0")
            return kill_when_streaming
        results = run(c, prompts, 12, hook, **kw)
        outs = oracle.generate([list(p) for p in prompts],
                               SamplingParams(max_tokens=12, ignore_eos=True, **kw))
        assert [t for t, _ in results] == [o.token_ids for o in outs]
        assert c.core.num_migrations >= 1
    finally:
        c.close()


def test_past_the_migration_limit_a_request_fails_unavailable_saying_why(tiny_dir):
    c = Cluster(tiny_dir, migration_limit=0)
    try:
        def hook(cluster, events):
            def kill():
                if "decode-0" in cluster.workers and events:
                    if any(st.decode == "decode-0" for st in cluster.core.requests.values()):
                        cluster.kill("decode-0")
            return kill

        async def main():
            events: list = []
            tasks = [asyncio.ensure_future(collect(c.core, prompt_ids(9, seed=60 + i), 20, events))
                     for i in range(2)]
            await drive(c, tasks, hook(c, events))
            return [t.exception() for t in tasks]
        errors = [e for e in asyncio.run(main()) if e is not None]
        assert errors and all(isinstance(e, RequestError) and e.status is Status.UNAVAILABLE for e in errors)
        assert all("decode-0 died" in e.message and "migration_limit" in e.message for e in errors)
        assert not c.core.requests
    finally:
        c.close()


def test_a_request_waits_for_a_replacement_when_its_pool_is_empty(tiny_dir, oracle):
    c = Cluster(tiny_dir, num_decode=1)
    try:
        prompts = [prompt_ids(10, seed=70)]
        state = {"replaced": False}

        def hook(cluster, events):
            def kill_then_replace():
                if "decode-0" in cluster.workers and len(events) >= 3:
                    cluster.kill("decode-0", replacing=True)
                elif "decode-0" in cluster.dead and not state["replaced"]:
                    st = next(iter(cluster.core.requests.values()))
                    if st.waiting_for_instance or st.pending_decode is not None:
                        state["replaced"] = True
                        cluster.add("decode", "decode-2")
            return kill_then_replace
        results = run(c, prompts, 10, hook)
        assert [t for t, _ in results] == expected(oracle, prompts, 10)
        assert state["replaced"] and results[0][1].decode_instance == "decode-2"
    finally:
        c.close()


def test_no_instance_and_none_coming_is_unavailable_at_once(tiny_dir):
    c = Cluster(tiny_dir, num_prefill=1, num_decode=1)
    try:
        c.kill("prefill-0")
        with pytest.raises(RequestError, match="no live prefill instance") as e:
            c.core.admit([5, 6, 7], SamplingParams(max_tokens=2), pb.SamplingParams(max_tokens=2))
        assert e.value.status is Status.UNAVAILABLE
    finally:
        c.close()


@pytest.mark.parametrize("policy", ["recompute", "reprefill"])
def test_prefill_dies_with_kv_leased_and_the_policy_recovers(tiny_dir, oracle, policy):
    c = Cluster(tiny_dir, on_failure=policy)
    try:
        prompts = [prompt_ids(18 + i, seed=80 + i) for i in range(4)]

        def hook(cluster, events):
            def kill_while_leased():   # prefill-0 handed KV offers out, nobody has pulled them yet
                w = cluster.workers.get("prefill-0")
                if w is not None and w.load().num_leases:
                    cluster.kill("prefill-0")
            return kill_while_leased
        results = run(c, prompts, 10, hook)
        assert [t for t, _ in results] == expected(oracle, prompts, 10)
        assert "prefill-0" in c.dead
        moved = sum(f.migrations for _, f in results)
        assert (moved >= 1) if policy == "reprefill" else (moved == 0)
    finally:
        c.close()


def test_prefill_dies_with_kv_leased_and_policy_fail_fails_the_request(tiny_dir):
    c = Cluster(tiny_dir, on_failure="fail")
    try:
        def hook(cluster, events):
            def kill_while_leased():
                w = cluster.workers.get("prefill-0")
                if w is not None and w.load().num_leases:
                    cluster.kill("prefill-0")
            return kill_while_leased

        async def main():
            tasks = [asyncio.ensure_future(collect(c.core, prompt_ids(16, seed=90 + i), 6)) for i in range(4)]
            await drive(c, tasks, hook(c, []))
            return [t.exception() for t in tasks]
        errors = [e for e in asyncio.run(main()) if e is not None]
        assert errors and all(isinstance(e, RequestError) for e in errors)
        assert not c.core.requests
    finally:
        c.close()


def test_an_instance_whose_steps_fail_loses_its_requests_to_others_and_leaves_rotation(tiny_dir, oracle):
    c = Cluster(tiny_dir)
    try:
        broken = c.workers["decode-0"].runner

        def fail(plan, on_layer=None):
            raise RuntimeError("the device fell over")
        broken.execute = fail
        prompts = [prompt_ids(9 + i, seed=100 + i) for i in range(6)]
        results = run(c, prompts, 8)
        assert [t for t, _ in results] == expected(oracle, prompts, 8)
        assert all(f.decode_instance == "decode-1" for _, f in results)
        assert c.core.views["decode-0"].num_failed >= c.cfg.router.breaker_failures
        assert c.core.instance_status(c.core.views["decode-0"]) == "out_of_rotation"
    finally:
        c.workers["decode-0"].runner.execute = lambda plan, on_layer=None: None
        c.close()
