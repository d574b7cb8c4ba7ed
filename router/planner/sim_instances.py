"""The simulated instance kinds: a prefill instance, a decode instance (pulling KV), a decode
instance that also prefills (conditional / never), a colocated instance. Pure; simulator.py's
docstring is the model they follow.
"""
from __future__ import annotations

import math

from collections import deque
from collections.abc import Callable, Iterable
from itertools import chain

from router.conditional import DecodeSide, stall_budget
from router.planner.profile import PlannerError
from router.planner.sim_core import (PoolSpec, SimContext, SimRequest, chunked_step_s, decode_round_s,
                                     held_tokens)

class PrefillInstance:
    """A prefill instance: FCFS batches under the token budget and its KV memory."""

    def __init__(self, sim: SimContext, pool: PoolSpec, on_done: Callable, on_stopped: Callable | None = None) -> None:
        self.sim, self.on_done, self.on_stopped = sim, on_done, on_stopped
        self.accepting = True      # False: it finishes what it has, then on_stopped(now, self)
        self.pp = pool.pp if sim.cfg.pipeline_overlap else 1
        self.lat = sim.profile.latency(pool.tp, pool.pp)
        self.total_blocks = self.free_blocks = sim.capacity_blocks(pool)
        self.waiting: deque[SimRequest] = deque()
        self.queued_tokens = 0
        self.running_tokens = 0    # prompt tokens of the batches in flight (the router counts them as queued)
        self.prefilling: set[SimRequest] = set()   # the requests of those batches
        self.stage_busy = False
        self.link_free = 0.0
        self.cache = sim.cache(pool)

    def add(self, now: float, r: SimRequest) -> None:
        if self.sim.blocks(r.spec.prompt_tokens) > self.total_blocks:
            raise PlannerError(f"a {r.spec.prompt_tokens}-token prompt can never fit a prefill instance's KV")
        self.waiting.append(r)
        self.queued_tokens += r.spec.prompt_tokens
        self.kick(now)

    def kick(self, now: float) -> None:
        if self.stage_busy or not self.waiting:
            return
        cfg, batch, tokens, attn = self.sim.cfg, [], 0, 0
        while self.waiting and len(batch) < cfg.max_num_seqs:
            r = self.waiting[0]
            need = self.sim.blocks(r.spec.prompt_tokens)
            hit = self.cache.usable(r.spec) if self.cache else 0
            n = r.spec.prompt_tokens - hit       # a cached prefix is not computed again
            if (batch and tokens + n > cfg.max_num_batched_tokens) or need > self.free_blocks:
                break
            self.waiting.popleft()
            self.free_blocks -= need
            self.queued_tokens -= r.spec.prompt_tokens
            self.running_tokens += r.spec.prompt_tokens
            self.sim.admitted(self.cache, r, hit, self.free_blocks)
            r.blocks, r.kv_holder = need, self
            batch.append(r)
            self.prefilling.add(r)
            tokens += n
            attn += n * (2 * hit + n)            # its new tokens attend to the cached prefix too
        if not batch:
            return      # waits for KV held by earlier prompts to be handed off
        self.sim.stats.prefill_tokens += tokens
        self.stage_busy = True

        def run(start: float, latency: float) -> None:
            self.sim.at(start + latency / self.pp, self._stage_free)
            self.sim.at(start + latency, self._done, batch)
        self.sim.begin(self, now, "prefill", self.lat.prefill(tokens, attn), run)

    def _stage_free(self, now: float) -> None:
        self.stage_busy = False
        self.sim.end(self)
        self.kick(now)
        self.check_stopped(now)

    def _done(self, now: float, batch: list[SimRequest]) -> None:
        for r in batch:
            self.running_tokens -= r.spec.prompt_tokens
            self.prefilling.discard(r)
            r.first_token_at = now
            self.on_done(now, r)

    def release(self, now: float, r: SimRequest) -> None:
        self.free_blocks += r.blocks
        r.blocks, r.kv_holder = 0, None
        if self.cache:      # its prompt's blocks stay findable
            self.cache.put(r.spec.conversation, r.spec.prompt_tokens, self.free_blocks)
        self.kick(now)
        self.check_stopped(now)

    def idle(self) -> bool:
        """Nothing queued, running or held: every prompt's KV has been handed off."""
        return not self.stage_busy and not self.waiting and self.free_blocks == self.total_blocks

    def check_stopped(self, now: float) -> None:
        if not self.accepting and self.on_stopped is not None and self.idle():
            self.on_stopped(now, self)


class DecodeInstance:
    """A decode instance: FCFS admission by KV room, KV pull, continuous batching."""

    def __init__(self, sim: SimContext, pool: PoolSpec, pull: bool, on_finish: Callable, on_move: Callable | None = None,
                 on_stopped: Callable | None = None) -> None:
        self.sim, self.pull, self.on_finish = sim, pull, on_finish
        self.on_move, self.on_stopped = on_move, on_stopped   # see stop()
        self.accepting = True
        self.pp = pool.pp if sim.cfg.pipeline_overlap else 1
        self.lat = sim.profile.latency(pool.tp, pool.pp)
        self.total_blocks = self.free_blocks = sim.capacity_blocks(pool)
        self.waiting: deque[SimRequest] = deque()
        self.admitted = 0          # transferring + running
        self.landed: list[SimRequest] = []   # KV arrived: they join the batch at the next step
        self.running: list[SimRequest] = []
        self.stepping = False
        self.link_free = 0.0       # when this instance's link finishes the transfers queued on it
        self.waiting_blocks = 0    # KV the waiting requests will need
        self.cache = sim.cache(pool)

    def room(self) -> int:
        return self.free_blocks - self.waiting_blocks

    def add(self, now: float, r: SimRequest) -> None:
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
            held = 0
            if self.cache:      # a pull skips the prefix held here, the rest lands in fresh blocks
                if self.pull:   # (cached ones may have to go)
                    held = self.cache.usable(r.spec)
                    self.cache.claim(r.spec)
                self.cache.fit(self.free_blocks)
            self.admitted += 1
            self.sim.at(self._transfer_end(now, r, held), self._pulled, r, need)

    def _transfer_end(self, now: float, r: SimRequest, held: int = 0) -> float:
        """When the KV pull ends: transfers through one instance's link run one after another.
        `held`: prompt tokens whose KV is here already (prefix caching): not pulled."""
        if not self.pull:
            return now
        src = r.kv_holder
        start = max(now, self.link_free, src.link_free if src is not None else now)
        nbytes = (r.spec.prompt_tokens - held) * self.sim.profile.kv_bytes_per_token
        self.sim.stats.kv_bytes += nbytes
        end = start + nbytes / (self.sim.cfg.transfer_gb_s * 1e9)
        self.link_free = end
        if src is not None:
            src.link_free = end
        return end

    def _pulled(self, now: float, r: SimRequest, need: int) -> None:
        if r.kv_holder is not None:
            r.kv_holder.release(now, r)
        if not self.accepting:          # it was pulling when it stopped taking work: the request moves
            self.free_blocks += need
            self.admitted -= 1
            self.on_move(now, r)
            self.check_stopped(now)
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

    def stop(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
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

    def check_stopped(self, now: float) -> None:
        if not self.accepting and self.on_stopped is not None and self.idle():
            self.on_stopped(now, self)

    def _stepped(self, now: float) -> None:
        still = []
        for r in self.running:
            r.tokens_left -= 1
            if r.tokens_left > 0:
                still.append(r)
                continue
            self._finish(now, r)
        self.running = still
        self.admit(now)
        self._step(now)

    def _finish(self, now: float, r: SimRequest) -> None:
        r.finished_at = now
        self.free_blocks += r.blocks
        self.admitted -= 1
        if self.cache:      # the conversation so far (its last token's KV was never computed)
            self.cache.put(r.spec.conversation, r.spec.prompt_tokens + r.spec.output_tokens - 1, self.free_blocks)
        self.on_finish(now, r)

class LocalDecodeInstance(DecodeInstance):
    """A decode instance that also prefills prompts given to it, in chunks riding on its steps."""

    def __init__(self, sim: SimContext, pool: PoolSpec, chunk_tokens: int, on_finish: Callable) -> None:
        super().__init__(sim, pool, True, on_finish)
        self.chunk_tokens = chunk_tokens
        self.local: deque[SimRequest] = deque()   # local prefills waiting for a slot and KV
        self.partial: list[SimRequest] = []       # admitted, prompt not fully run
        self.queued_local_tokens = 0        # prompt tokens of local prefills not done (the router's count)
        self.bound: set[SimRequest] = set()       # past their prefill, not finished: the batch the router counts

    def side(self, overlap: int, now: float, tpot_slo_s: float, coming: Iterable[SimRequest] = ()) -> DecodeSide:
        """What the router's conditional policy sees of this instance (router/core.py _decode_side).
        `coming`: requests being prefilled elsewhere that will decode here (or may: not bound yet);
        with its own local prefills they have no token yet and would decode under a new one's chunks."""
        context = sum(r.spec.prompt_tokens + r.spec.output_tokens - r.tokens_left for r in self.bound)
        coming = [*coming, *self.local, *self.partial]
        budget = math.inf
        if self.bound or coming:
            step = self.lat.decode(len(self.bound) + len(coming), context + sum(r.spec.prompt_tokens for r in coming))
            budget = stall_budget([*((r.spec.output_tokens, r.spec.output_tokens - r.tokens_left,
                                      0.0 if math.isnan(r.first_token_at) else now - r.first_token_at)
                                     for r in self.bound),
                                   *((r.spec.output_tokens, 0, 0.0) for r in coming)], step, tpot_slo_s)
        return DecodeSide(self.name, len(self.bound), context, self.queued_local_tokens, overlap,
                          stall_budget_s=budget)

    def add(self, now: float, r: SimRequest) -> None:
        """A request prefilled elsewhere: its KV is pulled here (as DecodeInstance)."""
        self.bound.add(r)
        super().add(now, r)

    def add_local(self, now: float, r: SimRequest) -> None:
        """A request to prefill here, then decode."""
        if self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens) > self.total_blocks:
            raise PlannerError(f"a request of {r.spec.prompt_tokens}+{r.spec.output_tokens} tokens can never "
                               "fit a decode instance's KV")
        self.local.append(r)
        self.queued_local_tokens += r.spec.prompt_tokens
        if not self.stepping:
            self._step(now)

    def _admit_local(self) -> None:
        while self.local and self.admitted < self.sim.cfg.max_num_seqs:
            r = self.local[0]
            need = self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens)
            if need > self.free_blocks:
                return
            hit = self.cache.usable(r.spec, held_tokens(chain(self.running, self.landed), r.spec)) if self.cache else 0
            self.local.popleft()
            self.free_blocks -= need
            self.admitted += 1
            r.blocks, r.done_prompt = need, hit
            self.sim.admitted(self.cache, r, hit, self.free_blocks)
            self.partial.append(r)

    def _step(self, now: float) -> None:
        self.running.extend(self.landed)
        self.landed.clear()
        self._admit_local()
        chunks, budget = [], self.chunk_tokens
        for r in self.partial:
            if budget <= 0:
                break
            chunks.append((r, min(budget, r.spec.prompt_tokens - r.done_prompt)))
            budget -= chunks[-1][1]
        if not self.running and not chunks:
            self.stepping = False
            self.sim.end(self)
            return
        self.stepping = True
        ctx = sum(r.spec.prompt_tokens + r.spec.output_tokens - r.tokens_left for r in self.running)
        if chunks:
            phase, duration = "prefill", chunked_step_s(self.lat, chunks, len(self.running), ctx)
        else:
            phase, duration = "decode", decode_round_s(self.lat, self.pp, len(self.running), ctx)
        self.sim.begin(self, now, phase, duration, lambda start, d: self.sim.at(start + d, self._stepped, chunks))

    def _stepped(self, now: float, chunks: list = ()) -> None:
        for r, n in chunks:
            r.done_prompt += n
            self.sim.stats.prefill_tokens += n
            if r.done_prompt < r.spec.prompt_tokens:
                continue
            self.partial.remove(r)
            self.queued_local_tokens -= r.spec.prompt_tokens
            self.sim.stats.local_prefills += 1
            r.first_token_at, r.local_prefill = now, True
            self.bound.add(r)
            if r.tokens_left > 0:
                self.landed.append(r)       # decodes from the next step on
            else:
                self._finish(now, r)
        super()._stepped(now)

    def _finish(self, now: float, r: SimRequest) -> None:
        self.bound.discard(r)
        super()._finish(now, r)


class ColocatedInstance:
    """One instance running both phases: vLLM's prefill-first steps, or Sarathi's chunked steps."""

    def __init__(self, sim: SimContext, pool: PoolSpec, chunked: bool, on_finish: Callable) -> None:
        self.sim, self.chunked, self.on_finish = sim, chunked, on_finish
        self.pp = pool.pp if sim.cfg.pipeline_overlap else 1
        self.lat = sim.profile.latency(pool.tp, pool.pp)
        self.total_blocks = self.free_blocks = sim.capacity_blocks(pool)
        self.waiting: deque[SimRequest] = deque()
        self.partial: list[SimRequest] = []     # admitted, prompt not fully run (chunked)
        self.running: list[SimRequest] = []
        self.queued_tokens = 0
        self.stepping = False
        self.in_step: list = []           # prompts the current step finishes (not running yet)
        self.cache = sim.cache(pool)

    def load(self) -> int:
        """As the router's pick_colocated: prompt tokens still to prefill (the current step's
        too) plus the requests there."""
        return (self.queued_tokens + sum(n for _, n in self.in_step) + len(self.in_step)
                + len(self.running) + len(self.partial))

    def add(self, now: float, r: SimRequest) -> None:
        if self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens) > self.total_blocks:
            raise PlannerError(f"a request of {r.spec.prompt_tokens}+{r.spec.output_tokens} tokens can never "
                               "fit an instance's KV")
        self.waiting.append(r)
        self.queued_tokens += r.spec.prompt_tokens
        if not self.stepping:
            self._step(now)

    def _admit_head(self, tokens_so_far: int, first: bool) -> SimRequest | None:
        cfg = self.sim.cfg
        if not self.waiting or len(self.running) + len(self.partial) >= cfg.max_num_seqs:
            return None
        r = self.waiting[0]
        need = self.sim.blocks(r.spec.prompt_tokens + r.spec.output_tokens)
        if need > self.free_blocks:
            return None
        hit = self.cache.usable(r.spec, held_tokens(self.running, r.spec)) if self.cache else 0
        if not self.chunked and not first and tokens_so_far + r.spec.prompt_tokens - hit > cfg.max_num_batched_tokens:
            return None
        self.waiting.popleft()
        self.free_blocks -= need
        r.blocks, r.done_prompt = need, hit
        self.queued_tokens -= r.spec.prompt_tokens
        self.sim.admitted(self.cache, r, hit, self.free_blocks)
        return r

    def _plan(self) -> tuple[float, list, list] | None:
        """(duration, [(request, prompt tokens this step)], requests decoding this step) or None if idle."""
        ctx = sum(r.spec.prompt_tokens + r.spec.output_tokens - r.tokens_left for r in self.running)
        chunks: list[tuple[SimRequest, int]] = []
        if not self.chunked:
            tokens = 0
            while (r := self._admit_head(tokens, not chunks)) is not None:
                chunks.append((r, r.spec.prompt_tokens - r.done_prompt))
                tokens += chunks[-1][1]
            if chunks:       # prefill-only step: running decodes wait (the interference)
                return self.lat.prefill(tokens, sum(n * (2 * r.done_prompt + n) for r, n in chunks)), chunks, []
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
            n = min(budget, r.spec.prompt_tokens - r.done_prompt)
            chunks.append((r, n))
            budget -= n
        if not chunks:
            if not self.running:
                return None
            return decode_round_s(self.lat, self.pp, len(self.running), ctx), [], list(self.running)
        return chunked_step_s(self.lat, chunks, len(self.running), ctx), chunks, list(self.running)

    def _step(self, now: float) -> None:
        plan = self._plan()
        self.stepping = plan is not None
        if plan is None:
            self.sim.end(self)
            return
        self.in_step = [] if self.chunked else plan[1]
        self.sim.begin(self, now, "prefill" if plan[1] else "decode", plan[0],
                       lambda start, d: self.sim.at(start + d, self._stepped, plan[1], plan[2]))

    def _stepped(self, now: float, chunks: list, decoding: list[SimRequest]) -> None:
        self.in_step = []
        for r in decoding:
            r.tokens_left -= 1
            if r.tokens_left <= 0:
                self._finish(now, r)
        self.running = [r for r in self.running if r.tokens_left > 0]
        for r, n in chunks:
            r.done_prompt += n
            self.sim.stats.prefill_tokens += n
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

    def _finish(self, now: float, r: SimRequest) -> None:
        r.finished_at = now
        self.free_blocks += r.blocks
        r.blocks = 0
        if self.cache:
            self.cache.put(r.spec.conversation, r.spec.prompt_tokens + r.spec.output_tokens - 1, self.free_blocks)
        self.on_finish(now, r)
