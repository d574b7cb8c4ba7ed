"""router.planner.elastic: the simulator with pools resized by a policy while it runs. No Ray."""
from __future__ import annotations

import math

import pytest

from cluster.config import AutoscalingConfig, PoolScaling
from router.autoscale import Decision, Observation, Policy, SloProposer, make_policy
from router.planner.elastic import simulate_elastic
from router.planner.profile import load_profile, profile_from_dict
from router.planner.simulator import PoolSpec, SimConfig, Simulation, simulate
from router.workload import RequestSpec, sample_requests
from tests.unit.test_planner_profile import make_profile_dict

TOY = profile_from_dict(make_profile_dict())
A100 = "router/planner/profiles/llama13b-a100-80g.json"
CFG = SimConfig(transfer_gb_s=1.0)


def prefill_s(n):
    return 0.01 + 1e-3 * n + 1e-7 * n * n


def decode_s(batch, ctx):
    return 0.02 + 1e-3 * batch + 1e-6 * ctx


class Scripted:
    """A policy that changes the pools at given times and records what it was shown."""

    def __init__(self, script: dict[float, dict[str, int]]) -> None:
        self.script, self.seen = script, []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        desired = {role: p.current for role, p in obs.pools.items()}
        for role, change in self.script.get(obs.now, {}).items():
            desired[role] += change
        return Decision(desired, "scripted")


def test_policy_none_gives_exactly_what_simulate_gives():
    reqs = sample_requests("chatbot", 6.0, 300, seed=4)
    fixed = simulate("disaggregated", TOY, reqs, prefill=PoolSpec(1, 1, 2), decode=PoolSpec(1, 1, 2), config=CFG)
    run = simulate_elastic(TOY, reqs, make_policy(AutoscalingConfig()), PoolSpec(1, 1, 2), PoolSpec(1, 1, 2),
                           interval_s=5, window_s=15, startup_s=30, config=CFG)
    assert run.results == fixed
    assert run.events == [] and run.num_moved == 0 and run.decisions >= 300 / 6 / 5
    assert run.gpu_seconds == pytest.approx(4 * run.end_s)


def test_an_added_instance_takes_work_only_after_its_startup():
    reqs = [RequestSpec(t * 0.3, 400, 4) for t in range(120)]       # more than one prefill instance can take
    policy = Scripted({5.0: {"prefill": +1}})
    run = simulate_elastic(TOY, reqs, policy, PoolSpec(1, 1, 1), PoolSpec(1, 1, 1), interval_s=5, window_s=10,
                           startup_s=12, config=CFG)
    new = run.instances[-1]
    assert (new.role, new.launched_s, new.ready_s) == ("prefill", 5.0, 17.0)
    by_time = {o.now: o.pools["prefill"] for o in policy.seen}
    assert [(by_time[t].ready, by_time[t].starting) for t in (5.0, 10.0, 15.0, 20.0)] == [(1, 0), (1, 1), (1, 1),
                                                                                          (2, 0)]
    assert run.ready_sizes(16.9)["prefill"] == 1 and run.ready_sizes(17.0)["prefill"] == 2
    assert run.pool_sizes(5.0)["prefill"] == 2          # it holds its GPUs while it loads
    # until 17 s the cluster runs as if it had one prefill instance; after, the queue shrinks
    alone = simulate("disaggregated", TOY, reqs, prefill=PoolSpec(1, 1, 1), decode=PoolSpec(1, 1, 1), config=CFG)
    before = [i for i, r in enumerate(alone) if r.arrival_s + r.ttft_s < 17.0]
    assert len(before) > 10 and alone[before[-1]].ttft_s > 2.0          # a queue had built up
    assert [run.results[i].ttft_s for i in before] == [alone[i].ttft_s for i in before]
    assert run.results[-1].ttft_s < alone[-1].ttft_s / 2


def test_a_moved_request_prefills_prompt_and_streamed_tokens_again_then_decodes_the_rest():
    """The real router's migration, timed by hand: one request on decode instance 0 of 2; at
    `stop` instance 0 stops taking work and the request runs again as prompt + streamed tokens."""
    cfg = SimConfig(transfer_gb_s=1.0)
    sim = Simulation("disaggregated", TOY, cfg)
    sim.add_instance("prefill", PoolSpec())
    d0, _ = sim.add_instance("decode", PoolSpec()), sim.add_instance("decode", PoolSpec())
    (req,) = sim.submit([RequestSpec(0.0, 100, 10)])
    transfer = lambda n: n * 1e5 / 1e9   # noqa: E731
    t = prefill_s(100) + transfer(100)                      # the KV has landed on d0
    for k in range(1, 4):                                   # three steps: tokens 2, 3, 4
        t += decode_s(1, 100 + k)
    stop = t + 0.5 * decode_s(1, 104)                       # in the middle of the step of token 5: lost
    sim.at(stop, sim.stop_taking_work, d0)
    sim.run()
    r = sim.result(req)
    assert sim.num_moved == 1
    prompt = 100 + 4                                        # the prompt and the 4 tokens streamed
    end = stop + prefill_s(prompt) + transfer(prompt)       # token 5 comes out of the new prefill
    for k in range(1, 6):                                   # tokens 6..10 on decode instance 1
        end += decode_s(1, prompt + k)
    assert r.ttft_s == pytest.approx(prefill_s(100))        # the first token streamed once, before
    assert r.e2e_s == pytest.approx(end)
    assert r.output_tokens == 10


def test_a_removed_decode_instance_loses_no_request():
    reqs = sample_requests("chatbot", 8.0, 200, seed=2)
    policy = Scripted({10.0: {"decode": -1}})
    run = simulate_elastic(TOY, reqs, policy, PoolSpec(1, 1, 2), PoolSpec(1, 1, 3), interval_s=5, window_s=10,
                           startup_s=0, config=CFG)
    assert policy.seen[1].pools["decode"].kv_use > 0        # it held requests when it was removed
    assert run.num_moved >= 1
    assert all(math.isfinite(r.e2e_s) and r.e2e_s >= r.ttft_s > 0 for r in run.results)
    assert [r.output_tokens for r in run.results] == [s.output_tokens for s in reqs]
    gone = [life for life in run.instances if life.role == "decode" and life.draining_s is not None]
    assert len(gone) == 1 and gone[0].draining_s == 10.0 and gone[0].stopped_s - 10.0 < 1.0
    assert run.ready_sizes(11.0)["decode"] == 2


def test_instance_seconds_count_startup_and_draining_exactly():
    """1 prefill tp2 + 2 decode tp1 at t=0; at 10 s a prefill instance is launched (ready at 40 s);
    at 20 s a decode instance is launched and at 25 s removed while it loads; at 60 s an idle
    decode instance is removed; the trace lasts 100 s."""
    reqs = [RequestSpec(1.0, 50, 3), RequestSpec(2.0, 60, 3)]
    policy = Scripted({10.0: {"prefill": +1}, 20.0: {"decode": +1}, 25.0: {"decode": -1}, 60.0: {"decode": -1}})
    run = simulate_elastic(TOY, reqs, policy, PoolSpec(2, 1, 1), PoolSpec(1, 1, 2), interval_s=5, window_s=10,
                           startup_s=30, config=CFG, duration_s=100)
    assert run.end_s == 100
    lives = [(life.role, life.launched_s, life.ready_s, life.stopped_s) for life in run.instances]
    assert sorted(lives, key=str) == [("decode", 0.0, 0.0, 60.0), ("decode", 0.0, 0.0, None),
                                      ("decode", 20.0, None, 25.0), ("prefill", 0.0, 0.0, None),
                                      ("prefill", 10.0, 40.0, None)]
    assert run.instance_seconds == pytest.approx(60 + 100 + 5 + 100 + 90)
    assert run.gpu_seconds == pytest.approx(60 + 100 + 5 + 2 * 100 + 2 * 90)
    assert [(e.t, e.role, e.change) for e in run.events] == [(10.0, "prefill", 1), (20.0, "decode", 1),
                                                             (25.0, "decode", -1), (60.0, "decode", -1)]


def test_a_removed_prefill_instance_finishes_its_queue_before_it_stops():
    reqs = [RequestSpec(0.0, 800, 2) for _ in range(40)]     # ~1 s of prefill each, spread over 2 instances
    policy = Scripted({5.0: {"prefill": -1}})
    run = simulate_elastic(TOY, reqs, policy, PoolSpec(1, 1, 2), PoolSpec(1, 1, 2), interval_s=5, window_s=10,
                           startup_s=0, config=CFG)
    gone = next(life for life in run.instances if life.role == "prefill" and life.draining_s is not None)
    assert gone.stopped_s > 10.0                            # its 20 prompts took longer than 5 s
    assert all(math.isfinite(r.e2e_s) for r in run.results) and run.num_moved == 0


def test_a_rate_step_grows_the_pools_during_the_peak_and_shrinks_them_after():
    """The slo policy on the A100 profile: 15 req/s, 45 req/s, 15 req/s, 60 s each."""
    profile = load_profile(A100)
    reqs, t0 = [], 0.0
    for i, rate in enumerate((15.0, 45.0, 15.0)):
        part = sample_requests("chatbot", rate, int(rate * 60), seed=i)
        reqs += [RequestSpec(t0 + r.arrival_s, r.prompt_tokens, r.output_tokens) for r in part if r.arrival_s < 60]
        t0 += 60
    pool = PoolScaling(min_instances=1, max_instances=8, upscale_delay_s=0, downscale_delay_s=20, max_step=4)
    s = AutoscalingConfig(policy="slo", interval_s=5, window_s=15, prefill=pool, decode=pool, ttft_p90_s=0.25,
                          tpot_p90_s=0.1, profile=A100, max_total_instances=32)
    cfg = SimConfig(transfer_gb_s=240)
    policy = Policy(s, SloProposer(s, profile, sim=cfg, horizon_s=15))    # short: a quick test
    run = simulate_elastic(profile, reqs, policy, PoolSpec(4, 1, 1), PoolSpec(1, 1, 1),
                           interval_s=5, window_s=15, startup_s=10, config=cfg, duration_s=180)
    total = lambda t: sum(run.ready_sizes(t).values())   # noqa: E731
    before, peak, after = total(55), max(total(t) for t in range(60, 120, 5)), total(179)
    assert peak > before and after < peak
    assert any(e.change > 0 and 60 <= e.t < 120 for e in run.events)
    assert any(e.change < 0 and e.t >= 120 for e in run.events)
