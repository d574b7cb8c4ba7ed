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
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from router.planner.profile import PlanLatency, PlannerError, Profile
from router import modes
from router.workload import RequestSpec

# the serving modes, and two that simulate one phase alone (the search's per-phase estimates)
MODES = (*modes.MODES, "prefill_only", "decode_only")


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


@dataclass(frozen=True)
class RequestResult:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float


@dataclass
class SimStats:
    """What the simulated instances did, by step phase: steps run and seconds busy (summed over
    instances) — the figures a worker reports as num_steps and mean_step_s, to compare with."""
    steps: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    busy_s: dict = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})

    def add(self, phase: str, seconds: float) -> None:
        self.steps[phase] += 1
        self.busy_s[phase] += seconds


class _Req:
    __slots__ = ("spec", "first_token_at", "finished_at", "blocks", "done_prompt", "tokens_left",
                 "kv_holder", "kv_landed_at", "origin")

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.first_token_at = self.finished_at = self.kv_landed_at = math.nan   # simulated seconds
        self.blocks = 0             # KV blocks it holds on the instance it is on
        self.done_prompt = 0        # chunked prefill: prompt tokens already run
        self.tokens_left = spec.output_tokens - 1   # tokens still to decode after the first
        self.kv_holder = None       # the prefill instance holding its KV until decode has it
        self.origin = self          # a moved request's new attempt points at the request it finishes


class _Sim:
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


class _Prefill:
    """A prefill instance: FCFS batches under the token budget and its KV memory."""

    def __init__(self, sim: _Sim, pool: PoolSpec, on_done: Callable, on_stopped: Callable | None = None) -> None:
        self.sim, self.on_done, self.on_stopped = sim, on_done, on_stopped
        self.accepting = True      # False: it finishes what it has, then on_stopped(now, self)
        self.pp = pool.pp if sim.cfg.pipeline_overlap else 1
        self.lat = sim.profile.latency(pool.tp, pool.pp)
        self.total_blocks = self.free_blocks = sim.capacity_blocks(pool)
        self.waiting: deque[_Req] = deque()
        self.queued_tokens = 0
        self.stage_busy = False
        self.link_free = 0.0

    def add(self, now: float, r: _Req) -> None:
        if self.sim.blocks(r.spec.prompt_tokens) > self.total_blocks:
            raise PlannerError(f"a {r.spec.prompt_tokens}-token prompt can never fit a prefill instance's KV")
        self.waiting.append(r)
        self.queued_tokens += r.spec.prompt_tokens
        self.kick(now)

    def kick(self, now: float) -> None:
        if self.stage_busy or not self.waiting:
            return
        cfg, batch, tokens = self.sim.cfg, [], 0
        while self.waiting and len(batch) < cfg.max_num_seqs:
            r = self.waiting[0]
            need = self.sim.blocks(r.spec.prompt_tokens)
            n = r.spec.prompt_tokens
            if (batch and tokens + n > cfg.max_num_batched_tokens) or need > self.free_blocks:
                break
            self.waiting.popleft()
            self.free_blocks -= need
            r.blocks, r.kv_holder = need, self
            batch.append(r)
            tokens += n
        if not batch:
            return      # waits for KV held by earlier prompts to be handed off
        self.queued_tokens -= tokens
        self.stage_busy = True

        def run(start: float, latency: float) -> None:
            self.sim.at(start + latency / self.pp, self._stage_free)
            self.sim.at(start + latency, self._done, batch)
        self.sim.begin(self, now, "prefill", self.lat.prefill(tokens, sum(r.spec.prompt_tokens ** 2 for r in batch)),
                       run)

    def _stage_free(self, now: float) -> None:
        self.stage_busy = False
        self.sim.end(self)
        self.kick(now)
        self._check_stopped(now)

    def _done(self, now: float, batch: list[_Req]) -> None:
        for r in batch:
            r.first_token_at = now
            self.on_done(now, r)

    def release(self, now: float, r: _Req) -> None:
        self.free_blocks += r.blocks
        r.blocks, r.kv_holder = 0, None
        self.kick(now)
        self._check_stopped(now)

    def idle(self) -> bool:
        """Nothing queued, running or held: every prompt's KV has been handed off."""
        return not self.stage_busy and not self.waiting and self.free_blocks == self.total_blocks

    def _check_stopped(self, now: float) -> None:
        if not self.accepting and self.on_stopped is not None and self.idle():
            self.on_stopped(now, self)


class _Decode:
    """A decode instance: FCFS admission by KV room, KV pull, continuous batching."""

    def __init__(self, sim: _Sim, pool: PoolSpec, pull: bool, on_finish: Callable, on_move: Callable | None = None,
                 on_stopped: Callable | None = None) -> None:
        self.sim, self.pull, self.on_finish = sim, pull, on_finish
        self.on_move, self.on_stopped = on_move, on_stopped   # see stop()
        self.accepting = True
        self.pp = pool.pp if sim.cfg.pipeline_overlap else 1
        self.lat = sim.profile.latency(pool.tp, pool.pp)
        self.total_blocks = self.free_blocks = sim.capacity_blocks(pool)
        self.waiting: deque[_Req] = deque()
        self.admitted = 0          # transferring + running
        self.landed: list[_Req] = []   # KV arrived: they join the batch at the next step
        self.running: list[_Req] = []
        self.stepping = False
        self.link_free = 0.0       # when this instance's link finishes the transfers queued on it
        self.waiting_blocks = 0    # KV the waiting requests will need

    def room(self) -> int:
        return self.free_blocks - self.waiting_blocks

    def add(self, now: float, r: _Req) -> None:
        need = self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens)
        if need > self.total_blocks:
            raise PlannerError(f"a request of {r.spec.prompt_tokens}+{r.spec.output_tokens} tokens can never "
                               "fit a decode instance's KV")
        self.waiting.append(r)
        self.waiting_blocks += need
        self.admit(now)

    def admit(self, now: float) -> None:
        cfg = self.sim.cfg
        while self.waiting and self.admitted < cfg.max_num_seqs:
            r = self.waiting[0]
            need = self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens)
            if need > self.free_blocks:
                return
            self.waiting.popleft()
            self.waiting_blocks -= need
            self.free_blocks -= need
            self.admitted += 1
            self.sim.at(self._transfer_end(now, r), self._pulled, r, need)

    def _transfer_end(self, now: float, r: _Req) -> float:
        """When the KV pull ends: transfers through one instance's link run one after another."""
        if not self.pull:
            return now
        src = r.kv_holder
        start = max(now, self.link_free, src.link_free if src is not None else now)
        end = start + r.spec.prompt_tokens * self.sim.profile.kv_bytes_per_token / (self.sim.cfg.transfer_gb_s * 1e9)
        self.link_free = end
        if src is not None:
            src.link_free = end
        return end

    def _pulled(self, now: float, r: _Req, need: int) -> None:
        if r.kv_holder is not None:
            r.kv_holder.release(now, r)
        if not self.accepting:          # it was pulling when it stopped taking work: the request moves
            self.free_blocks += need
            self.admitted -= 1
            self.on_move(now, r)
            self._check_stopped(now)
            return
        r.blocks, r.kv_landed_at = need, now
        self.landed.append(r)
        if not self.stepping:
            self._step(now)

    def _step(self, now: float) -> None:
        self.running.extend(self.landed)
        self.landed.clear()
        if not self.running:
            self.stepping = False
            self.sim.end(self)
            return
        self.stepping = True
        ctx = sum(r.spec.prompt_tokens + r.spec.output_tokens - r.tokens_left for r in self.running)
        self.sim.begin(self, now, "decode", decode_round_s(self.lat, self.pp, len(self.running), ctx),
                       lambda start, step: self.sim.at(start + step, self._stepped))

    def stop(self, now: float) -> tuple[list[_Req], list[_Req]]:
        """It takes no more work. Returns (the requests decoding here, KV landed or not, which
        move: on_move is called for those still pulling when they land; the requests waiting
        for admission, whose KV is still on their prefill instance). A step in flight is lost:
        its tokens were not streamed, so the moved requests run them again."""
        self.accepting = False
        moved = self.running + self.landed
        for r in moved:
            self.free_blocks += r.blocks
            r.blocks = 0
        self.admitted -= len(moved)
        self.running, self.landed = [], []
        waiting = list(self.waiting)
        self.waiting.clear()
        self.waiting_blocks = 0
        return moved, waiting

    def idle(self) -> bool:
        return self.admitted == 0 and not self.waiting

    def _check_stopped(self, now: float) -> None:
        if not self.accepting and self.on_stopped is not None and self.idle():
            self.on_stopped(now, self)

    def _stepped(self, now: float) -> None:
        still = []
        for r in self.running:
            r.tokens_left -= 1
            if r.tokens_left > 0:
                still.append(r)
                continue
            r.finished_at = now
            self.free_blocks += r.blocks
            self.admitted -= 1
            self.on_finish(now, r)
        self.running = still
        self.admit(now)
        self._step(now)


class _Colocated:
    """One instance running both phases: vLLM's prefill-first steps, or Sarathi's chunked steps."""

    def __init__(self, sim: _Sim, pool: PoolSpec, chunked: bool, on_finish: Callable) -> None:
        self.sim, self.chunked, self.on_finish = sim, chunked, on_finish
        self.pp = pool.pp if sim.cfg.pipeline_overlap else 1
        self.lat = sim.profile.latency(pool.tp, pool.pp)
        self.total_blocks = self.free_blocks = sim.capacity_blocks(pool)
        self.waiting: deque[_Req] = deque()
        self.partial: list[_Req] = []     # admitted, prompt not fully run (chunked)
        self.running: list[_Req] = []
        self.queued_tokens = 0
        self.stepping = False
        self.in_step: list = []           # prompts the current step finishes (not running yet)

    def load(self) -> int:
        """As the router's pick_colocated: prompt tokens still to prefill (the current step's
        too) plus the requests there."""
        return (self.queued_tokens + sum(n for _, n in self.in_step) + len(self.in_step)
                + len(self.running) + len(self.partial))

    def add(self, now: float, r: _Req) -> None:
        if self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens) > self.total_blocks:
            raise PlannerError(f"a request of {r.spec.prompt_tokens}+{r.spec.output_tokens} tokens can never "
                               "fit an instance's KV")
        self.waiting.append(r)
        self.queued_tokens += r.spec.prompt_tokens
        if not self.stepping:
            self._step(now)

    def _admit_head(self, tokens_so_far: int, first: bool) -> _Req | None:
        cfg = self.sim.cfg
        if not self.waiting or len(self.running) + len(self.partial) >= cfg.max_num_seqs:
            return None
        r = self.waiting[0]
        need = self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens)
        if need > self.free_blocks:
            return None
        if not self.chunked and not first and tokens_so_far + r.spec.prompt_tokens > cfg.max_num_batched_tokens:
            return None
        self.waiting.popleft()
        self.free_blocks -= need
        r.blocks = need
        self.queued_tokens -= r.spec.prompt_tokens
        return r

    def _plan(self) -> tuple[float, list, list] | None:
        """(duration, [(request, prompt tokens this step)], requests decoding this step) or None if idle."""
        ctx = sum(r.spec.prompt_tokens + r.spec.output_tokens - r.tokens_left for r in self.running)
        chunks: list[tuple[_Req, int]] = []
        if not self.chunked:
            tokens = 0
            while (r := self._admit_head(tokens, not chunks)) is not None:
                chunks.append((r, r.spec.prompt_tokens))
                tokens += r.spec.prompt_tokens
            if chunks:       # prefill-only step: running decodes wait (the interference)
                return self.lat.prefill(tokens, sum(n * n for _, n in chunks)), chunks, []
            if self.running:
                return decode_round_s(self.lat, self.pp, len(self.running), ctx), [], list(self.running)
            return None
        budget = self.sim.cfg.chunk_budget - len(self.running)
        for r in self.partial:
            if budget <= 0:
                break
            n = min(budget, r.spec.prompt_tokens - r.done_prompt)
            chunks.append((r, n))
            budget -= n
        while budget > 0 and (r := self._admit_head(0, True)) is not None:
            self.partial.append(r)
            n = min(budget, r.spec.prompt_tokens)
            chunks.append((r, n))
            budget -= n
        if not chunks:
            if not self.running:
                return None
            return decode_round_s(self.lat, self.pp, len(self.running), ctx), [], list(self.running)
        tokens = sum(n for _, n in chunks)
        attn = sum(n * (2 * r.done_prompt + n) for r, n in chunks)   # sums to l^2 over a prompt's chunks
        # Decode rows ride in the same GEMMs as prompt tokens; only their KV reads are extra.
        duration = self.lat.prefill(tokens + len(self.running), attn) + self.lat.decode.c * ctx
        return duration, chunks, list(self.running)

    def _step(self, now: float) -> None:
        plan = self._plan()
        self.stepping = plan is not None
        if plan is None:
            self.sim.end(self)
            return
        self.in_step = [] if self.chunked else plan[1]
        self.sim.begin(self, now, "prefill" if plan[1] else "decode", plan[0],
                       lambda start, d: self.sim.at(start + d, self._stepped, plan[1], plan[2]))

    def _stepped(self, now: float, chunks: list, decoding: list[_Req]) -> None:
        self.in_step = []
        for r in decoding:
            r.tokens_left -= 1
            if r.tokens_left <= 0:
                self._finish(now, r)
        self.running = [r for r in self.running if r.tokens_left > 0]
        for r, n in chunks:
            r.done_prompt += n
            if r.done_prompt < r.spec.prompt_tokens:
                continue
            if self.chunked:
                self.partial.remove(r)
            r.first_token_at = now
            if r.tokens_left > 0:
                self.running.append(r)
            else:
                self._finish(now, r)
        self._step(now)

    def _finish(self, now: float, r: _Req) -> None:
        r.finished_at = now
        self.free_blocks += r.blocks
        r.blocks = 0
        self.on_finish(now, r)


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
    return {"prefill_only": ("prefill",), "decode_only": ("decode",)}.get(mode, ("decode", "prefill"))


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
        self.mode, self.sim = mode, _Sim(profile, config, stats)
        self.on_finish, self.on_stopped = on_finish, on_stopped
        self.instances: dict[str, list] = {"prefill": [], "decode": [], "colocated": []}   # taking work
        self.pending: dict[str, deque[_Req]] = {role: deque() for role in self.instances}
        self.num_moved = 0          # attempts started by moving a request off a stopped decode instance

    # -- instances -------------------------------------------------------------------------------
    def add_instance(self, role: str, pool: PoolSpec, now: float = 0.0):
        """A new instance of `role` (one of pool's plan; its num_instances is ignored) that takes work
        from `now`; requests waiting for one are routed."""
        if role not in _roles(self.mode):
            raise PlannerError(f"mode {self.mode!r} has no {role} pool")
        _need(replace(pool, num_instances=1), role, self.mode)
        if role == "colocated":
            inst = _Colocated(self.sim, pool, self.mode == modes.COLOCATED_CHUNKED, self._finished)
        elif role == "prefill":
            inst = _Prefill(self.sim, pool, self.to_decode, self.on_stopped)
        else:
            inst = _Decode(self.sim, pool, self.mode == modes.DISAGGREGATED, self._finished, self._move,
                           self.on_stopped)
        self.instances[role].append(inst)
        waiting, self.pending[role] = self.pending[role], deque()
        for r in waiting:
            self._route(role, now, r)
        return inst

    def stop_taking_work(self, now: float, inst) -> None:
        """The instance takes no more work and stops (on_stopped) once it holds nothing. A prefill
        instance finishes its queue and hands off its KV; a decode instance's requests move now."""
        role = next((k for k, v in self.instances.items() if inst in v), None)
        if role is None:
            raise PlannerError("stop_taking_work: not an instance taking work in this simulation")
        if role == "colocated":
            raise PlannerError("stop_taking_work: colocated instances do not stop yet")
        self.instances[role].remove(inst)
        if role == "prefill":
            inst.accepting = False
            inst._check_stopped(now)
            return
        moved, waiting = inst.stop(now)
        for r in waiting:           # never admitted there: offered to another decode instance
            self.to_decode(now, r)
        for r in moved:
            self._move(now, r)
        inst._check_stopped(now)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, requests: Sequence[RequestSpec]) -> list[_Req]:
        """The requests, checked, their arrivals scheduled; pass them to result() after run()."""
        reqs = [_Req(_check_request(i, s)) for i, s in enumerate(requests)]
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

    def result(self, r: _Req) -> RequestResult:
        return _result(r, self.sim.cfg)

    def arrive(self, now: float, r: _Req) -> None:
        if self.mode in (modes.COLOCATED, modes.COLOCATED_CHUNKED):
            self._route("colocated", now, r)
        elif self.mode == "decode_only":
            r.first_token_at = now
            self.to_decode(now, r)
        else:
            self._route("prefill", now, r)

    def to_decode(self, now: float, r: _Req) -> None:
        if r.tokens_left <= 0 or self.mode == "prefill_only":   # done at its first token (or no decode phase)
            if r.kv_holder is not None:
                r.kv_holder.release(now, r)
            self._finished(now, r)
            return
        self._route("decode", now, r)

    def _route(self, role: str, now: float, r: _Req) -> None:
        insts = self.instances[role]
        if not insts:
            self.pending[role].append(r)
        elif role == "prefill":
            min(insts, key=lambda p: (p.queued_tokens, len(p.waiting))).add(now, r)
        elif role == "decode":
            max(insts, key=_Decode.room).add(now, r)
        else:
            min(insts, key=_Colocated.load).add(now, r)

    def _move(self, now: float, r: _Req) -> None:
        """The real router's migration (router/core.py `_migrate`): a new attempt prefills the
        prompt and every token already streamed on a prefill instance, then decodes the rest."""
        origin, left = r.origin, r.tokens_left      # left >= 1: a request with none left has finished
        spec = origin.spec
        attempt = _Req(RequestSpec(now, spec.prompt_tokens + spec.output_tokens - left, left))
        attempt.origin = origin
        self.num_moved += 1
        self.arrive(now, attempt)

    def _finished(self, now: float, r: _Req) -> None:
        r.finished_at = r.origin.finished_at = now
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


def _check_request(i: int, s: RequestSpec) -> RequestSpec:
    if s.prompt_tokens < 1 or s.output_tokens < 1 or not (s.arrival_s >= 0 and math.isfinite(s.arrival_s)):
        raise PlannerError(f"request {i}: needs prompt_tokens >= 1, output_tokens >= 1 and a finite "
                           f"arrival >= 0, got {s}")
    return s


def _result(r: _Req, cfg: SimConfig) -> RequestResult:
    first = r.kv_landed_at if cfg.ttft_includes_transfer and not math.isnan(r.kv_landed_at) else r.first_token_at
    ttft, e2e = first - r.spec.arrival_s, r.finished_at - r.spec.arrival_s
    n = r.spec.output_tokens
    tpot = (e2e - ttft) / (n - 1) if n > 1 else 0.0
    return RequestResult(r.spec.arrival_s, r.spec.prompt_tokens, n, ttft, tpot, e2e)
