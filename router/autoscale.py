"""Autoscaling policies: windowed observations in, the desired instances per pool out. Pure.

    policy = make_policy(settings, profile)          # settings: cluster.config.AutoscalingConfig
    decision = policy.decide(observation)            # every `interval_s`
    decision.desired   -> {"prefill": 2, "decode": 3}

Two proposers, one governor:

  * `load`: Dynamo's load mode, AIBrix / llm-d thresholds. A prefill pool grows
    while its queued prompt tokens per instance stay above `queued_tokens_high`
    and shrinks below `queued_tokens_low`; a decode pool grows while its KV use
    stays above `kv_use_high` and shrinks below `kv_use_low`.
  * `slo`: sizes BOTH pools in one decision with the planner's simulator. The
    window's requests (their prompt and output lengths, drawn again at the
    predicted rate) run through the latency profile, corrected by how much the
    live TTFT / TPOT p90 exceed what the profile predicts for the current
    pools; the fewest prefill and decode instances whose simulated TTFT p90 and
    TPOT p90 meet the targets win. Longer prompts therefore move the ratio
    toward prefill, longer outputs toward decode.
  * The governor clamps a proposal to each pool's [min, max] and the total
    budget, moves at most `max_step` instances per decision, and applies a
    change only once the proposal has pointed the same way for the pool's
    upscale (or downscale) delay: noise does not make it flap.

Nothing here touches Ray, clocks or the network: the time is in the
observation, so the policies are tested by feeding observations
(tests/unit/test_autoscale_policy.py).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from router import modes
from router.planner.goodput import at_rate
from router.planner.profile import Profile, calibrated
from router.planner.simulator import PoolSpec, SimConfig, simulate
from router.workload import RequestSpec

POLICIES = ("none", "load", "slo")
CORRECTION_RANGE = (0.5, 4.0)      # observed / predicted latency factors beyond this are noise
STEADY_RATE = 0.25                 # the correction runs while the rate moved less than this in a window


# -- settings (the config's autoscaling section, read by field name) -------------------------------
class PoolBounds(Protocol):
    min_instances: int
    max_instances: int
    upscale_delay_s: float
    downscale_delay_s: float
    max_step: int


class Settings(Protocol):
    policy: str
    interval_s: float
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    queued_tokens_high: int
    queued_tokens_low: int
    kv_use_high: float
    kv_use_low: float
    max_total_instances: int | None
    max_cpus: int | None

    def bounds(self, role: str) -> PoolBounds: ...


# -- observations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolObservation:
    ready: int                      # serving instances
    starting: int = 0               # launched, model still loading
    queued_prompt_tokens: int = 0   # prompt tokens sent to the pool and not prefilled yet
    kv_use: float = 0.0             # mean fraction of KV blocks in use over its instances
    tp: int = 1                     # its plan (for the simulator and the budget)
    pp: int = 1
    cpus: int = 1                   # CPUs one instance holds (num_threads x ranks)

    @property
    def current(self) -> int:
        """What the pool will have once its starting instances are up."""
        return self.ready + self.starting


@dataclass(frozen=True)
class Observation:
    now: float
    window_s: float
    arrivals: int                              # requests admitted in the window
    prompt_tokens: tuple[int, ...] = ()        # of the requests admitted in the window
    output_tokens: tuple[int, ...] = ()        # of the requests finished in the window
    ttft_p90_s: float | None = None            # of the requests finished in the window
    tpot_p90_s: float | None = None
    pools: dict[str, PoolObservation] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.arrivals / self.window_s if self.window_s > 0 else 0.0


@dataclass(frozen=True)
class Decision:
    desired: dict[str, int]
    reason: str = ""

    def changes(self, obs: Observation) -> dict[str, int]:
        """Instances to add (> 0) or remove (< 0) per pool."""
        return {role: n - obs.pools[role].current for role, n in self.desired.items()
                if role in obs.pools and n != obs.pools[role].current}


# -- proposers --------------------------------------------------------------------------------------
def propose_load(s: Settings, obs: Observation) -> tuple[dict[str, int], str]:
    """One step up or down per pool whose load crosses its thresholds (the governor waits them out)."""
    out, why = {}, []
    for role, p in obs.pools.items():
        queued = p.queued_prompt_tokens / max(1, p.ready)
        # a prefill pool goes by its queue, a decode pool by its KV use, a colocated pool by either
        high = (role != "decode" and queued > s.queued_tokens_high) or (role != "prefill" and p.kv_use > s.kv_use_high)
        low = (role == "decode" or queued < s.queued_tokens_low) and (role == "prefill" or p.kv_use < s.kv_use_low)
        if high:
            why.append(f"{role}: {queued:.0f} queued prompt tokens per instance, KV use {p.kv_use:.0%}")
        out[role] = p.current + 1 if high else p.current - 1 if low else p.current
    return out, "; ".join(why) or "load within thresholds"


class SloProposer:
    """The fewest instances per pool whose simulated p90 TTFT and TPOT meet the targets."""

    def __init__(self, settings: Settings, profile: Profile, mode: str = modes.DISAGGREGATED,
                 sim: SimConfig = SimConfig(), horizon_s: float = 60.0, min_requests: int = 160,
                 max_requests: int = 1500, headroom: float = 1.1, seed: int = 0) -> None:
        """Each candidate is simulated over `horizon_s` of arrivals at the predicted rate (at
        least `min_requests`, at most `max_requests`): long enough for long requests to pile up."""
        self.s, self.profile, self.mode, self.sim = settings, profile, mode, sim
        self.horizon_s, self.min_requests, self.max_requests = horizon_s, min_requests, max_requests
        self.headroom, self.seed = headroom, seed
        self.factors = {"prefill": 1.0, "decode": 1.0}   # observed / predicted, smoothed
        self._rates: list[tuple[float, float]] = []      # (now, window rate) of recent observations

    def propose(self, obs: Observation) -> tuple[dict[str, int], str]:
        current = {role: p.current for role, p in obs.pools.items()}
        if obs.arrivals == 0 or not obs.prompt_tokens:
            return {role: self.s.bounds(role).min_instances for role in current}, "no arrivals in the window"
        rate = obs.rate * self.headroom
        unit = self._unit_requests(obs, rate)
        self._correct(obs, unit, rate)
        prof = calibrated(self.profile, self.factors["prefill"], self.factors["decode"])
        plans = {role: (p.tp, p.pp) for role, p in obs.pools.items()}
        if modes.is_colocated(self.mode):
            n = self._smallest("colocated", prof, unit, rate, plans, need=("ttft", "tpot"))
            return {"colocated": n}, f"rate {rate:.2f} req/s: {n} colocated"
        n_p = self._smallest("prefill", prof, unit, rate, plans, need=("ttft",))
        n_d = self._smallest("decode", prof, unit, rate, plans, need=("tpot",))
        n_p, n_d = self._joint(prof, unit, rate, plans, n_p, n_d)
        return {"prefill": n_p, "decode": n_d}, (f"rate {rate:.2f} req/s, factors prefill x{self.factors['prefill']:.2f} "
                                                 f"decode x{self.factors['decode']:.2f}: {n_p}P {n_d}D")

    def _unit_requests(self, obs: Observation, rate: float) -> list[RequestSpec]:
        """The window's lengths drawn again (outputs pair with prompts at random), at rate 1."""
        rng = random.Random(self.seed)
        outs = obs.output_tokens or (16,)
        n = min(self.max_requests, max(self.min_requests, int(rate * self.horizon_s)))
        t, reqs = 0.0, []
        for _ in range(n):
            t += rng.expovariate(1.0)
            reqs.append(RequestSpec(t, rng.choice(obs.prompt_tokens), max(1, rng.choice(outs))))
        return reqs

    def _p90(self, results, metric: str) -> float:
        values = sorted(getattr(r, f"{metric}_s") for r in results if metric == "ttft" or r.output_tokens > 1)
        return values[min(len(values) - 1, int(math.ceil(0.9 * len(values))) - 1)] if values else 0.0

    def _run(self, prof: Profile, unit, rate: float, plans: dict, counts: dict[str, int]):
        """Simulate these pool sizes; a single disaggregated pool runs its phase alone."""
        pools = {role: PoolSpec(*plans.get(role, (1, 1)), n) for role, n in counts.items()}
        mode = self.mode
        if len(counts) == 1 and not modes.is_colocated(self.mode):
            mode = "prefill_only" if "prefill" in counts else "decode_only"
        return simulate(mode, prof, at_rate(unit, rate), config=self.sim, **pools)

    def _meets(self, results, need: tuple[str, ...]) -> bool:
        targets = {"ttft": self.s.ttft_p90_s, "tpot": self.s.tpot_p90_s}
        return all(targets[m] is None or self._p90(results, m) <= targets[m] for m in need)

    def _smallest(self, role: str, prof: Profile, unit, rate: float, plans: dict, need) -> int:
        """Binary search: more instances never make the phase's p90 worse."""
        b = self.s.bounds(role)
        lo, hi = b.min_instances, b.max_instances
        while lo < hi:
            mid = (lo + hi) // 2
            if self._meets(self._run(prof, unit, rate, plans, {role: mid}), need):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _joint(self, prof, unit, rate, plans, n_p: int, n_d: int) -> tuple[int, int]:
        """Both phases together (the transfer and the hand-off): add to the phase that misses."""
        bp, bd = self.s.bounds("prefill"), self.s.bounds("decode")
        for _ in range(bp.max_instances + bd.max_instances):
            res = self._run(prof, unit, rate, plans, {"prefill": n_p, "decode": n_d})
            ttft_ok, tpot_ok = self._meets(res, ("ttft",)), self._meets(res, ("tpot",))
            if ttft_ok and tpot_ok:
                break
            if not ttft_ok and n_p < bp.max_instances:
                n_p += 1
            elif not tpot_ok and n_d < bd.max_instances:
                n_d += 1
            else:
                break
        return n_p, n_d

    def _steady(self, obs: Observation) -> bool:
        """Whether the window's rate is within STEADY_RATE of the rate one window earlier. The p90
        observed is of requests that finished in the window, which arrived about one window
        earlier; the prediction runs at the window's arrival rate. After a rate step the two
        belong to different loads: right after a step up, the pools simulated at the new rate
        queue without end while the finished requests were served calmly at the old one, and
        the correction made the profile look up to 2x faster, so the policy asked for too few
        instances just when the load came."""
        first = not self._rates
        self._rates = [(t, r) for t, r in self._rates if t >= obs.now - 3 * obs.window_s]
        before = [r for t, r in self._rates if t <= obs.now - obs.window_s]
        self._rates.append((obs.now, obs.rate))
        if not before:
            return first        # nothing to compare with yet: trust the first window, skip the next ones
        return abs(obs.rate - before[-1]) <= STEADY_RATE * min(obs.rate, before[-1])

    def _correct(self, obs: Observation, unit, rate: float) -> None:
        """Observed over predicted p90 per phase, for the pools as they are, while the rate is
        steady; smoothed, clamped."""
        if not self._steady(obs) or (obs.ttft_p90_s is None and obs.tpot_p90_s is None):
            return
        counts = {role: max(1, p.ready) for role, p in obs.pools.items()}
        plans = {role: (p.tp, p.pp) for role, p in obs.pools.items()}
        prof = calibrated(self.profile, self.factors["prefill"], self.factors["decode"])
        res = self._run(prof, unit, obs.rate or rate, plans, counts)
        for phase, metric, seen in (("prefill", "ttft", obs.ttft_p90_s), ("decode", "tpot", obs.tpot_p90_s)):
            predicted = self._p90(res, metric)
            if seen is None or predicted <= 0:
                continue
            ratio = min(max(seen / predicted, CORRECTION_RANGE[0]), CORRECTION_RANGE[1])
            self.factors[phase] = min(max(self.factors[phase] * (0.5 + 0.5 * ratio), CORRECTION_RANGE[0]),
                                      CORRECTION_RANGE[1])


# -- the governor -----------------------------------------------------------------------------------
class Governor:
    """Bounds, budget, step size and delays over proposals; remembers since when each pool's
    proposal has pointed up or down."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._since: dict[str, tuple[int, float]] = {}   # role -> (direction, first seen at)

    def apply(self, obs: Observation, proposal: dict[str, int], why: str) -> Decision:
        desired = {}
        for role, p in obs.pools.items():
            b = self.s.bounds(role)
            want = min(max(proposal.get(role, p.current), b.min_instances), b.max_instances)
            direction = (want > p.current) - (want < p.current)
            if direction == 0 or p.current < b.min_instances or p.current > b.max_instances:
                self._since.pop(role, None)
                desired[role] = min(max(p.current, b.min_instances), b.max_instances)
                continue
            first = self._since.get(role)
            if first is None or first[0] != direction:
                self._since[role] = first = (direction, obs.now)
            delay = b.upscale_delay_s if direction > 0 else b.downscale_delay_s
            if obs.now - first[1] < delay:
                desired[role] = p.current
                continue
            step = min(abs(want - p.current), b.max_step)
            desired[role] = p.current + direction * step
            self._since.pop(role, None)
        return Decision(self._within_budget(obs, desired), why)

    def _within_budget(self, obs: Observation, desired: dict[str, int]) -> dict[str, int]:
        """Ranks and CPUs over every pool within the budget: growth is taken back first, from the
        pool that grew most; then pools above their minimum shrink."""
        budgets = [(self.s.max_total_instances, lambda p: p.tp * p.pp), (self.s.max_cpus, lambda p: p.cpus)]
        for cap, cost in budgets:
            if cap is None:
                continue
            while sum(desired[r] * cost(obs.pools[r]) for r in desired) > cap:
                grown = [r for r in desired if desired[r] > obs.pools[r].current]
                spare = [r for r in desired if desired[r] > self.s.bounds(r).min_instances]
                if not (grown or spare):
                    break
                pool = max(grown, key=lambda r: desired[r] - obs.pools[r].current) if grown else \
                    max(spare, key=lambda r: desired[r] - self.s.bounds(r).min_instances)
                desired[pool] -= 1
        return desired


class Policy:
    def __init__(self, settings: Settings, slo: SloProposer | None = None) -> None:
        self.s, self.slo, self.governor = settings, slo, Governor(settings)

    def decide(self, obs: Observation) -> Decision:
        if self.s.policy == "none":
            return Decision({role: p.current for role, p in obs.pools.items()}, "autoscaling off")
        if self.s.policy == "load":
            proposal, why = propose_load(self.s, obs)
        else:
            proposal, why = self.slo.propose(obs)
        return self.governor.apply(obs, proposal, why)


def make_policy(settings: Settings, profile: Profile | None = None, mode: str = modes.DISAGGREGATED,
                sim: SimConfig = SimConfig()) -> Policy:
    if settings.policy not in POLICIES:
        raise ValueError(f"autoscaling.policy must be one of {POLICIES}, got {settings.policy!r}")
    if settings.policy == "slo":
        if profile is None:
            raise ValueError("autoscaling.policy slo needs a latency profile (autoscaling.profile)")
        return Policy(settings, SloProposer(settings, profile, mode, sim))
    return Policy(settings)
