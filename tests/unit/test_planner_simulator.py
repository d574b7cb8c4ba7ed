"""router.planner.simulator and goodput: timing invariants on one request, queueing, memory, interference."""
import statistics

import pytest

from router.planner.goodput import at_rate, attainment, goodput, unit_rate_requests
from router.planner.profile import PlannerError, profile_from_dict
from router.planner.simulator import PoolSpec, SimConfig, simulate
from router.workload import RequestSpec
from tests.unit.test_planner_profile import make_profile_dict

PROFILE = profile_from_dict(make_profile_dict())
ONE = dict(prefill=PoolSpec(1, 1, 1), decode=PoolSpec(1, 1, 1))


def prefill_s(*lens):
    return 0.01 + 1e-3 * sum(lens) + 1e-7 * sum(x * x for x in lens)


def decode_s(batch, ctx):
    return 0.02 + 1e-3 * batch + 1e-6 * ctx


def test_single_request_ttft_is_prefill_and_tpot_is_the_decode_step():
    req = RequestSpec(1.0, 100, 5)
    cfg = SimConfig(transfer_gb_s=1.0)
    transfer = 100 * 1e5 / 1e9
    steps = [decode_s(1, 100 + k) for k in range(1, 5)]       # contexts 101..104: prompt + tokens so far
    r = simulate("disaggregated", PROFILE, [req], config=cfg, **ONE)[0]
    assert r.ttft_s == pytest.approx(prefill_s(100))          # the first token streams from prefill
    assert r.e2e_s == pytest.approx(prefill_s(100) + transfer + sum(steps))
    assert r.tpot_s == pytest.approx((transfer + sum(steps)) / 4)
    d = simulate("disaggregated", PROFILE, [req], config=SimConfig(transfer_gb_s=1.0, ttft_includes_transfer=True),
                 **ONE)[0]
    assert d.ttft_s == pytest.approx(prefill_s(100) + transfer)
    assert d.tpot_s == pytest.approx(statistics.mean(steps))


def test_transfers_through_one_link_queue_behind_each_other():
    reqs = [RequestSpec(0.0, 100, 2), RequestSpec(0.0, 100, 2)]
    cfg = SimConfig(transfer_gb_s=0.01)                       # 1e7 bytes of KV each: 1 s per transfer
    a, b = simulate("disaggregated", PROFILE, reqs, config=cfg, **ONE)
    assert a.e2e_s == pytest.approx(prefill_s(100) + 1.0 + decode_s(1, 101))
    assert b.e2e_s == pytest.approx(prefill_s(100) + 2.0 + decode_s(1, 101))   # waited for a's transfer
    # two decode instances: b's KV goes to the other one, but still leaves through the same prefill link
    two = simulate("disaggregated", PROFILE, reqs, config=cfg, prefill=PoolSpec(1, 1, 1), decode=PoolSpec(1, 1, 2))
    assert two[1].e2e_s == pytest.approx(b.e2e_s)


def test_one_output_token_finishes_at_prefill():
    r = simulate("disaggregated", PROFILE, [RequestSpec(0.0, 50, 1)], **ONE)[0]
    assert r.e2e_s == pytest.approx(r.ttft_s) and r.tpot_s == 0.0


def test_prefill_batches_share_one_pass_and_pipeline_stages_overlap_batches():
    # the two prompts that arrive while the first runs are batched into the next pass
    three = [RequestSpec(0.0, 100, 1), RequestSpec(0.001, 200, 1), RequestSpec(0.001, 300, 1)]
    done = [r.arrival_s + r.ttft_s for r in simulate("prefill_only", PROFILE, three, prefill=PoolSpec(1, 1, 1))]
    assert done == pytest.approx([prefill_s(100)] + [prefill_s(100) + prefill_s(200, 300)] * 2)
    reqs = [RequestSpec(0.0, 200, 1), RequestSpec(0.0, 300, 1)]
    cfg = SimConfig(max_num_seqs=1)                          # one prompt per batch
    serial = simulate("prefill_only", PROFILE, reqs, prefill=PoolSpec(1, 1, 1), config=cfg)
    assert serial[1].ttft_s == pytest.approx(prefill_s(200) + prefill_s(300))
    piped = simulate("prefill_only", PROFILE, reqs, prefill=PoolSpec(1, 2, 1), config=cfg)
    # the second batch enters stage 1 when the first moves on, after half its pass
    assert piped[1].ttft_s == pytest.approx(prefill_s(200) / 2 + prefill_s(300))
    one_stage_at_a_time = SimConfig(max_num_seqs=1, pipeline_overlap=False)
    flat = simulate("prefill_only", PROFILE, reqs, prefill=PoolSpec(1, 2, 1), config=one_stage_at_a_time)
    assert flat[1].ttft_s == pytest.approx(serial[1].ttft_s)


def test_memory_limit_delays_decode_admission():
    reqs = [RequestSpec(0.0, 100, 20), RequestSpec(0.0, 100, 20)]
    roomy = simulate("disaggregated", PROFILE, reqs, **ONE)
    tight = simulate("disaggregated", PROFILE, reqs, config=SimConfig(kv_capacity_tokens=240), **ONE)
    # 240 tokens = 15 blocks; each request reserves 120 tokens (8 blocks): the second waits for the first.
    assert tight[1].e2e_s > tight[0].e2e_s + 19 * decode_s(1, 101)
    assert tight[1].e2e_s > roomy[1].e2e_s + 0.2
    with pytest.raises(PlannerError, match="never"):
        simulate("disaggregated", PROFILE, [RequestSpec(0.0, 300, 20)], config=SimConfig(kv_capacity_tokens=240),
                 **ONE)


def test_attainment_falls_with_rate_and_goodput_brackets_it():
    unit = unit_rate_requests("chatbot", 200, seed=3)

    def attain(rate):
        return attainment(simulate("disaggregated", PROFILE, at_rate(unit, rate), **ONE), 2.0, 0.06)
    atts = [attain(r) for r in (0.25, 1, 2, 4, 8, 32)]
    assert atts[0] == 1.0 and atts[-1] < 0.3
    assert all(a >= b for a, b in zip(atts, atts[1:]))
    g = goodput(attain)
    assert g.attainment >= 0.9 and 2 <= g.rate < 4
    assert attain(g.rate * 1.05) < 0.9            # bisection stopped within its 4% tolerance


def test_goodput_search_on_a_known_step_function():
    g = goodput(lambda r: 1.0 if r <= 7.3 else 0.5, target=0.9, start_rate=1.0, rel_tol=0.01)
    assert 7.3 / 1.01 <= g.rate <= 7.3 and g.attainment == 1.0
    assert goodput(lambda r: 0.0).rate == 0.0
    with pytest.raises(PlannerError):
        goodput(lambda r: 1.0, target=1.5)


def test_colocated_prefill_interferes_with_decode():
    # A decodes alone; B's long prompt arrives mid-way. Colocated, A stalls for B's prefill step.
    reqs = [RequestSpec(0.0, 64, 40), RequestSpec(0.3, 2000, 2)]
    dis = simulate("disaggregated", PROFILE, reqs, **ONE)
    col = simulate("colocated", PROFILE, reqs, colocated=PoolSpec(1, 1, 1))
    chunk = simulate("colocated_chunked", PROFILE, reqs, colocated=PoolSpec(1, 1, 1), config=SimConfig(chunk_budget=256))
    stall = prefill_s(2000) / 39
    assert col[0].tpot_s > dis[0].tpot_s + 0.8 * stall
    assert dis[0].tpot_s < chunk[0].tpot_s < col[0].tpot_s    # chunks bound each stall to one small step
    assert col[1].ttft_s < chunk[1].ttft_s                    # ... at the cost of the long prompt's TTFT


def test_colocated_single_request_matches_the_phase_latencies():
    r = simulate("colocated", PROFILE, [RequestSpec(0.0, 100, 3)], colocated=PoolSpec(1, 1, 1))[0]
    assert r.ttft_s == pytest.approx(prefill_s(100))
    assert r.tpot_s == pytest.approx((decode_s(1, 101) + decode_s(1, 102)) / 2)


def test_deterministic_under_a_seed():
    a = at_rate(unit_rate_requests("code", 150, seed=7), 6.0)
    b = at_rate(unit_rate_requests("code", 150, seed=8), 6.0)
    for mode, pools in (("disaggregated", ONE), ("colocated_chunked", {"colocated": PoolSpec(1, 1, 2)})):
        assert simulate(mode, PROFILE, a, **pools) == simulate(mode, PROFILE, a, **pools)
        assert simulate(mode, PROFILE, a, **pools) != simulate(mode, PROFILE, b, **pools)


@pytest.mark.parametrize("call, match", [
    (lambda: simulate("magic", PROFILE, [], **ONE), "unknown simulation mode"),
    (lambda: simulate("disaggregated", PROFILE, [], prefill=PoolSpec()), "needs a decode pool"),
    (lambda: simulate("colocated", PROFILE, [], colocated=PoolSpec(0, 1, 1)), "colocated.tp"),
    (lambda: simulate("disaggregated", PROFILE, [RequestSpec(0.0, 0, 3)], **ONE), "request 0"),
    (lambda: simulate("disaggregated", PROFILE, [], config=SimConfig(transfer_gb_s=0), **ONE), "transfer_gb_s"),
    (lambda: attainment([], 1.0, 1.0), "no requests"),
    (lambda: attainment([], -1.0, 1.0), "ttft_slo"),
    (lambda: at_rate([], 0.0), "rate"),
])
def test_bad_inputs_raise_typed_errors(call, match):
    with pytest.raises(PlannerError, match=match):
        call()


def test_an_instance_whose_weights_do_not_fit_is_rejected():
    big = profile_from_dict(make_profile_dict(model={"name": "big", "num_layers": 2, "weight_bytes": 3 * 2**30,
                                                     "kv_bytes_per_token": 1e5}))
    with pytest.raises(PlannerError, match="weights do not fit"):
        simulate("disaggregated", big, [RequestSpec(0.0, 10, 2)], **ONE)
    assert simulate("disaggregated", big, [RequestSpec(0.0, 10, 2)], prefill=PoolSpec(2, 1, 1),
                    decode=PoolSpec(1, 2, 1))[0].e2e_s > 0


def test_cross_core_interference_slows_a_step_by_the_neighbours_busy_at_its_start():
    """k[decode][prefill] = 0.5: A's decode steps, which start while B's long prefill runs on
    the prefill instance, take 1.5x; B's prefill started while A's decode instance was idle
    (A's KV still in transfer), so k[prefill][decode] does not touch it."""
    inter = {"decode": {"prefill": 0.5}, "prefill": {"decode": 0.25}}
    profile = profile_from_dict(make_profile_dict(interference=inter))
    cfg = SimConfig(transfer_gb_s=1.0)
    p, t = prefill_s(100), 100 * 1e5 / 1e9
    reqs = [RequestSpec(0.0, 100, 3), RequestSpec(p + t / 2, 1000, 2)]
    a, b = simulate("disaggregated", profile, reqs, config=cfg, **ONE)
    assert a.e2e_s == pytest.approx(p + t + 1.5 * (decode_s(1, 101) + decode_s(1, 102)))
    assert b.ttft_s == pytest.approx(prefill_s(1000))
    alone = simulate("disaggregated", PROFILE, reqs, config=cfg, **ONE)
    assert b.e2e_s == pytest.approx(alone[1].e2e_s)      # its decode ran with the prefill idle
    assert a.e2e_s > alone[0].e2e_s


def test_interference_counts_every_busy_neighbour_and_never_the_instance_itself():
    """Colocated, one instance: its own prefill never slows its own decode. Two instances each
    decoding: k[decode][decode] slows both."""
    profile = profile_from_dict(make_profile_dict(interference={"decode": {"prefill": 1.0, "decode": 0.5}}))
    one = [RequestSpec(0.0, 50, 4)]
    pool1 = dict(colocated=PoolSpec(1, 1, 1))
    assert simulate("colocated", profile, one, **pool1) == simulate("colocated", PROFILE, one, **pool1)
    two = [RequestSpec(0.0, 50, 4), RequestSpec(0.0, 50, 4)]
    pool2 = dict(colocated=PoolSpec(1, 1, 2))
    slow, fast = simulate("colocated", profile, two, **pool2), simulate("colocated", PROFILE, two, **pool2)
    for s, f in zip(slow, fast):
        assert s.ttft_s == pytest.approx(f.ttft_s)                   # prefills: k[prefill] is 0
        assert s.e2e_s - s.ttft_s == pytest.approx(1.5 * (f.e2e_s - f.ttft_s))   # each step beside a decode


def test_stats_count_the_steps_and_busy_seconds_of_each_phase():
    from router.planner.simulator import SimStats
    req = RequestSpec(0.0, 100, 5)
    stats = SimStats()
    simulate("disaggregated", PROFILE, [req], config=SimConfig(transfer_gb_s=1.0), stats=stats, **ONE)
    assert stats.steps == {"prefill": 1, "decode": 4}
    assert stats.busy_s["prefill"] == pytest.approx(prefill_s(100))
    assert stats.busy_s["decode"] == pytest.approx(sum(decode_s(1, 100 + k) for k in range(1, 5)))
