"""Where a model shard sits in a tensor x pipeline parallel instance.

The model is written against this: a rank builds only its heads, MLP columns
and layer range, and the weight loader slices the checkpoint accordingly. With
tp_size = pp_size = 1 (the default) every slice is the whole tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ModelLoadError


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object = None   # a torch.distributed process group when tp_size > 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> range:
        """A contiguous range of layers; earlier stages take the remainder."""
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))

    def split(self, total: int, what: str) -> int:
        """This rank's share of `total` units (heads, MLP columns); must divide evenly."""
        if total % self.tp_size:
            raise ModelLoadError(f"{what}={total} does not divide by tensor-parallel degree {self.tp_size}")
        return total // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results of a row-parallel layer across the tensor-parallel ranks."""
        if self.tp_size > 1:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x
