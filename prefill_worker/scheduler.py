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
from engine.scheduler import admit_prefill_batch, prefill_plan
from engine.sequence import SeqState, StepPlan


@dataclass(frozen=True)
class PrefillSchedulerConfig:
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 64               # prompts in one step


class PrefillScheduler:
    def __init__(self, config: PrefillSchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[SeqState] = deque()
        self._queued_tokens = 0

    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)
        self._queued_tokens += seq.num_tokens

    def abort(self, req_id: str) -> SeqState | None:
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

    def schedule(self, now: float) -> tuple[StepPlan, list[SeqState]] | None:
        batch = admit_prefill_batch(self.waiting, self.blocks, self.config.max_num_seqs,
                                    self.config.max_num_batched_tokens, now)
        if not batch:
            return None
        self._queued_tokens -= sum(s.num_tokens for s in batch)
        return prefill_plan(batch), batch
