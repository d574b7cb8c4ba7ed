"""The autoscaling policies, fed observations: no Ray, no cluster, the time in the observation."""
from __future__ import annotations

import random

import pytest

from cluster.config import AutoscalingConfig, PoolScaling
from router.autoscale import Decision, Observation, PoolObservation, make_policy
from router.planner.profile import load_profile

A100 = "router/planner/profiles/llama13b-a100-80g.json"


def _load_settings(**kw) -> AutoscalingConfig:
    pool = PoolScaling(min_instances=1, max_instances=4, upscale_delay_s=10, downscale_delay_s=30, max_step=1)
    return AutoscalingConfig(policy="load", prefill=pool, decode=pool, queued_tokens_high=1000,
                             queued_tokens_low=100, kv_use_high=0.8, kv_use_low=0.2, **kw)


def _obs(now, prefill=(1, 0), decode=(1, 0.5), **kw) -> Observation:
    """prefill=(instances, queued prompt tokens), decode=(instances, KV use)."""
    return Observation(now=now, window_s=30, arrivals=30, pools={
        "prefill": PoolObservation(prefill[0], queued_prompt_tokens=prefill[1]),
        "decode": PoolObservation(decode[0], kv_use=decode[1])}, **kw)


def _run(policy, observations):
    return [policy.decide(o).desired for o in observations]


# -- load -------------------------------------------------------------------------------------------
def test_load_grows_a_pool_only_after_its_upscale_delay_and_one_step_at_a_time():
    p = make_policy(_load_settings())
    busy = [_obs(t, prefill=(1, 5000), decode=(1, 0.5)) for t in (0, 5, 10, 11)]
    assert [d["prefill"] for d in _run(p, busy)] == [1, 1, 2, 1]   # 10 s after it first asked
    assert all(d["decode"] == 1 for d in _run(p, busy))


def test_load_shrinks_after_the_longer_downscale_delay():
    p = make_policy(_load_settings())
    quiet = [_obs(t, prefill=(3, 0), decode=(3, 0.05)) for t in (0, 10, 29, 30)]
    out = _run(p, quiet)
    assert [d["prefill"] for d in out] == [3, 3, 3, 2] and [d["decode"] for d in out] == [3, 3, 3, 2]


def test_noise_does_not_make_it_flap():
    p = make_policy(_load_settings())
    rng = random.Random(3)
    out = []
    for i in range(60):   # a load that crosses both thresholds every few seconds
        high = (i // 2) % 2 == 0
        out.append(p.decide(_obs(i * 2.0, prefill=(2, 4000 if high else 10),
                                 decode=(2, 0.95 if rng.random() < 0.5 else 0.1))).desired)
    assert {d["prefill"] for d in out} == {2} and {d["decode"] for d in out} == {2}


def test_bounds_hold_however_hard_it_is_pushed():
    p = make_policy(_load_settings())
    out = _run(p, [_obs(t, prefill=(4, 10**6), decode=(4, 1.0)) for t in range(0, 100, 10)])
    assert all(d == {"prefill": 4, "decode": 4} for d in out)
    out = _run(make_policy(_load_settings()), [_obs(t, prefill=(1, 0), decode=(1, 0.0)) for t in range(0, 100, 10)])
    assert all(d == {"prefill": 1, "decode": 1} for d in out)


def test_the_budget_holds_and_takes_back_growth_first():
    p = make_policy(_load_settings(max_total_instances=5))
    # both pools want to grow past 5 instances in all: only one can, once
    out = _run(p, [_obs(t, prefill=(2, 5000), decode=(3, 0.95)) for t in (0, 10)])
    assert out[-1]["prefill"] + out[-1]["decode"] == 5
    cpus = make_policy(_load_settings(max_cpus=3))
    d = cpus.decide(Observation(now=50, window_s=30, arrivals=1, pools={
        "prefill": PoolObservation(1, queued_prompt_tokens=5000, cpus=2),
        "decode": PoolObservation(1, kv_use=0.5, cpus=1)}))
    assert d.desired == {"prefill": 1, "decode": 1}   # a second prefill instance would need 5 CPUs


def test_policy_none_keeps_the_pools_and_a_decision_lists_its_changes():
    none = make_policy(AutoscalingConfig())
    obs = _obs(0, prefill=(2, 10**6), decode=(3, 1.0))
    assert none.decide(obs).desired == {"prefill": 2, "decode": 3}
    assert Decision({"prefill": 3, "decode": 1}).changes(obs) == {"prefill": 1, "decode": -2}


# -- slo --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a100():
    return load_profile(A100)


def _slo(a100, ttft=0.5, tpot=0.04, **kw):
    pool = PoolScaling(min_instances=1, max_instances=16, upscale_delay_s=0, downscale_delay_s=0, max_step=16)
    s = AutoscalingConfig(policy="slo", profile=A100, ttft_p90_s=ttft, tpot_p90_s=tpot, prefill=pool,
                          decode=pool, **kw)
    return make_policy(s, a100)


def _window(now, rate, prompts, outputs, current=(2, 2), **kw) -> Observation:
    return Observation(now=now, window_s=30, arrivals=int(rate * 30), prompt_tokens=tuple(prompts),
                       output_tokens=tuple(outputs),
                       pools={"prefill": PoolObservation(current[0]), "decode": PoolObservation(current[1])}, **kw)


def test_slo_follows_rate_steps_up_and_down(a100):
    p = _slo(a100)
    rng = random.Random(0)
    prompts = [rng.randint(200, 900) for _ in range(100)]
    outputs = [rng.randint(100, 600) for _ in range(100)]
    sizes = [p.decide(_window(i * 30, rate, prompts, outputs)).desired for i, rate in enumerate((4, 12, 4))]
    total = [d["prefill"] + d["decode"] for d in sizes]
    assert total[1] > total[0] and total[2] < total[1]
    assert sizes[2] == sizes[0]   # the same load gets the same pools back


def test_longer_prompts_move_the_ratio_toward_prefill_and_longer_outputs_toward_decode(a100):
    base = _slo(a100).decide(_window(0, 15, [300] * 50, [300] * 50)).desired
    long_prompts = _slo(a100).decide(_window(0, 15, [2000] * 50, [300] * 50)).desired
    long_outputs = _slo(a100).decide(_window(0, 15, [300] * 50, [1500] * 50)).desired
    assert long_prompts["prefill"] > base["prefill"]
    assert long_outputs["decode"] > base["decode"] and long_outputs["prefill"] <= long_prompts["prefill"]
    ratio = {k: d["prefill"] / d["decode"] for k, d in (("p", long_prompts), ("o", long_outputs))}
    assert ratio["p"] > ratio["o"]


def test_slo_corrects_the_profile_by_what_it_observes(a100):
    """A live TTFT p90 far above the profile's prediction for the current pools means the
    profile is optimistic: the policy asks for more prefill than it would otherwise."""
    prompts, outputs = [800] * 50, [200] * 50
    trusting = _slo(a100).decide(_window(0, 10, prompts, outputs)).desired
    corrected_policy = _slo(a100)
    for t in range(4):   # the factor is smoothed: a few windows of the same evidence
        d = corrected_policy.decide(_window(t * 30, 10, prompts, outputs, ttft_p90_s=3.0, tpot_p90_s=0.01)).desired
    assert d["prefill"] > trusting["prefill"]
    assert corrected_policy.slo.factors["prefill"] > 1.5 and corrected_policy.slo.factors["decode"] < 1.0


def test_no_arrivals_shrinks_to_the_minimum(a100):
    d = _slo(a100).decide(Observation(now=0, window_s=30, arrivals=0, pools={
        "prefill": PoolObservation(5), "decode": PoolObservation(4)})).desired
    assert d == {"prefill": 1, "decode": 1}


def test_a_rate_step_does_not_make_the_profile_look_faster(a100):
    """Just after the rate triples, the requests finished in the window were served at the old
    rate (calm latencies), while the current pools simulated at the new rate queue without end.
    That gap is the step, not the profile's speed: the correction must leave the factors alone
    (it made both x0.5 within three windows, so the policy asked for too few instances)."""
    prompts, outputs = [300] * 50, [100] * 50
    p = _slo(a100)
    calm = dict(ttft_p90_s=0.06, tpot_p90_s=0.03)
    for t in (-60, -30, 0):   # the old rate, which the pools serve
        p.decide(_window(t, 8, prompts, outputs, current=(1, 1), **calm))
    before = dict(p.slo.factors)
    for t in (10, 20, 30):    # three windows into the step, the pools not grown yet
        d = p.decide(_window(t, 30, prompts, outputs, current=(1, 1), **calm)).desired
    assert p.slo.factors == before
    assert d["prefill"] > 1 and d["decode"] > 1
    # once the rate is steady again the correction runs: a factor grown too large (a backlog
    # once made the live p90 high) comes back down when the pools serve the rate calmly
    p.slo.factors = {"prefill": 4.0, "decode": 4.0}
    for t in range(60, 120, 10):
        p.decide(_window(t, 30, prompts, outputs, current=(d["prefill"], d["decode"]), **calm))
    assert p.slo.factors["prefill"] < 2.0 and p.slo.factors["decode"] < 2.0
