"""FCFS prefill batching under a token budget. Pure: no torch, no clock (time is passed in).

A request waits until its prompt's blocks are free; `schedule` takes waiting
requests in arrival order while the token budget and the sequence limit
allow (a prompt over the budget runs alone, so it cannot starve), allocates
their blocks and hands them out as one packed prefill step. From then on the
worker owns those blocks: it frees them or puts them under a transfer lease.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import SeqStatus, Sequence, SeqWork, StepPlan


@dataclass(frozen=True)
class PrefillSchedulerConfig:
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 64               # prompts in one step


class PrefillScheduler:
    def __init__(self, config: PrefillSchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self._queued_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._queued_tokens += seq.num_tokens

    def abort(self, req_id: str) -> Sequence | None:
        """Drop a waiting request (it holds no block); None when it is not waiting."""
        for seq in self.waiting:
            if seq.req_id == req_id:
                self.waiting.remove(seq)
                self._queued_tokens -= seq.num_tokens
                return seq
        return None

    @property
    def queued_prompt_tokens(self) -> int:
        return self._queued_tokens

    def schedule(self, now: float) -> tuple[StepPlan, list[Sequence]] | None:
        batch: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(batch) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if batch and num_tokens + n > self.config.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(n):
                break
            self.waiting.popleft()
            self._queued_tokens -= n
            seq.block_ids = self.blocks.allocate(n, seq.all_token_ids)
            seq.status = SeqStatus.RUNNING
            seq.first_scheduled_time = now
            batch.append(seq)
            num_tokens += n
        if not batch:
            return None
        plan = StepPlan(True, tuple(
            SeqWork(s.req_id, tuple(s.all_token_ids), 0, tuple(s.block_ids), s.sampling, 0) for s in batch))
        return plan, batch
