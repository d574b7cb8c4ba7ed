"""What a worker object steps: the `Runner` seam between a scheduler's plan and the model.

`ModelRunner` (one rank) and `ParallelRunner` (rank 0 of a tp x pp instance)
implement it; the workers and the engine's `LLM` see only this.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from engine.sequence import StepPlan, StepResult

if TYPE_CHECKING:   # types only: the chunked scheduler's plan and the cache need torch at run time
    from engine.chunked_scheduler import MixedStepPlan
    from engine.kv_cache import KVCache


class Runner(Protocol):
    block_size: int
    kv_cache: KVCache          # the cache the transfer layer reads and writes (rank 0's canonical one)
    runs_layer_hook: bool      # whether execute(on_layer=) calls the hook after each layer of a prefill

    def execute(self, plan: StepPlan | MixedStepPlan,
                on_layer: Callable[[int], None] | None = None) -> StepResult:
        """Run one step; `on_layer(i)`: in a prefill, once local layer i's KV is stored."""
        ...
