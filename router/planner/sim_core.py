"""The simulator's shared pieces: pool and config types, results and stats, one request's state,
the event queue, and the step-time formulas every instance kind uses. Pure.

router/planner/simulator.py documents the model; router/planner/sim_instances.py holds the
instance kinds built on these.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from router.planner.profile import PlanLatency, PlannerError, Profile
from router.planner.sim_cache import PrefixCache
from router.workload import RequestSpec

# disaggregated clusters whose decode instances prefill some prompts (router.disaggregation): sim_local.py
CONDITIONAL, NEVER = "conditional", "never"

@dataclass(frozen=True)
class PoolSpec:
    tp: int = 1
    pp: int = 1
    num_instances: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.num_instances


@dataclass(frozen=True)
class SimConfig:
    max_num_batched_tokens: int = 4096   # prefill batch / chunked step token budget
    max_num_seqs: int = 64               # requests per prefill batch and per decode batch
    chunk_budget: int = 512              # colocated_chunked: tokens per step (decodes + chunks)
    block_size: int = 16
    transfer_gb_s: float = 25.0          # the link between a prefill and a decode instance
    ttft_includes_transfer: bool = False
    kv_capacity_tokens: int | None = None   # per instance; None: from the profile's memory
    pipeline_overlap: bool = True        # False: one stage works at a time (engine/parallel_runner.py today)
    prefix_caching: bool = False         # 1 x 1 instances keep released KV findable (sim_cache.py)
    local_chunk_tokens: int = 256        # conditional / never: prompt tokens a decode step carries at most
    conditional_ttft_slo_s: float = 1.0  # ... and the SLOs router.conditional weighs the two paths against
    conditional_tpot_slo_s: float = 0.15


@dataclass(frozen=True)
class RequestResult:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    local_prefill: bool = False     # conditional / never: prefilled on its decode instance


@dataclass
class SimStats:
    """What the simulated instances did, by step phase: steps run and seconds busy (summed over
    instances) — the figures a worker reports as num_steps and mean_step_s, to compare with."""
    steps: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    busy_s: dict = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    prefill_tokens: int = 0      # prompt tokens computed (remote, local, colocated)
    cached_tokens: int = 0       # prompt tokens found in a prefix cache instead
    kv_bytes: float = 0.0        # KV moved from prefill to decode instances
    local_prefills: int = 0      # prompts prefilled on their decode instance (conditional / never)
    evicted_blocks: int = 0      # cached blocks given to other contents

    def add(self, phase: str, seconds: float) -> None:
        self.steps[phase] += 1
        self.busy_s[phase] += seconds


class SimRequest:
    __slots__ = ("spec", "first_token_at", "finished_at", "blocks", "done_prompt", "tokens_left",
                 "kv_holder", "kv_landed_at", "origin", "decode_at", "local_prefill")

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.first_token_at = self.finished_at = self.kv_landed_at = math.nan   # simulated seconds
        self.blocks = 0             # KV blocks it holds on the instance it is on
        self.done_prompt = 0        # chunked prefill: prompt tokens already run
        self.tokens_left = spec.output_tokens - 1   # tokens still to decode after the first
        self.kv_holder = None       # the prefill instance holding its KV until decode has it
        self.origin = self          # a moved request's new attempt points at the request it finishes
        self.decode_at = None       # the decode instance the router bound it to
        self.local_prefill = False  # prefilled on its decode instance (conditional / never)


class SimContext:
    """The event queue and the shared helpers of every instance kind."""

    def __init__(self, profile: Profile, cfg: SimConfig, stats: SimStats | None = None) -> None:
        self.profile, self.cfg = profile, cfg
        self.stats = stats if stats is not None else SimStats()
        self.events: list = []
        self.seq = itertools.count()
        self.busy: dict[int, tuple[str, float]] = {}   # id(instance) -> (phase, end) of its step now

    def begin(self, inst, now: float, phase: str, base_s: float, then: Callable) -> None:
        """`inst` starts a step of `phase` at `now`; `then(now, duration)` schedules its end.
        With interference, the duration is known once every instance starting at this same
        instant has said so (a zero-delay event), and is slowed by the neighbours busy then."""
        if self.profile.interference.none:
            self.stats.add(phase, base_s)
            then(now, base_s)
            return
        self.busy[id(inst)] = (phase, math.inf)
        self.at(now, self._commit, inst, phase, base_s, then)

    def _commit(self, now: float, inst, phase: str, base_s: float, then: Callable) -> None:
        others = [p for i, (p, end) in self.busy.items() if i != id(inst) and end > now]
        duration = base_s * self.profile.interference.factor(phase, others)
        self.busy[id(inst)] = (phase, now + duration)
        self.stats.add(phase, duration)
        then(now, duration)

    def end(self, inst) -> None:
        self.busy.pop(id(inst), None)

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn, args))

    def run(self) -> None:
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            fn(t, *args)

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.cfg.block_size)

    def cache(self, pool: PoolSpec) -> PrefixCache | None:
        """A prefix cache for an instance of `pool`, where one is kept (cluster/config.py: 1 x 1 only)."""
        if not self.cfg.prefix_caching or pool.tp * pool.pp != 1:
            return None
        return PrefixCache(self.cfg.block_size, self.stats)

    def admitted(self, cache: PrefixCache | None, r: SimRequest, hit: int, free_blocks: int) -> None:
        """`r` took its blocks with `hit` prompt tokens cached: its conversation's entry is its own
        now, and the entries left fit in the free blocks."""
        self.stats.cached_tokens += hit
        if cache is not None:
            cache.claim(r.spec)
            cache.fit(free_blocks)

    def capacity_blocks(self, pool: PoolSpec) -> int:
        tokens = self.cfg.kv_capacity_tokens
        if tokens is None:
            tokens = self.profile.kv_capacity_tokens(pool.tp, pool.pp)
        if tokens < self.cfg.block_size:
            raise PlannerError(f"a {pool.tp}x{pool.pp} instance has no room for KV "
                               f"({tokens} tokens): the weights do not fit")
        return tokens // self.cfg.block_size


def decode_round_s(lat: PlanLatency, pp: int, batch: int, context: int) -> float:
    """One token for each of `batch` requests: p micro-batches in flight, one pass each (pp=1: no split)."""
    mb = -(-batch // pp)
    return lat.decode(mb, context * mb / batch)


def held_tokens(running, spec: RequestSpec) -> int:
    """KV an instance holds of `spec`'s conversation in requests decoding there: prompt and the
    tokens decoded so far but the newest (whose KV the next step computes)."""
    if spec.conversation is None:
        return 0
    return max((r.spec.prompt_tokens + r.spec.output_tokens - r.tokens_left - 1 for r in running
                if r.spec.conversation == spec.conversation), default=0)


def chunked_step_s(lat: PlanLatency, chunks: list, num_decodes: int, context: int) -> float:
    """One step of `num_decodes` decode rows (KV `context` in all) and prompt chunks [(request,
    tokens)], each over what its prompt has done (cached or run) before it."""
    tokens = sum(n for _, n in chunks)
    attn = sum(n * (2 * r.done_prompt + n) for r, n in chunks)   # sums to l^2 over a prompt's chunks
    # Decode rows ride in the same GEMMs as prompt tokens; only their KV reads are extra.
    return lat.prefill(tokens + num_decodes, attn) + lat.decode.c * context
