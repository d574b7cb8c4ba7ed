"""router.planner.simulator modes "conditional" and "never": local chunked prefills on decode
instances, placed by the live router's ConditionalPolicy."""
import math

import pytest

from router.conditional import ConditionalPolicy, DecodeSide, PrefillSide
from router.planner.goodput import at_rate, attainment, goodput, unit_rate_requests
from router.planner.profile import PlannerError, profile_from_dict
from router.planner.simulator import PoolSpec, SimConfig, SimStats, Simulation, simulate
from router.workload import LengthDist, RequestSpec, Workload
from tests.unit.test_planner_profile import make_profile_dict


def cheap_prefill_profile():
    """Prefill at 0.2 ms a token: a short prompt costs about a decode step."""
    d = make_profile_dict()
    d["plans"]["1x1"]["prefill"] = {"a": 0.01, "b": 2e-4, "c": 1e-7}
    return profile_from_dict(d)


PROFILE = cheap_prefill_profile()
TTFT, TPOT = 0.05, 0.1
CFG = SimConfig(conditional_ttft_slo_s=TTFT, conditional_tpot_slo_s=TPOT, local_chunk_tokens=128)
SHORT = Workload("short", LengthDist(64, 0.3, 16, 128), LengthDist(16, 0.3, 4, 32), "tests")
MIXED = Workload("mixed", LengthDist(200, 1.0, 16, 1500), LengthDist(16, 0.3, 4, 32), "tests")


def pools(mode, num_prefill=1, num_decode=2):
    if mode == "never":
        return {"decode": PoolSpec(1, 1, num_decode)}
    return {"prefill": PoolSpec(1, 1, num_prefill), "decode": PoolSpec(1, 1, num_decode)}


def test_one_local_prefill_runs_in_chunks_on_the_decode_instance():
    # never: the decode instance prefills 300 tokens in chunks of 128, 128, 44, then decodes
    req = RequestSpec(0.0, 300, 3)
    lat = PROFILE.latency(1, 1)
    chunks = [(0, 128), (128, 128), (256, 44)]
    prefill = sum(lat.prefill(n, n * (2 * done + n)) for done, n in chunks)
    r = simulate("never", PROFILE, [req], config=CFG, **pools("never", num_decode=1))[0]
    assert r.local_prefill
    assert r.ttft_s == pytest.approx(prefill)
    assert r.e2e_s == pytest.approx(prefill + lat.decode(1, 301) + lat.decode(1, 302))


def test_never_moves_no_kv_and_always_prefills_nothing_locally():
    reqs = at_rate(unit_rate_requests(SHORT, 60, seed=1), 10.0)
    never, always = SimStats(), SimStats()
    rn = simulate("never", PROFILE, reqs, config=CFG, stats=never, **pools("never"))
    ra = simulate("disaggregated", PROFILE, reqs, config=CFG, stats=always, **pools("disaggregated"))
    assert all(r.local_prefill for r in rn) and never.local_prefills == 60 and never.kv_bytes == 0
    assert not any(r.local_prefill for r in ra) and always.local_prefills == 0
    assert always.kv_bytes == sum(r.prompt_tokens for r in reqs) * PROFILE.kv_bytes_per_token
    assert never.prefill_tokens == always.prefill_tokens == sum(r.prompt_tokens for r in reqs)


def test_an_idle_cluster_places_a_request_where_the_policy_says():
    lat = PROFILE.latency(1, 1)
    # nothing decodes yet, so no running request limits a local prefill: the TTFTs decide
    for chunk in (128, 16):         # one chunk beats the idle prefill instance; seven do not
        cfg = SimConfig(conditional_ttft_slo_s=TTFT, conditional_tpot_slo_s=TPOT, local_chunk_tokens=chunk)
        policy = ConditionalPolicy(lat, TTFT, TPOT, chunk)
        want = policy.choose(100, [DecodeSide("d", 0, 0, 0, stall_budget_s=math.inf)], [PrefillSide("p", 0)])
        r = simulate("conditional", PROFILE, [RequestSpec(0.0, 100, 4)], config=cfg,
                     **pools("conditional", num_decode=1))[0]
        assert r.local_prefill == want.local == (chunk == 128)
        assert r.ttft_s == pytest.approx(want.ttft_local_s if want.local else want.ttft_remote_s)


def test_conditional_uses_both_paths_on_a_mixed_workload():
    reqs = at_rate(unit_rate_requests(MIXED, 200, seed=2), 12.0)
    stats = SimStats()
    res = simulate("conditional", PROFILE, reqs, config=CFG, stats=stats, **pools("conditional"))
    local = [r for r in res if r.local_prefill]
    remote = [r for r in res if not r.local_prefill]
    assert local and remote and stats.local_prefills == len(local)
    # KV moves for the remote prompts only; every prompt token is computed once, on one path
    assert stats.kv_bytes == sum(r.prompt_tokens for r in remote) * PROFILE.kv_bytes_per_token
    assert stats.prefill_tokens == sum(r.prompt_tokens for r in reqs)
    assert all(r.ttft_s > 0 and r.e2e_s >= r.ttft_s for r in res)


def test_local_prefills_beat_a_queueing_prefill_instance_on_goodput_for_short_prompts():
    unit = unit_rate_requests(SHORT, 200, seed=0)

    def rate(mode):
        def attain(r):
            return attainment(simulate(mode, PROFILE, at_rate(unit, r), config=CFG, **pools(mode)), TTFT, TPOT)
        return goodput(attain, 0.9).rate

    always, conditional, never = rate("disaggregated"), rate("conditional"), rate("never")
    assert conditional > 1.5 * always     # the decode instances absorb what queues at the one prefill instance
    assert never > always                 # ... even with no prefill pool at all
    assert conditional >= never


def test_the_simulation_is_deterministic():
    reqs = at_rate(unit_rate_requests(MIXED, 120, seed=3), 10.0)
    runs = []
    for _ in range(2):
        stats = SimStats()
        res = simulate("conditional", PROFILE, reqs, config=CFG, stats=stats, **pools("conditional"))
        runs.append((res, stats))
    assert runs[0] == runs[1]


def test_instances_do_not_stop_in_the_local_modes_and_bad_chunks_are_rejected():
    sim = Simulation("conditional", PROFILE, CFG)
    d = sim.add_instance("decode", PoolSpec(1, 1, 1))
    with pytest.raises(PlannerError, match="do not stop"):
        sim.stop_taking_work(0.0, d)
    with pytest.raises(PlannerError, match="local_chunk_tokens"):
        simulate("never", PROFILE, [RequestSpec(0.0, 10, 2)], config=SimConfig(local_chunk_tokens=0),
                 decode=PoolSpec(1, 1, 1))
    with pytest.raises(PlannerError, match="never"):
        Simulation("never", PROFILE, CFG).add_instance("prefill", PoolSpec(1, 1, 1))


def test_a_request_still_prefilling_elsewhere_counts_in_the_stall_a_local_prefill_may_add():
    # as the live router (router/core.py _decode_side): the long prompt prefilling on the prefill
    # instance will decode on the decode instance, with a TPOT headroom of 10 tokens at 25 ms over
    # 21 ms steps, less than the short prompt's local chunk; alone, the short prompt goes local
    cfg = SimConfig(conditional_ttft_slo_s=0.03, conditional_tpot_slo_s=0.025, local_chunk_tokens=128)
    long, short = RequestSpec(0.0, 200, 10), RequestSpec(0.001, 60, 10)
    both = simulate("conditional", PROFILE, [long, short], config=cfg, **pools("conditional", num_decode=1))
    assert [r.local_prefill for r in both] == [False, False]
    alone = simulate("conditional", PROFILE, [short], config=cfg, **pools("conditional", num_decode=1))
    assert alone[0].local_prefill
