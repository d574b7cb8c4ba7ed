"""The simulator with pools that change size while it runs: an autoscaling policy in the loop.

    run = simulate_elastic(profile, requests, policy, prefill=PoolSpec(4, 1, 2), decode=PoolSpec(1, 1, 3),
                           interval_s=10, window_s=30, startup_s=30, config=SimConfig(transfer_gb_s=240))
    run.results          # one RequestResult per request, in input order (as simulate())
    run.events           # every change a decision made: time, pool, +n / -n, the policy's reason
    run.instances        # every instance's life: launched, ready, draining, stopped
    run.gpu_seconds      # sum over instances of tp x pp x (stopped - launched)

The same discrete-event simulation as `simulate("disaggregated", ...)` (router/planner/simulator.py),
plus a policy tick every `interval_s` of simulated time. At each tick the policy
(router.autoscale.Policy) gets an Observation built from the simulation's own state over the last
`window_s`: requests that arrived (their prompt lengths), requests that finished (output lengths,
TTFT and TPOT p90), the prefill pool's queued prompt tokens, the decode pool's mean KV use, ready
and starting instances, the pools' plans. Its Decision is carried out at once:

  * an added instance holds its GPUs from the decision on, but takes work only `startup_s` later
    (its model load);
  * a removed instance that is still loading stops at once; a removed prefill instance takes no
    more work, finishes its queue and hands off its KV, then stops; a removed decode instance
    takes no more work and its requests move to the other decode instances as the real router
    moves them (prompt + streamed tokens prefilled again, then decoded: Simulation._move);
  * which instance goes: one still loading, else the ready one with the least work (queued
    prompt tokens, or requests to move).

The pools at t=0 are ready (the cluster was up before the trace). Instances are counted from the
decision that launched them to the moment they stop (the start-up and draining included); those
still up at the end count to the end of the run: the later of `duration_s` and the last finish.
With policy `none` nothing changes and the results are exactly simulate()'s.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from router import modes
from router.autoscale import Observation, Policy, PoolObservation
from router.planner.profile import PlannerError, Profile
from router.planner.simulator import PoolSpec, RequestResult, SimConfig, Simulation
from router.workload import RequestSpec

ROLES = ("prefill", "decode")


@dataclass
class InstanceLife:
    role: str
    tp: int
    pp: int
    launched_s: float
    ready_s: float | None = None      # took work from then (None: stopped while loading)
    draining_s: float | None = None   # stopped taking work
    stopped_s: float | None = None    # held nothing more (None: up at the end of the run)

    def seconds(self, end_s: float) -> float:
        return (end_s if self.stopped_s is None else self.stopped_s) - self.launched_s

    def alive_at(self, t: float) -> bool:
        return self.launched_s <= t and (self.stopped_s is None or t < self.stopped_s)


@dataclass(frozen=True)
class ScalingEvent:
    t: float
    role: str
    change: int            # instances added (> 0) or removed (< 0)
    reason: str


@dataclass
class ElasticRun:
    results: list[RequestResult]
    events: list[ScalingEvent]
    instances: list[InstanceLife]
    end_s: float
    num_moved: int                       # attempts started by moving requests off removed decode instances
    decisions: int                       # policy ticks

    @property
    def instance_seconds(self) -> float:
        return sum(life.seconds(self.end_s) for life in self.instances)

    @property
    def gpu_seconds(self) -> float:
        return sum(life.seconds(self.end_s) * life.tp * life.pp for life in self.instances)

    def pool_sizes(self, t: float) -> dict[str, int]:
        """Instances holding GPUs at t, by role (loading and draining ones included)."""
        out = dict.fromkeys(ROLES, 0)
        for life in self.instances:
            if life.alive_at(t):
                out[life.role] += 1
        return out

    def ready_sizes(self, t: float) -> dict[str, int]:
        """Instances taking work at t, by role."""
        out = dict.fromkeys(ROLES, 0)
        for life in self.instances:
            if life.ready_s is not None and life.ready_s <= t and (life.draining_s is None or t < life.draining_s):
                out[life.role] += 1
        return out


def p90(values: Sequence[float]) -> float | None:
    """The nearest-rank 90th percentile (the policy's own, router/autoscale.py)."""
    if not values:
        return None
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(math.ceil(0.9 * len(xs))) - 1)]


class _Elastic:
    """The simulation, the policy tick and the bookkeeping of one run."""

    def __init__(self, profile: Profile, policy: Policy, pools: dict[str, PoolSpec], interval_s: float,
                 window_s: float, startup_s: float, config: SimConfig) -> None:
        self.policy, self.pools = policy, pools
        self.interval_s, self.window_s, self.startup_s = interval_s, window_s, startup_s
        self.sim = Simulation(modes.DISAGGREGATED, profile, config, on_finish=self._finished,
                              on_stopped=self._stopped)
        self.lives: dict[object, InstanceLife] = {}       # the simulation's instance -> its life
        self.ready: dict[str, list] = {role: [] for role in ROLES}      # taking work
        self.draining: dict[str, list] = {role: [] for role in ROLES}   # stopped taking work, not empty yet
        self.starting: dict[str, list[InstanceLife]] = {role: [] for role in ROLES}
        self.all_lives: list[InstanceLife] = []
        self.events: list[ScalingEvent] = []
        self.finish_t: list[float] = []                   # finish times, in order
        self.finished: list = []                          # the requests, in the same order
        self.decisions = 0

    # -- instances -------------------------------------------------------------------------------
    def launch(self, now: float, role: str, startup_s: float) -> None:
        p = self.pools[role]
        life = InstanceLife(role, p.tp, p.pp, now)
        self.all_lives.append(life)
        if startup_s <= 0:
            self._ready(now, life)
        else:
            self.starting[role].append(life)
            self.sim.at(now + startup_s, self._ready, life)

    def _ready(self, now: float, life: InstanceLife) -> None:
        if life.stopped_s is not None:     # removed while it was loading
            return
        if life in self.starting[life.role]:
            self.starting[life.role].remove(life)
        life.ready_s = now
        inst = self.sim.add_instance(life.role, self.pools[life.role], now)
        self.lives[inst] = life
        self.ready[life.role].append(inst)

    def remove(self, now: float, role: str) -> None:
        """The instance still loading that was launched last, else the ready one with the least work."""
        if self.starting[role]:
            life = self.starting[role].pop()
            life.stopped_s = now
            return
        insts = self.ready[role]
        if role == "prefill":
            inst = min(reversed(insts), key=lambda p: (p.queued_tokens, len(p.waiting)))
        else:
            inst = min(reversed(insts), key=lambda d: d.admitted + len(d.waiting))
        insts.remove(inst)
        self.lives[inst].draining_s = now
        self.draining[role].append(inst)
        self.sim.stop_taking_work(now, inst)      # may call _stopped at once

    def _stopped(self, now: float, inst) -> None:
        life = self.lives[inst]
        if life.stopped_s is None:
            life.stopped_s = now
            self.draining[life.role].remove(inst)

    def _finished(self, now: float, r) -> None:
        self.finish_t.append(now)
        self.finished.append(r)

    # -- the policy tick -------------------------------------------------------------------------
    def observe(self, now: float, arrival_t: list[float], prompts: list[int]) -> Observation:
        window = min(self.window_s, now) if now > 0 else self.window_s
        lo, hi = bisect.bisect_right(arrival_t, now - window), bisect.bisect_right(arrival_t, now)
        f_lo = bisect.bisect_right(self.finish_t, now - window)
        done = self.finished[f_lo:]
        ttft = [r.first_token_at - r.spec.arrival_s for r in done]
        tpot = [(r.finished_at - r.first_token_at) / (r.spec.output_tokens - 1) for r in done
                if r.spec.output_tokens > 1]
        pools = {}
        for role in ROLES:
            insts, p = self.ready[role], self.pools[role]
            queued = sum(i.queued_tokens for i in insts + self.draining[role]) if role == "prefill" else 0
            kv = (sum(1 - d.free_blocks / d.total_blocks for d in insts) / len(insts)
                  if role == "decode" and insts else 0.0)
            pools[role] = PoolObservation(ready=len(insts), starting=len(self.starting[role]),
                                          queued_prompt_tokens=queued, kv_use=kv, tp=p.tp, pp=p.pp)
        return Observation(now=now, window_s=window, arrivals=hi - lo, prompt_tokens=tuple(prompts[lo:hi]),
                           output_tokens=tuple(r.spec.output_tokens for r in done), ttft_p90_s=p90(ttft),
                           tpot_p90_s=p90(tpot), pools=pools)

    def tick(self, now: float, arrival_t: list[float], prompts: list[int], total: int, until: float) -> None:
        """One decision; the next one is due while the trace lasts (`until`) or requests are left."""
        self.decisions += 1
        obs = self.observe(now, arrival_t, prompts)
        decision = self.policy.decide(obs)
        for role, change in decision.changes(obs).items():
            self.events.append(ScalingEvent(now, role, change, decision.reason))
            for _ in range(abs(change)):
                if change > 0:
                    self.launch(now, role, self.startup_s)
                else:
                    self.remove(now, role)
        if len(self.finished) < total or now + self.interval_s <= until:
            if len(self.finished) < total and not self.sim.num_events() and not any(self.starting.values()):
                raise PlannerError(f"at {now:.1f} s requests wait and no instance will take them")
            self.sim.at(now + self.interval_s, self.tick, arrival_t, prompts, total, until)


def simulate_elastic(profile: Profile, requests: Sequence[RequestSpec], policy: Policy, prefill: PoolSpec,
                     decode: PoolSpec, interval_s: float, window_s: float, startup_s: float = 30.0,
                     config: SimConfig = SimConfig(), duration_s: float | None = None) -> ElasticRun:
    """Disaggregated pools starting at prefill.num_instances and decode.num_instances (each
    instance of the pool's plan), resized by `policy` every `interval_s`; see the module doc."""
    for name, v in (("interval_s", interval_s), ("window_s", window_s)):
        if not (v > 0 and math.isfinite(v)):
            raise PlannerError(f"{name} must be a finite number > 0, got {v!r}")
    if not (startup_s >= 0 and math.isfinite(startup_s)):
        raise PlannerError(f"startup_s must be a finite number >= 0, got {startup_s!r}")
    if not requests:
        raise PlannerError("simulate_elastic needs at least one request")
    run = _Elastic(profile, policy, {"prefill": prefill, "decode": decode}, interval_s, window_s, startup_s,
                   config)
    for role, pool in (("decode", decode), ("prefill", prefill)):   # simulate()'s order of building
        for _ in range(pool.num_instances):
            run.launch(0.0, role, 0.0)
    reqs = run.sim.submit(requests)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    arrival_t = [requests[i].arrival_s for i in order]
    prompts = [requests[i].prompt_tokens for i in order]
    until = max(duration_s or 0.0, arrival_t[-1])
    run.sim.at(interval_s, run.tick, arrival_t, prompts, len(requests), until)
    run.sim.run()
    end = max(until, run.finish_t[-1] if run.finish_t else 0.0)
    return ElasticRun([run.sim.result(r) for r in reqs], run.events, run.all_lives, end, run.sim.num_moved,
                      run.decisions)
