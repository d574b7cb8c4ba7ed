"""A discrete-event simulator of the serving cluster, driven by a latency profile.

    results = simulate("disaggregated", profile, requests, prefill=PoolSpec(1, 1, 2),
                       decode=PoolSpec(2, 1, 1), config=SimConfig(transfer_gb_s=25))
    attainment(results, ttft_slo=0.25, tpot_slo=0.1)

`Simulation` is the same cluster with instances added, or stopped taking work, while it runs
(router/planner/elastic.py drives it from an autoscaling policy); `simulate` builds fixed pools
on it.

Modes:
  * "disaggregated": prefill instances batch prompts FCFS under a token budget
    and hold each prompt's KV until it is handed off; the router sends the
    prefilled request to the decode instance with the most room; decode admits
    it when its KV fits (FCFS, so a big head-of-line request waits for blocks),
    then pulls the KV (bytes / link bandwidth; the transfers through one
    instance's link, sending or receiving, run one after another), then joins
    its continuous batch.
  * "colocated": each instance runs both phases, prefill steps first whenever a
    prompt fits (vLLM's default scheduler), decode steps otherwise.
  * "colocated_chunked": Sarathi-Serve: every step carries all running decodes
    plus prompt chunks filling the rest of the token budget.
  * "conditional" / "never": disaggregated, with decode instances that prefill too, in chunks
    riding on their decode steps (router.disaggregation conditional / never); each arrival is
    placed by the live router's router.conditional policy. router/planner/sim_local.py.
  * "prefill_only" / "decode_only": one phase alone (decode as if prompts
    arrived already prefilled), for the search's per-phase estimate.

Timing. A pipeline instance (p stages) runs a prefill batch in one pass
latency but frees its first stage after latency/p, so batches overlap; a decode
step splits the batch into p micro-batches in flight, so one round (one token
for every running request) takes the latency of one micro-batch. Colocated
instances do not overlap steps (conservative for p > 1).
SimConfig.pipeline_overlap=False turns both off: the engine's pipeline runner
today runs one stage at a time with no micro-batches.

The first token comes out of the prefill (as in router/server.py), so TTFT is
arrival -> prefill done, and the KV transfer and decode admission wait fall
into TPOT; SimConfig.ttft_includes_transfer=True counts TTFT at the end of the
transfer instead (DistServe's convention when the first token streams from
decode). TPOT = (e2e - ttft) / (output_tokens - 1).

Interference: with a profile that has it (cores of one CPU sharing memory
bandwidth), a step runs (1 + k) times longer for each other instance busy at
its start, instances starting at the same instant included (the profile's
`interference` k by phase; see profile.py). All the
instances of one simulation count as neighbours: right for the one CPU node it
is measured on; GPU profiles leave it out.

Memory: decode reserves KV for prompt + output at admission (the simulator
knows the output length; the real worker grows blocks and may preempt, which
this does not model). Prefill holds a prompt's KV until its transfer ends.

Prefix caching (SimConfig.prefix_caching; 1 x 1 instances, as the engine allows): each instance
keeps what it released of each conversation (router/workload.py's multi-turn turns extend each
other) until its free blocks are needed (router/planner/sim_cache.py); a prompt computes only the
tokens past its cached prefix, timed as a chunk over that prefix: prefill(n, n * (2 * cached + n)).
The router remembers which instance saw which prefix (router.prefix_index) and prefers it: the
conditional policy's overlap inputs, and in "disaggregated" the prefill instance with the most
overlap among those with the fewest queued tokens. A pull still moves the whole prompt (as the
decode worker does today).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from router import modes
from router.planner.profile import PlannerError, Profile
from router.planner.sim_cache import conversation_blocks
from router.planner.sim_core import (CONDITIONAL, NEVER, PoolSpec, RequestResult, SimConfig, SimContext,
                                     SimRequest, SimStats, chunked_step_s, decode_round_s, held_tokens)
from router.planner.sim_instances import ColocatedInstance, DecodeInstance, PrefillInstance
from router.planner.sim_local import LocalRouter
from router.prefix_index import PrefixIndex
from router.workload import RequestSpec

# re-exported: callers import the simulator's types from here
__all__ = ["CONDITIONAL", "MODES", "NEVER", "PoolSpec", "RequestResult", "SimConfig", "SimStats", "Simulation",
           "chunked_step_s", "decode_round_s", "held_tokens", "simulate"]

# the serving modes, and two that simulate one phase alone (the search's per-phase estimates)
MODES = (*modes.MODES, CONDITIONAL, NEVER, "prefill_only", "decode_only")


def simulate(mode: str, profile: Profile, requests: Sequence[RequestSpec], prefill: PoolSpec | None = None,
             decode: PoolSpec | None = None, colocated: PoolSpec | None = None,
             config: SimConfig = SimConfig(), stats: SimStats | None = None) -> list[RequestResult]:
    """Run the requests through the cluster; one result per request, in input order.
    `stats`, when given, receives the steps and busy seconds of every instance by phase."""
    sim = Simulation(mode, profile, config, stats)
    for role, pool in _pools(mode, prefill, decode, colocated).items():
        for _ in range(pool.num_instances):
            sim.add_instance(role, pool)
    reqs = sim.submit(requests)
    sim.run()
    return [sim.result(r) for r in reqs]


def _pools(mode: str, prefill: PoolSpec | None, decode: PoolSpec | None,
           colocated: PoolSpec | None) -> dict[str, PoolSpec]:
    if mode not in MODES:
        raise PlannerError(f"unknown simulation mode {mode!r}; known: {list(MODES)}")
    given = {"prefill": prefill, "decode": decode, "colocated": colocated}
    return {role: _need(given[role], role, mode) for role in _roles(mode)}


def _roles(mode: str) -> tuple[str, ...]:
    """The pools a mode runs (decode before prefill: the order their instances are built in)."""
    if mode in (modes.COLOCATED, modes.COLOCATED_CHUNKED):
        return ("colocated",)
    return {"prefill_only": ("prefill",), "decode_only": ("decode",), NEVER: ("decode",)}.get(mode, ("decode", "prefill"))


class Simulation:
    """One simulated cluster whose instances may come and go while it runs: the event queue, the
    instances taking work, by role, and the router between them. `simulate` builds fixed pools
    on it; router/planner/elastic.py adds instances and stops them as a policy decides.

        sim = Simulation("disaggregated", profile, config, on_finish=f, on_stopped=g)
        inst = sim.add_instance("decode", PoolSpec(1, 1, 1), now)     # takes work from `now`
        reqs = sim.submit(requests); sim.at(t, fn, *args); sim.run()
        sim.stop_taking_work(now, inst)     # prefill: finishes what it has; decode: its requests move
        sim.result(req)

    on_finish(now, req) is called as each submitted request finishes; on_stopped(now, inst) once
    an instance that stopped taking work holds nothing more. A request that finds no instance of
    the role it needs (all stopped, new ones still loading) waits for the next one added.
    """

    def __init__(self, mode: str, profile: Profile, config: SimConfig = SimConfig(), stats: SimStats | None = None,
                 on_finish: Callable | None = None, on_stopped: Callable | None = None) -> None:
        if mode not in MODES:
            raise PlannerError(f"unknown simulation mode {mode!r}; known: {list(MODES)}")
        _check_config(config)
        self.mode, self.sim = mode, SimContext(profile, config, stats)
        self.on_finish, self.on_stopped = on_finish, on_stopped
        self.instances: dict[str, list] = {"prefill": [], "decode": [], "colocated": []}   # taking work
        self.pending: dict[str, deque[SimRequest]] = {role: deque() for role in self.instances}
        self.num_moved = 0          # attempts started by moving a request off a stopped decode instance
        self.num_added = 0
        # the router's memory of which instance saw which prefix (router/prefix_index.py)
        self.index = PrefixIndex() if config.prefix_caching else None
        self.local = None           # conditional / never: the placement of each arrival
        if mode in (CONDITIONAL, NEVER):
            self.local = LocalRouter(self)

    # -- instances -------------------------------------------------------------------------------
    def add_instance(self, role: str, pool: PoolSpec, now: float = 0.0):
        """A new instance of `role` (one of pool's plan; its num_instances is ignored) that takes work
        from `now`; requests waiting for one are routed."""
        if role not in _roles(self.mode):
            raise PlannerError(f"mode {self.mode!r} has no {role} pool")
        _need(replace(pool, num_instances=1), role, self.mode)
        if role == "decode" and self.local is not None:
            inst = self.local.decode_instance(pool)
        elif role == "colocated":
            inst = ColocatedInstance(self.sim, pool, self.mode == modes.COLOCATED_CHUNKED, self.finished)
        elif role == "prefill":
            inst = PrefillInstance(self.sim, pool, self.to_decode, self.on_stopped)
        else:
            inst = DecodeInstance(self.sim, pool, self.mode == modes.DISAGGREGATED, self.finished, self._move,
                           self.on_stopped)
        inst.name = f"{role}-{self.num_added}"
        self.num_added += 1
        self.instances[role].append(inst)
        waiting, self.pending[role] = self.pending[role], deque()
        for r in waiting:
            self._route(role, now, r)
        if self.local is not None:
            self.local.place_waiting(now)
        return inst

    def stop_taking_work(self, now: float, inst) -> None:
        """The instance takes no more work and stops (on_stopped) once it holds nothing. A prefill
        instance finishes its queue and hands off its KV; a decode instance's requests move now."""
        role = next((k for k, v in self.instances.items() if inst in v), None)
        if role is None:
            raise PlannerError("stop_taking_work: not an instance taking work in this simulation")
        if role == "colocated" or self.local is not None:
            raise PlannerError(f"stop_taking_work: {role} instances do not stop yet in mode {self.mode}")
        self.instances[role].remove(inst)
        if role == "prefill":
            inst.accepting = False
            inst.check_stopped(now)
            return
        moved, waiting = inst.stop(now)
        for r in waiting:           # never admitted there: offered to another decode instance
            self.to_decode(now, r)
        for r in moved:
            self._move(now, r)
        inst.check_stopped(now)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, requests: Sequence[RequestSpec]) -> list[SimRequest]:
        """The requests, checked, their arrivals scheduled; pass them to result() after run()."""
        reqs = [SimRequest(_check_request(i, s)) for i, s in enumerate(requests)]
        for r in reqs:
            self.sim.at(r.spec.arrival_s, self.arrive, r)
        return reqs

    def at(self, t: float, fn: Callable, *args) -> None:
        self.sim.at(t, fn, *args)

    def run(self) -> None:
        self.sim.run()

    def num_events(self) -> int:
        """Events still to come (arrivals, steps, transfers, what at() scheduled)."""
        return len(self.sim.events)

    def result(self, r: SimRequest) -> RequestResult:
        return _result(r, self.sim.cfg)

    def arrive(self, now: float, r: SimRequest) -> None:
        if self.local is not None:
            self.local.place(now, r)
        elif self.mode in (modes.COLOCATED, modes.COLOCATED_CHUNKED):
            self._route("colocated", now, r)
        elif self.mode == "decode_only":
            r.first_token_at = now
            self.to_decode(now, r)
        else:
            self._route("prefill", now, r)

    def to_decode(self, now: float, r: SimRequest) -> None:
        if r.tokens_left <= 0 or self.mode == "prefill_only":   # done at its first token (or no decode phase)
            if r.kv_holder is not None:
                r.kv_holder.release(now, r)
            self.finished(now, r)
            return
        self._route("decode", now, r)

    def _route(self, role: str, now: float, r: SimRequest) -> None:
        insts = self.instances[role]
        if not insts:
            self.pending[role].append(r)
        elif role == "prefill":
            p = min(insts, key=lambda p: (p.queued_tokens, -self.overlap(p, r.spec), len(p.waiting)))
            self.note(p, r.spec, r.spec.prompt_tokens)
            p.add(now, r)
        elif role == "decode":
            d = max(insts, key=DecodeInstance.room)
            self.note(d, r.spec, r.spec.prompt_tokens)
            r.decode_at = d
            d.add(now, r)
        else:
            min(insts, key=ColocatedInstance.load).add(now, r)

    def overlap(self, inst, spec: RequestSpec) -> int:
        """Prompt tokens the router believes `inst` holds of this prompt (0 without prefix caching)."""
        if self.index is None or spec.conversation is None:
            return 0
        bs = self.sim.cfg.block_size
        return self.index.overlap(inst.name, conversation_blocks(spec, spec.prompt_tokens, bs)) * bs

    def note(self, inst, spec: RequestSpec, tokens: int) -> None:
        """The router sent `inst` this conversation's first `tokens` tokens (it will hold them)."""
        if self.index is not None and spec.conversation is not None:
            self.index.note(inst.name, conversation_blocks(spec, tokens, self.sim.cfg.block_size))

    def _move(self, now: float, r: SimRequest) -> None:
        """The real router's migration (router/core.py `_migrate`): a new attempt prefills the
        prompt and every token already streamed on a prefill instance, then decodes the rest."""
        origin, left = r.origin, r.tokens_left      # left >= 1: a request with none left has finished
        spec = origin.spec
        attempt = SimRequest(RequestSpec(now, spec.prompt_tokens + spec.output_tokens - left, left))
        attempt.origin = origin
        self.num_moved += 1
        self.arrive(now, attempt)

    def finished(self, now: float, r: SimRequest) -> None:
        r.finished_at = r.origin.finished_at = now
        if r.decode_at is not None:     # as router/core.py _finish: it keeps the conversation so far
            self.note(r.decode_at, r.spec, r.spec.prompt_tokens + r.spec.output_tokens - 1)
        if self.on_finish is not None:
            self.on_finish(now, r.origin)


def _need(pool: PoolSpec | None, name: str, mode: str) -> PoolSpec:
    if pool is None:
        raise PlannerError(f"mode {mode!r} needs a {name} pool")
    for key in ("tp", "pp", "num_instances"):
        v = getattr(pool, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlannerError(f"{name}.{key} must be an integer >= 1, got {v!r}")
    return pool


def _check_config(c: SimConfig) -> None:
    for key in ("max_num_batched_tokens", "max_num_seqs", "chunk_budget", "block_size"):
        if getattr(c, key) < 1:
            raise PlannerError(f"SimConfig.{key} must be >= 1, got {getattr(c, key)}")
    if not (c.transfer_gb_s > 0 and math.isfinite(c.transfer_gb_s)):
        raise PlannerError(f"SimConfig.transfer_gb_s must be > 0, got {c.transfer_gb_s}")
    if c.local_chunk_tokens < 1:
        raise PlannerError(f"SimConfig.local_chunk_tokens must be >= 1, got {c.local_chunk_tokens}")
    for key in ("conditional_ttft_slo_s", "conditional_tpot_slo_s"):
        if not (getattr(c, key) > 0 and math.isfinite(getattr(c, key))):
            raise PlannerError(f"SimConfig.{key} must be > 0, got {getattr(c, key)}")


def _check_request(i: int, s: RequestSpec) -> RequestSpec:
    if s.prompt_tokens < 1 or s.output_tokens < 1 or not (s.arrival_s >= 0 and math.isfinite(s.arrival_s)):
        raise PlannerError(f"request {i}: needs prompt_tokens >= 1, output_tokens >= 1 and a finite "
                           f"arrival >= 0, got {s}")
    return s


def _result(r: SimRequest, cfg: SimConfig) -> RequestResult:
    first = r.kv_landed_at if cfg.ttft_includes_transfer and not math.isnan(r.kv_landed_at) else r.first_token_at
    ttft, e2e = first - r.spec.arrival_s, r.finished_at - r.spec.arrival_s
    n = r.spec.output_tokens
    tpot = (e2e - ttft) / (n - 1) if n > 1 else 0.0
    return RequestResult(r.spec.arrival_s, r.spec.prompt_tokens, n, ttft, tpot, e2e, r.local_prefill)
