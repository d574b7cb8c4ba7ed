"""Conditional disaggregation: the placement model (pure), and real workers stepped in-process
prefilling some requests on the decode instance that decodes them.

Every request, prefilled remotely or locally, over a cached prefix or not, streams exactly
the in-process engine's greedy tokens, and every block is free at the end.
"""
from __future__ import annotations

import asyncio

import pytest

from engine import SamplingParams
from protos import pdcluster_pb2 as pb
from router.conditional import ConditionalPolicy, DecodeSide, PrefillSide
from router.planner.profile import PhaseModel, PlanLatency
from tests.inprocess_cluster import Cluster, collect, drive, expected
from tests.worker_pair import prompt_ids, oracle, tiny_dir  # noqa: F401

# 1 ms per prompt token, a 20 ms decode step + 0.1 ms per request
LATENCY = PlanLatency(PhaseModel(0.0, 0.001, 0.0), PhaseModel(0.02, 0.0001, 0.0))


def _policy(**kw) -> ConditionalPolicy:
    return ConditionalPolicy(LATENCY, ttft_slo_s=kw.pop("ttft", 0.5), tpot_slo_s=kw.pop("tpot", 0.1),
                             chunk_tokens=kw.pop("chunk", 64), **kw)


def test_an_idle_prefill_instance_takes_a_prompt_a_decode_instance_would_chunk_slowly():
    c = _policy().choose(400, [DecodeSide("d0", 8, 4000, 0)], [PrefillSide("p0", 0)])
    assert not c.local and c.instance == "p0" and c.ttft_remote_s < c.ttft_local_s


def test_a_long_prefill_queue_sends_a_short_prompt_to_an_idle_decode_instance():
    c = _policy().choose(60, [DecodeSide("d0", 1, 200, 0)], [PrefillSide("p0", 3000)])
    assert c.local and c.instance == "d0" and c.ttft_local_s < c.ttft_remote_s


def test_remote_fits_keeps_a_remote_prefill_well_within_the_ttft_slo_where_local_is_as_fast():
    # 60 tokens: 60 ms on the idle prefill instance, 60 ms as one chunk on an idle decode instance
    idle = [DecodeSide("d0", 0, 0, 0)]
    assert _policy(ttft=0.5).choose(60, idle, [PrefillSide("p0", 0)]).local   # by default the faster path
    kept = _policy(ttft=0.5, remote_fits=0.5).choose(60, idle, [PrefillSide("p0", 0)])
    assert not kept.local and "within" in kept.reason            # 60 ms of a 500 ms SLO: no need
    assert _policy(ttft=0.1, remote_fits=0.5).choose(60, idle, [PrefillSide("p0", 0)]).local   # 60 of 100 ms
    assert _policy(ttft=0.5, remote_fits=0.5).choose(60, idle, [PrefillSide("p0", 300)]).local  # 360 of 500


def test_local_is_refused_when_a_chunk_would_push_the_running_decodes_past_the_tpot_slo():
    busy = DecodeSide("d0", 64, 60000, 0, step_factor=4.0)   # its steps already near the SLO
    c = _policy(tpot=0.1).choose(60, [busy], [PrefillSide("p0", 3000)])
    assert not c.local and "TPOT" in c.reason


def test_running_requests_with_tpot_headroom_absorb_a_local_prefill_that_one_step_would_not():
    # 60 tokens in 64-token chunks: one step of 20.2 + 60 ms, past the 50 ms TPOT SLO, but the
    # requests decoding there can lose 100 ms each and still average within it
    queued = [PrefillSide("p0", 3000)]
    roomy = DecodeSide("d0", 2, 500, 0, stall_budget_s=0.1)
    tight = DecodeSide("d0", 2, 500, 0, stall_budget_s=0.05)
    p = _policy(tpot=0.05)
    assert p.local_stall_s(roomy, 60) == pytest.approx(0.06)
    assert p.choose(60, [roomy], queued).local
    refused = p.choose(60, [tight], queued)
    assert not refused.local and "TPOT" in refused.reason
    assert not p.choose(60, [DecodeSide("d0", 2, 500, 0)], queued).local   # no view of them: by the step
    # the stall counts the local prompts already queued there: 100 + 60 tokens, 160 ms
    assert not p.choose(60, [DecodeSide("d0", 2, 500, 100, stall_budget_s=0.1)], queued).local
    assert p.local_stall_s(DecodeSide("d0", 2, 500, 100), 60) == pytest.approx(0.16)


def test_a_cached_prefix_on_a_decode_instance_makes_local_cheaper():
    cold = _policy().choose(300, [DecodeSide("d0", 2, 500, 0)], [PrefillSide("p0", 0)])
    warm = _policy().choose(300, [DecodeSide("d0", 2, 500, 0, overlap_tokens=288)], [PrefillSide("p0", 0)])
    assert not cold.local and warm.local


def test_remote_rescues_nothing_local_can_and_no_prefill_pool_means_local():
    c = _policy(ttft=0.3).choose(100, [DecodeSide("d0", 1, 100, 0)], [PrefillSide("p0", 1000)])
    assert c.local   # remote would miss the TTFT SLO, local meets it
    assert _policy().choose(100, [DecodeSide("d0", 1, 100, 0)], []).local
    assert _policy().choose(100, [], []) is None


def test_the_live_correction_follows_measured_prefills():
    p = _policy()
    for _ in range(30):
        p.observed_prefill(500, 1.0)   # 2 ms per token measured, 1 ms predicted
    assert p.prefill_factor == pytest.approx(2.0, rel=0.05)
    assert p.step_factor(4, 400, 0.06) == pytest.approx(0.06 / (0.02 + 0.0001 * 4), rel=1e-6)


# -- real workers --------------------------------------------------------------------------------
@pytest.mark.slow
def test_requests_still_being_prefilled_count_in_the_stall_a_local_prefill_may_add(tiny_dir):
    """A request prefilling on the prefill instance will decode on the decode instance, so under a
    local prefill's chunks if it starts now: with the TPOT headroom of 10 tokens at a 25 ms SLO
    (24 ms over 20 ms steps) it cannot take a 60 ms chunk, and the short prompt that would have
    gone local (0.06 s there against 0.26 s behind the long one) goes remote."""
    policy = _policy(ttft=0.1, tpot=0.025, chunk=64)
    c = Cluster(tiny_dir, num_prefill=1, num_decode=1, conditional=policy,
                extra={"router": {"disaggregation": "conditional"}, "conditional": {"local_prefill_tokens": 64}})
    admitted, streams = [], []

    async def placed(ids, max_tokens):
        """Admit and dispatch a request (its stream's first step), and leave it there: no worker steps."""
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        st = c.core.admit(ids, SamplingParams.from_message(sampling), sampling)
        admitted.append(st)
        stream = c.core.stream(st)
        streams.append((stream, asyncio.ensure_future(stream.__anext__())))
        await asyncio.sleep(0)
        return st

    async def main():
        long = await placed(prompt_ids(200, seed=600), 10)     # the idle prefill instance beats 4 chunks
        assert long.prefill == "prefill-0" and not long.prefill_done
        short = await placed(prompt_ids(60, seed=601), 10)
        assert short.prefill == "prefill-0" and "TPOT" in short.placement, short.placement
        for st in admitted:
            c.core.end(st)
        # with nobody coming to the decode instance, the same short prompt goes local
        alone = await placed(prompt_ids(60, seed=602), 10)
        assert alone.prefill == "decode-0", alone.placement
        for stream, task in streams:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()

    try:
        asyncio.run(main())
    finally:
        for st in admitted:
            if not st.finished:
                c.core.end(st)
        c.close()


def _serve(cluster: Cluster, prompts, max_tokens: int):
    async def main():
        tasks = [asyncio.ensure_future(collect(cluster.core, p, max_tokens)) for p in prompts]
        await drive(cluster, tasks)
        return [t.result() for t in tasks]
    return asyncio.run(main())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["never", "conditional"])
def test_local_and_remote_prefills_match_the_engine(tiny_dir, oracle, mode):
    policy = _policy(ttft=0.05, tpot=10.0, chunk=8)   # a long queue at prefill-0 sends the rest local
    c = Cluster(tiny_dir, num_prefill=1, num_decode=2, conditional=policy,
                extra={"router": {"disaggregation": mode}, "conditional": {"local_prefill_tokens": 8}})
    try:
        prompts = [prompt_ids(30 + 7 * i, seed=300 + i) for i in range(6)]
        results = _serve(c, prompts, 10)
        assert [t for t, _ in results] == expected(oracle, prompts, 10)
        local = [f for _, f in results if f.prefill_instance.startswith("decode")]
        remote = [f for _, f in results if f.prefill_instance.startswith("prefill")]
        assert local and (remote if mode == "conditional" else not remote)
        assert all(f.prefill_instance == f.decode_instance for f in local)
    finally:
        c.close()


@pytest.mark.slow
def test_a_conversations_next_turn_is_prefilled_over_its_cached_history_where_it_was_decoded(tiny_dir, oracle):
    policy = _policy(ttft=5.0, tpot=10.0, chunk=16)
    c = Cluster(tiny_dir, num_prefill=1, num_decode=2, conditional=policy,
                extra={"router": {"disaggregation": "conditional"}, "conditional": {"local_prefill_tokens": 16},
                       "decode": {"enable_prefix_caching": True}, "prefill": {"enable_prefix_caching": True}})
    try:
        first = prompt_ids(41, seed=400)
        (t1, f1), = _serve(c, [first], 12)
        turn2 = first + t1 + prompt_ids(9, seed=401)   # the client resends the history and a new message
        (t2, f2), = _serve(c, [turn2], 12)
        assert [t1, t2] == expected(oracle, [first, turn2], 12)
        holder = c.workers[f1.decode_instance]
        assert f2.prefill_instance == f1.decode_instance == f2.decode_instance   # KV-aware: it went back
        assert holder.blocks.num_hit_tokens >= 48   # the history's blocks were not computed again
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("caching", [False, True])
def test_a_repeated_prompt_counts_as_held_only_where_a_prefix_cache_keeps_it(tiny_dir, oracle, caching):
    # the idle prefill instance prefills 41 tokens sooner than 16-token chunks on the decode instance
    # do, unless that instance holds the prompt in its prefix cache. Without caches the router must
    # not credit it with the first request's blocks (it once did, and sent repeated prompts to be
    # prefilled whole on a decode instance).
    policy = _policy(ttft=5.0, tpot=0.010, chunk=16)
    extra = {"router": {"disaggregation": "conditional"}, "conditional": {"local_prefill_tokens": 16}}
    if caching:
        extra.update(decode={"enable_prefix_caching": True}, prefill={"enable_prefix_caching": True})
    c = Cluster(tiny_dir, num_prefill=1, num_decode=1, conditional=policy, extra=extra)
    try:
        prompt = prompt_ids(41, seed=500)
        (t1, f1), = _serve(c, [prompt], 6)
        (t2, f2), = _serve(c, [prompt], 6)
        assert [t1, t2] == expected(oracle, [prompt, prompt], 6)
        assert f1.prefill_instance == "prefill-0"
        assert f2.prefill_instance == ("decode-0" if caching else "prefill-0")
    finally:
        c.close()
