"""Chunked-prefill scheduler (Sarathi-Serve): prefill chunks ride along with decode steps.

Each step has a token budget (`max_num_batched_tokens`). Lifecycle of a request:
  1. `add` puts it in WAITING (FCFS), as in `Scheduler`.
  2. `schedule` fills one step, in this order:
       a. every RUNNING request whose context is cached up to its last token
          decodes that token (1 token of the budget each): decodes are never
          starved, the budget is >= `max_num_seqs` (checked at construction).
          One that needs a block that is not free preempts the newest running
          request (freed, back to the front of WAITING, recomputed later);
       b. RUNNING requests still prefilling get their next chunk, oldest first,
          while budget is left;
       c. WAITING requests are admitted in order while budget, the sequence
          limit and free blocks allow: blocks for every token are allocated at
          admission (so prefills in progress never wait on each other), and
          the first chunk takes what is left of the budget.
     A step of decodes only is a plain decode `StepPlan`, a step of whole
     prompts only a plain prefill `StepPlan`; anything else is a
     `MixedStepPlan` (decode rows first, then chunks over a cached prefix).
  3. `update`: a chunk that does not reach the end of its request samples
     nothing (`NO_TOKEN`) and only advances the request's computed tokens; the
     rest append their token and finish as in `Scheduler`.

Pure: no torch, no threads, no clock (the time is passed in).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerConfig, cache_computed
from engine.sequence import SeqState, SeqStatus, SeqWork, StepKind, StepPlan, StepResult

NO_TOKEN = -1   # the token of a row that sampled nothing: a chunk short of its prompt's end


@dataclass(frozen=True)
class MixedStepPlan:
    """One forward pass over decode rows (one token each, first) and prefill chunks.

    A chunk's `SeqWork` starts at `start_pos` over the request's cached prefix;
    `samples[i]` says whether seqs[i] reaches its request's end and samples a token.
    """

    seqs: tuple[SeqWork, ...]
    samples: tuple[bool, ...]
    kind: StepKind = field(default=StepKind.MIXED, init=False)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class ChunkedScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, eos_token_ids: frozenset[int]) -> None:
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({config.max_num_seqs}): every running request decodes inside the budget")
        super().__init__(config, blocks, eos_token_ids)
        self._computed: dict[str, int] = {}   # req_id -> tokens whose KV is in the cache (RUNNING only)

    def add_running(self, seq: SeqState) -> None:
        super().add_running(seq)
        self._computed[seq.req_id] = seq.num_tokens - 1

    def num_computed_tokens(self, req_id: str) -> int:
        return self._computed.get(req_id, 0)

    @property
    def queued_prompt_tokens(self) -> int:
        """Tokens still to prefill: waiting requests and the rest of those in progress."""
        rest = sum(s.num_tokens - self._computed[s.req_id] for s in self.running
                   if s.num_tokens - self._computed[s.req_id] > 1)
        return rest + sum(s.num_tokens for s in self.waiting)

    # -- the step -------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan | MixedStepPlan | None:
        decodes = self._schedule_decodes()
        budget = self.config.max_num_batched_tokens - len(decodes)
        chunks: list[tuple[SeqState, int]] = []      # (request, chunk length)
        for seq in self.running:
            if budget == 0:
                break
            left = seq.num_tokens - self._computed[seq.req_id]
            if left > 1:
                chunks.append((seq, min(left, budget)))
                budget -= chunks[-1][1]
        while budget > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate_cached(seq.num_tokens, seq.all_token_ids):
                break
            self.waiting.popleft()
            seq.block_ids, seq.num_cached_tokens = self.blocks.allocate_cached(seq.num_tokens, seq.all_token_ids)
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            self._computed[seq.req_id] = seq.num_cached_tokens   # a cached prefix is not computed again
            chunks.append((seq, min(seq.num_tokens - seq.num_cached_tokens, budget)))
            budget -= chunks[-1][1]
        return self._plan(decodes, chunks)

    def update(self, plan: StepPlan | MixedStepPlan, result: StepResult) -> list[SeqState]:
        finished = []
        for work, token_id in zip(plan.seqs, result.token_ids, strict=True):
            seq = self._by_id.get(work.req_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            self._computed[seq.req_id] = work.context_len
            cache_computed(self.blocks, seq, work)
            if token_id == NO_TOKEN:
                continue
            seq.output_token_ids.append(token_id)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    # -- internals ------------------------------------------------------------------
    def _schedule_decodes(self) -> list[SeqState]:
        """Every running request with only its last token left gets a slot for it (a)."""
        scheduled: list[SeqState] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if seq.num_tokens - self._computed[seq.req_id] != 1:
                continue   # still prefilling: its blocks were allocated at admission
            while not self.blocks.can_append(len(seq.block_ids), seq.num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq.block_ids, seq.num_tokens)
                scheduled.append(seq)
        return scheduled

    def _plan(self, decodes: list[SeqState], chunks: list[tuple[SeqState, int]]):
        works = [SeqWork(s.req_id, (s.last_token_id,), s.num_tokens - 1, tuple(s.block_ids), s.sampling)
                 for s in decodes]
        samples = [True] * len(works)
        for seq, n in chunks:
            start = self._computed[seq.req_id]
            works.append(SeqWork(seq.req_id, tuple(seq.all_token_ids[start:start + n]), start,
                                 tuple(seq.block_ids), seq.sampling))
            samples.append(start + n == seq.num_tokens)
        if not works:
            return None
        if not chunks:
            return StepPlan(StepKind.DECODE, tuple(works))
        if not decodes and all(w.start_pos == 0 for w in works) and all(samples):
            return StepPlan(StepKind.PREFILL, tuple(works))     # whole prompts: the plain packed prefill
        return MixedStepPlan(tuple(works), tuple(samples))

    def _preempt(self, seq: SeqState) -> None:
        self._computed.pop(seq.req_id, None)
        super()._preempt(seq)

    def _finish(self, seq: SeqState, reason) -> None:
        self._computed.pop(seq.req_id, None)
        super()._finish(seq, reason)
