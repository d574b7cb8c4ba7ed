"""Continuous-batching scheduler of the in-process engine (both phases in one place).

Lifecycle of a request:
  1. `add` puts it in WAITING (FCFS); `add_running` puts a request whose
     KV arrived from a prefill worker straight into RUNNING.
  2. `schedule` prefers prefill: waiting requests are admitted in order while
     the token budget, the sequence limit and the free blocks allow; their
     prompts run together in one packed prefill step -> RUNNING.
  3. Otherwise every RUNNING request gets one decode step. A request whose
     next token needs a block that is not free preempts the newest running
     request (its blocks are freed, it goes back to the front of WAITING and
     is recomputed from prompt + output later).
  4. `update` appends each sampled token and finishes requests on EOS,
     max_tokens or a full context; `finish`/`abort` end one from outside
     (stop strings, client cancel). A finished request holds no block.

Pure: no torch, no threads, no clock (the time is passed in).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import FinishReason, SeqState, SeqStatus, SeqWork, StepKind, StepPlan, StepResult


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64               # running sequences at most
    max_num_batched_tokens: int = 4096   # prompt tokens in one prefill step
    max_model_len: int = 8192            # prompt + output tokens per sequence


def admit_prefill_batch(waiting: deque[SeqState], blocks: BlockManager, max_seqs: int,
                        max_batched_tokens: int, now: float) -> list[SeqState]:
    """Take waiting requests in order while the sequence limit, the token budget and the
    free blocks allow; allocate their blocks and mark them RUNNING. Shared with the
    prefill worker's scheduler."""
    batch: list[SeqState] = []
    num_tokens = 0
    while waiting and len(batch) < max_seqs:
        seq = waiting[0]
        tokens = seq.all_token_ids
        # the budget counts what runs: a prefix found in the prefix cache is not computed again
        n = len(tokens) - len(blocks.cached_prefix(tokens)) * blocks.block_size
        # A prompt over the budget still runs, alone, so that it cannot starve.
        if batch and num_tokens + n > max_batched_tokens:
            break
        if not blocks.can_allocate_cached(len(tokens), tokens):
            break
        waiting.popleft()
        seq.block_ids, seq.num_cached_tokens = blocks.allocate_cached(len(tokens), tokens)
        seq.status = SeqStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = now
        batch.append(seq)
        num_tokens += n
    return batch


def prefill_plan(batch: list[SeqState]) -> StepPlan:
    """One packed prefill step over every token of each sequence (prompt + any output) that
    its cached prefix does not already hold."""
    return StepPlan(StepKind.PREFILL, tuple(
        SeqWork(s.req_id, tuple(s.all_token_ids[s.num_cached_tokens:]), s.num_cached_tokens, tuple(s.block_ids),
                s.sampling) for s in batch))


def cache_computed(blocks: BlockManager, seq: SeqState, work: SeqWork) -> None:
    """After a step: the blocks this step filled become findable in the prefix cache (a prefill,
    or a decode step that completed a block)."""
    if blocks.enable_prefix_caching and (len(work.token_ids) > 1 or work.context_len % blocks.block_size == 0):
        blocks.set_hashes(seq.block_ids, seq.all_token_ids[:work.context_len])


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.blocks = blocks
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self._by_id: dict[str, SeqState] = {}

    # -- admission and removal -------------------------------------------
    def add(self, seq: SeqState) -> None:
        if seq.req_id in self._by_id:
            raise ValueError(f"request id {seq.req_id!r} is already scheduled")
        self._by_id[seq.req_id] = seq
        self.waiting.append(seq)

    def add_running(self, seq: SeqState) -> None:
        """Join a request whose KV is already in its blocks (it was prefilled elsewhere).

        Its cache holds every token but the last sampled one, which the next
        decode step feeds. The caller checked `max_num_seqs` and owns no block
        of it any more.
        """
        if seq.req_id in self._by_id:
            raise ValueError(f"request id {seq.req_id!r} is already scheduled")
        if not seq.output_token_ids or not seq.block_ids:
            raise ValueError(f"request {seq.req_id!r} joins running without a sampled token or blocks")
        seq.status = SeqStatus.RUNNING
        self._by_id[seq.req_id] = seq
        self.running.append(seq)

    @property
    def queued_prompt_tokens(self) -> int:
        """Tokens still to prefill: the waiting requests' prompts (and outputs, if preempted)."""
        return sum(s.num_tokens for s in self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, req_id: str) -> SeqState | None:
        return self._by_id.get(req_id)

    def finish(self, req_id: str, reason: FinishReason) -> SeqState | None:
        """End a request now (stop string, abort); frees its blocks. Unknown ids are ignored."""
        seq = self._by_id.get(req_id)
        if seq is None:
            return None
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, reason)
        return seq

    def abort(self, req_id: str) -> SeqState | None:
        return self.finish(req_id, FinishReason.ABORT)

    # -- the step -------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan | None:
        plan = self._schedule_prefill(now)
        return plan if plan is not None else self._schedule_decode()

    def update(self, plan: StepPlan, result: StepResult) -> list[SeqState]:
        """Record the sampled tokens; return the requests that finished in this step."""
        finished = []
        for work, token_id in zip(plan.seqs, result.token_ids, strict=True):
            seq = self._by_id.get(work.req_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            cache_computed(self.blocks, seq, work)
            seq.output_token_ids.append(token_id)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    # -- internals ------------------------------------------------------------
    def _schedule_prefill(self, now: float) -> StepPlan | None:
        batch = admit_prefill_batch(self.waiting, self.blocks, self.config.max_num_seqs - len(self.running),
                                    self.config.max_num_batched_tokens, now)
        if not batch:
            return None
        self.running.extend(batch)
        return prefill_plan(batch)

    def _schedule_decode(self) -> StepPlan | None:
        scheduled: list[SeqState] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            # The last sampled token is not in the cache yet: it needs a slot.
            while not self.blocks.can_append(len(seq.block_ids), seq.num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq.block_ids, seq.num_tokens)
                scheduled.append(seq)
        if not scheduled:
            return None
        return StepPlan(StepKind.DECODE, tuple(
            SeqWork(s.req_id, (s.last_token_id,), s.num_tokens - 1, tuple(s.block_ids), s.sampling)
            for s in scheduled))

    def _preempt(self, seq: SeqState) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids, seq.num_cached_tokens = [], 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _stop_reason(self, seq: SeqState, token_id: int) -> FinishReason | None:
        if token_id in self.eos_token_ids and not seq.sampling.ignore_eos:
            return FinishReason.EOS
        if len(seq.output_token_ids) >= seq.sampling.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.config.max_model_len:
            return FinishReason.CONTEXT
        return None

    def _finish(self, seq: SeqState, reason: FinishReason) -> None:
        if seq.block_ids:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._by_id[seq.req_id]
