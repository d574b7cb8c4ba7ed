"""Plan search: (t, p) per phase and the prefill:decode instance ratio, maximising goodput per GPU.

DistServe's two regimes (OSDI'24, Sec. 4):

  * high node affinity (fast links between nodes): the phases are planned
    independently. Each phase's (t, p) is simulated alone (prefill judged on
    TTFT, decode on TPOT) to get a per-instance goodput; the best few per GPU
    are combined into units of n_p prefill + n_d decode instances whose
    estimated goodput is min(n_p * G_p, n_d * G_d); the best estimates are
    then simulated together (joint SLOs, KV over the inter-node link) and the
    unit is replicated over the cluster.
  * low node affinity (slow links between nodes): a prefill and a decode
    instance share the pipeline degree p, and stage s of every instance of a
    unit sits on node s, so the KV of each layer range moves over the intra-node
    link. Per node, n_p * t_p + n_d * t_d <= GPUs per node; a unit spans p nodes.

Pruning, to plan 4 nodes x 8 GPUs in well under a minute: tensor degrees are
powers of two within a node, pipeline degrees 1, 2, 4 (and within the
cluster); per-phase goodputs are cached and shared by both regimes; only the
top `keep` configurations per phase and the top `joint` units per regime are
simulated jointly; every simulation uses `num_requests` requests.

The colocated baselines (vLLM-style prefill first, and Sarathi-Serve chunked
prefill) are searched over (t, p) with the same joint SLOs, so the plan can be
compared per GPU.

Conditional disaggregation (router.disaggregation conditional: a decode instance prefills a
prompt itself, in chunks, when the live router's model says that meets the SLOs better) is
weighed on every jointly simulated unit whose decode instances are 1 x 1 (the plan a local
prefill runs on): the same pools simulated in mode "conditional", its policy handed the search's
SLOs; it is ranked with the rest, and the result names the best plan of each mode. "never" (no
prefill pool) is not a candidate: a disaggregated config starts at least one prefill instance.
With `sim.prefix_caching` (for a multi-turn workload) every simulation keeps a prefix cache on
its 1 x 1 instances, and the best plan is simulated once more without one, to weigh the switch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from router import modes
from router.planner.goodput import Goodput, at_rate, attainment, goodput, unit_rate_requests
from router.planner.profile import PlannerError, Profile
from router.planner.simulator import CONDITIONAL, PoolSpec, SimConfig, decode_round_s, simulate

REGIMES = ("high", "low")


@dataclass(frozen=True)
class ClusterShape:
    nodes: int
    gpus_per_node: int
    intra_node_gb_s: float
    inter_node_gb_s: float

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> ClusterShape:
        for key in ("nodes", "gpus_per_node"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlannerError(f"{key} must be an integer >= 1, got {v!r}")
        for key in ("intra_node_gb_s", "inter_node_gb_s"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise PlannerError(f"{key} must be > 0, got {v!r}")
        if self.num_gpus < 2:
            raise PlannerError("a disaggregated plan needs at least 2 GPUs (one per phase)")
        return self


@dataclass(frozen=True)
class SearchSettings:
    ttft_slo: float
    tpot_slo: float
    workload: str = "chatbot"
    target: float = 0.9
    num_requests: int = 160       # at least this many requests per simulation ...
    horizon_s: float = 8.0        # ... and enough to span this long, so a fast unit reaches steady state
    max_requests: int = 2000      # ... but no more than this
    seed: int = 0
    burstiness: float = 1.0
    keep: int = 3                 # configurations per phase carried into the unit search
    joint: int = 4                # units per regime simulated jointly
    max_instances: int = 4        # per phase in one unit
    sim: SimConfig = field(default_factory=SimConfig)   # sim.prefix_caching: caches on 1 x 1 instances
    conditional: bool = True      # also weigh conditional disaggregation on units with 1 x 1 decode

    def check(self) -> SearchSettings:
        for key in ("ttft_slo", "tpot_slo", "horizon_s"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise PlannerError(f"{key} must be a positive number, got {v!r}")
        if not 0 < self.target <= 1:
            raise PlannerError(f"target attainment must be in (0, 1], got {self.target}")
        for key in ("num_requests", "max_requests", "keep", "joint", "max_instances"):
            if getattr(self, key) < 1:
                raise PlannerError(f"{key} must be >= 1, got {getattr(self, key)}")
        return self


@dataclass(frozen=True)
class Candidate:
    regime: str                   # "high", "low", "colocated" or "colocated_chunked"
    prefill: PoolSpec | None      # one unit: pools with their instance counts
    decode: PoolSpec | None
    colocated: PoolSpec | None
    num_units: int                # copies of the unit that fit the cluster
    goodput: float                # req/s of one unit (simulated)
    attainment: float             # at that rate
    transfer_gb_s: float = 0.0
    disaggregation: str = "always"   # router.disaggregation: always, or conditional (local prefills too)

    @property
    def unit_gpus(self) -> int:
        return sum(p.num_gpus for p in (self.prefill, self.decode, self.colocated) if p is not None)

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.unit_gpus

    def describe(self) -> str:
        if self.colocated is not None:
            c = self.colocated
            unit = f"{c.num_instances} colocated tp{c.tp}-pp{c.pp}"
        else:
            p, d = self.prefill, self.decode
            unit = f"{p.num_instances} prefill tp{p.tp}-pp{p.pp} + {d.num_instances} decode tp{d.tp}-pp{d.pp}"
        how = self.regime if self.disaggregation == "always" else f"{self.regime}, {self.disaggregation}"
        return (f"[{how}] {unit} ({self.unit_gpus} GPUs) x {self.num_units}: "
                f"{self.goodput:.2f} req/s per unit, {self.per_gpu:.3f} req/s per GPU, "
                f"attainment {self.attainment:.1%}")


@dataclass
class SearchResult:
    best: Candidate
    runners_up: list[Candidate]
    best_colocated: Candidate | None
    num_plans: int                # distinct configurations simulated
    num_sims: int                 # simulations run
    settings: SearchSettings
    shape: ClusterShape
    best_by_mode: dict = field(default_factory=dict)   # router.disaggregation -> its best Candidate
    uncached_goodput: float | None = None   # sim.prefix_caching: the best plan's unit goodput without it


class _Search:
    def __init__(self, profile: Profile, shape: ClusterShape, s: SearchSettings) -> None:
        self.profile, self.shape, self.s = profile, shape, s
        self.unit = unit_rate_requests(s.workload, max(s.num_requests, s.max_requests), seed=s.seed,
                                       burstiness=s.burstiness)
        self.max_tokens = max(r.prompt_tokens + r.output_tokens for r in self.unit)
        self.mean_prompt = sum(r.prompt_tokens for r in self.unit) / len(self.unit)
        self.mean_output = sum(r.output_tokens for r in self.unit) / len(self.unit)
        self.num_sims = 0
        self.plans: set = set()
        self._phase_cache: dict = {}

    # -- candidate (t, p) --------------------------------------------------------------------------
    def configs(self, max_gpus: int) -> list[tuple[int, int]]:
        out = []
        for t in (1, 2, 4, 8, 16):
            for p in (1, 2, 4):
                if t <= self.shape.gpus_per_node and t * p <= max_gpus and self.profile.kv_capacity_tokens(t, p) >= self.max_tokens:
                    out.append((t, p))
        return out

    def _goodput(self, key, mode: str, pools: dict, slos: tuple[float, float], transfer: float = 1.0,
                 sim: SimConfig | None = None) -> Goodput:
        # a conditional router weighs its two paths against the SLOs the plan is for
        cfg = replace(sim or self.s.sim, transfer_gb_s=transfer, conditional_ttft_slo_s=self.s.ttft_slo,
                      conditional_tpot_slo_s=self.s.tpot_slo)
        self.plans.add(key)

        def attain(rate: float) -> float:
            self.num_sims += 1
            n = min(self.s.max_requests, max(self.s.num_requests, math.ceil(rate * self.s.horizon_s)))
            return attainment(simulate(mode, self.profile, at_rate(self.unit[:n], rate), config=cfg, **pools),
                              *slos)
        return goodput(attain, self.s.target, start_rate=max(0.5 * self.capacity(mode, pools), 1e-3))

    def capacity(self, mode: str, pools: dict) -> float:
        """An upper bound on the rate (req/s) the pools can sustain, to start the goodput search near it."""
        cfg = self.s.sim

        def prefill_rate(pool: PoolSpec) -> float:
            lat, b = self.profile.latency(pool.tp, pool.pp), cfg.max_num_batched_tokens
            return pool.num_instances * pool.pp * b / lat.prefill(b, b * self.mean_prompt) / self.mean_prompt

        def decode_rate(pool: PoolSpec) -> float:
            lat = self.profile.latency(pool.tp, pool.pp)
            per_req = self.mean_prompt + self.mean_output
            m = max(1, min(cfg.max_num_seqs, self.profile.kv_capacity_tokens(pool.tp, pool.pp) // per_req))
            step = decode_round_s(lat, pool.pp, int(m), int(m * (self.mean_prompt + self.mean_output / 2)))
            return pool.num_instances * m / (step * self.mean_output)

        if modes.is_colocated(mode):
            pool = pools["colocated"]
            return 1.0 / (1.0 / prefill_rate(pool) + 1.0 / decode_rate(pool))
        rates = [f(pools[k]) for k, f in (("prefill", prefill_rate), ("decode", decode_rate)) if k in pools]
        return min(rates)

    def phase_goodput(self, phase: str, t: int, p: int) -> float:
        """One instance of one phase alone, judged on that phase's SLO only."""
        if (phase, t, p) not in self._phase_cache:
            big = 1e9
            slos = (self.s.ttft_slo, big) if phase == "prefill" else (big, self.s.tpot_slo)
            g = self._goodput((phase, t, p), f"{phase}_only", {phase: PoolSpec(t, p, 1)}, slos)
            self._phase_cache[(phase, t, p)] = g.rate
        return self._phase_cache[(phase, t, p)]

    def best_phase(self, phase: str, configs: list[tuple[int, int]]) -> list[tuple[float, int, int]]:
        ranked = sorted(((self.phase_goodput(phase, t, p) / (t * p), t, p) for t, p in configs), reverse=True)
        return [x for x in ranked if x[0] > 0][:self.s.keep]

    # -- units -------------------------------------------------------------------------------------
    def estimate_units(self, regime: str) -> list[tuple[float, PoolSpec, PoolSpec]]:
        """(estimated unit goodput per GPU, prefill pool, decode pool) for every unit that fits."""
        configs = self.configs(self.shape.num_gpus - 1)
        if regime == "high":
            groups = [configs]
        else:   # both phases share p, one stage per node of the unit
            groups = [[c for c in configs if c[1] == p] for p in sorted({c[1] for c in configs})
                      if p <= self.shape.nodes]
        out = []
        for group in groups:
            for _, tp_, pp_ in self.best_phase("prefill", group):
                for _, td, pd in self.best_phase("decode", group):
                    out.extend(self._units(regime, PoolSpec(tp_, pp_, 1), PoolSpec(td, pd, 1)))
        out.sort(key=lambda x: (-x[0], x[1].num_gpus + x[2].num_gpus))
        return out

    def _units(self, regime: str, pre: PoolSpec, dec: PoolSpec) -> list[tuple[float, PoolSpec, PoolSpec]]:
        gp, gd = self.phase_goodput("prefill", pre.tp, pre.pp), self.phase_goodput("decode", dec.tp, dec.pp)
        out = []
        for n_p in range(1, self.s.max_instances + 1):
            for n_d in range(1, self.s.max_instances + 1):
                if regime == "low":
                    fits = n_p * pre.tp + n_d * dec.tp <= self.shape.gpus_per_node
                else:
                    fits = n_p * pre.tp * pre.pp + n_d * dec.tp * dec.pp <= self.shape.num_gpus
                if fits:
                    gpus = n_p * pre.tp * pre.pp + n_d * dec.tp * dec.pp
                    out.append((min(n_p * gp, n_d * gd) / gpus, replace(pre, num_instances=n_p),
                                replace(dec, num_instances=n_d)))
        return out

    def joint(self, regime: str) -> list[Candidate]:
        transfer = self.shape.intra_node_gb_s if regime == "low" else self.shape.inter_node_gb_s
        out = []
        for est, pre, dec in self.estimate_units(regime)[:self.s.joint]:
            ways = [(modes.DISAGGREGATED, "always")]
            if self.s.conditional and dec.tp * dec.pp == 1:    # a local prefill runs on a 1 x 1 instance
                ways.append((CONDITIONAL, "conditional"))
            for mode, how in ways:
                g = self._goodput((regime, pre, dec, how), mode, {"prefill": pre, "decode": dec},
                                  (self.s.ttft_slo, self.s.tpot_slo), transfer=transfer)
                out.append(Candidate(regime, pre, dec, None, self.num_units(regime, pre, dec), g.rate,
                                     g.attainment, transfer, how))
        return out

    def without_prefix_caching(self, c: Candidate) -> float:
        """The unit goodput of plan `c` with no prefix cache anywhere (its other settings kept)."""
        mode = modes.DISAGGREGATED if c.disaggregation == "always" else CONDITIONAL
        return self._goodput((c.regime, c.prefill, c.decode, c.disaggregation, "uncached"), mode,
                             {"prefill": c.prefill, "decode": c.decode}, (self.s.ttft_slo, self.s.tpot_slo),
                             transfer=c.transfer_gb_s, sim=replace(self.s.sim, prefix_caching=False)).rate

    def num_units(self, regime: str, pre: PoolSpec, dec: PoolSpec) -> int:
        if regime == "low":     # units side by side on a group of p nodes, as many groups as fit
            per_node = pre.num_instances * pre.tp + dec.num_instances * dec.tp
            return (self.shape.nodes // pre.pp) * (self.shape.gpus_per_node // per_node)
        return self.shape.num_gpus // (pre.num_gpus + dec.num_gpus)

    def colocated(self) -> Candidate | None:
        """The best colocated instance per GPU, prefill-first (vLLM) or chunked (Sarathi-Serve)."""
        best = None
        for mode in (modes.COLOCATED, modes.COLOCATED_CHUNKED):
            for t, p in self.configs(self.shape.num_gpus):
                g = self._goodput((mode, t, p), mode, {"colocated": PoolSpec(t, p, 1)},
                                  (self.s.ttft_slo, self.s.tpot_slo))
                c = Candidate(mode, None, None, PoolSpec(t, p, 1), self.shape.num_gpus // (t * p),
                              g.rate, g.attainment)
                if best is None or c.per_gpu > best.per_gpu:
                    best = c
        return best


def search_plan(profile: Profile, shape: ClusterShape, settings: SearchSettings,
                regimes: tuple[str, ...] = REGIMES, with_colocated: bool = True) -> SearchResult:
    """The best disaggregated plan over the regimes asked for, its runners-up and the best colocated plan."""
    shape.check()
    settings.check()
    for r in regimes:
        if r not in REGIMES:
            raise PlannerError(f"unknown affinity regime {r!r}; known: {list(REGIMES)}")
    if not regimes:
        raise PlannerError("no affinity regime to search")
    search = _Search(profile, shape, settings)
    candidates = [c for r in regimes for c in search.joint(r)]
    candidates = [c for c in candidates if c.goodput > 0]
    if not candidates:
        raise PlannerError(f"no plan meets TTFT {settings.ttft_slo}s and TPOT {settings.tpot_slo}s for "
                           f"{settings.target:.0%} of requests at any rate: loosen the SLOs")
    candidates.sort(key=lambda c: (-c.per_gpu, c.unit_gpus))
    by_mode: dict[str, Candidate] = {}
    for c in candidates:            # best first: the first of each mode is its best
        by_mode.setdefault(c.disaggregation, c)
    best = candidates[0]
    uncached = search.without_prefix_caching(best) if settings.sim.prefix_caching else None
    coloc = search.colocated() if with_colocated else None
    return SearchResult(best, candidates[1:], coloc, len(search.plans), search.num_sims,
                        settings, shape, by_mode, uncached)
