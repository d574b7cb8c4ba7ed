"""One request's state inside a worker, and the plain records of a step.

`StepPlan` and `StepResult` are what crosses the line between a scheduler and
a model runner: frozen, plain data, no tensors.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.sampling_params import SamplingParams


class StepKind(enum.Enum):
    """What one forward pass computes."""

    PREFILL = "prefill"    # whole prompts, packed
    DECODE = "decode"      # one new token per sequence over its cached context
    MIXED = "mixed"        # chunked prefill: decode rows and prompt chunks in one pass


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"      # max_tokens reached
    STOP = "stop"          # a stop string matched
    CONTEXT = "context"    # the model's context is full
    ABORT = "abort"


class SeqState:
    """Mutable per-request state, owned by exactly one scheduler."""

    def __init__(self, req_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 arrival_time: float = 0.0) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling = sampling
        self.arrival_time = arrival_time
        self.block_ids: list[int] = []
        self.num_cached_tokens = 0      # its prefix found in the prefix cache at admission (not computed)
        self.status = SeqStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"SeqState({self.req_id!r}, {self.status.value}, prompt={len(self.prompt_token_ids)}, "
                f"out={len(self.output_token_ids)}, blocks={len(self.block_ids)})")


@dataclass(frozen=True)
class SeqWork:
    """What the runner must compute for one sequence in one step."""

    req_id: str
    token_ids: tuple[int, ...]   # prefill: every token to run; decode: the last token
    start_pos: int               # position of token_ids[0] in the sequence
    block_ids: tuple[int, ...]   # the sequence's whole block table
    sampling: SamplingParams

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once this step has stored its own: also the position of the
        token sampled from this row (a seeded request's draw is keyed by it)."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    kind: StepKind               # PREFILL or DECODE (MIXED plans are engine.chunked_scheduler's)
    seqs: tuple[SeqWork, ...]

    @property
    def is_prefill(self) -> bool:
        return self.kind is StepKind.PREFILL

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class StepResult:
    token_ids: tuple[int, ...]   # one sampled token per SeqWork, in plan order
