"""Where a model shard sits in a tensor x pipeline parallel instance.

The model is written against this: a rank builds only its heads, MLP columns
and layer range, and the weight loader slices the checkpoint accordingly. With
tp_size = pp_size = 1 (the default) every slice is the whole tensor.

Uneven splits. One rule splits everything, `split_range`: `total` units over
`size` ranks, the first `total % size` ranks take one more. It is applied to
  - layers over pipeline stages (30 layers, pp 4 -> 8 / 8 / 7 / 7);
  - KV heads over tensor-parallel ranks (3 KV heads, tp 2 -> 2 / 1);
  - query heads by KV group: each KV head keeps its whole group of
    num_heads / num_kv_heads query heads on the same rank (9 q / 3 kv, tp 2 ->
    q heads 6 / 3), so grouped-query attention stays local to a rank;
  - MLP columns (1536, tp 2 -> 768 / 768; odd counts split one apart).
A rank with nothing to hold (tp_size > num_kv_heads, pp_size > num_layers) is
a configuration error. The KV transfer layer (`kv_transfer.layout`) imports
the same function, so a rank's cache and its transfer layout always agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError


class ParallelPlanError(ConfigError):
    """A (tp, pp) plan that cannot shard this model (a rank would hold nothing)."""


def split_range(total: int, rank: int, size: int, what: str = "units") -> range:
    """Rank `rank`'s contiguous share of `total` units over `size` ranks; earlier ranks take the remainder."""
    if not 0 <= rank < size:
        raise ParallelPlanError(f"rank {rank} is outside {what} size {size}")
    base, extra = divmod(total, size)
    if base == 0:
        raise ParallelPlanError(f"{what}: {total} cannot be split over {size} ranks (a rank would hold none)")
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def kv_head_range(num_kv_heads: int, tp_rank: int, tp_size: int) -> range:
    """The KV heads a tensor-parallel rank holds (its KV cache share)."""
    return split_range(num_kv_heads, tp_rank, tp_size, "num_key_value_heads over tp_size")


def q_head_range(num_heads: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> range:
    """The query heads of this rank: the whole groups of its KV heads."""
    if num_heads % num_kv_heads:
        raise ParallelPlanError(f"num_attention_heads={num_heads} is not a multiple of "
                                f"num_key_value_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    kv = kv_head_range(num_kv_heads, tp_rank, tp_size)
    return range(kv.start * group, kv.stop * group)


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
        return split_range(num_layers, self.pp_rank, self.pp_size, "num_hidden_layers over pp_size")

    def kv_heads(self, num_kv_heads: int) -> range:
        return kv_head_range(num_kv_heads, self.tp_rank, self.tp_size)

    def q_heads(self, num_heads: int, num_kv_heads: int) -> range:
        return q_head_range(num_heads, num_kv_heads, self.tp_rank, self.tp_size)

    def columns(self, total: int, what: str) -> range:
        """This rank's share of `total` columns (MLP), possibly one more than a later rank's."""
        return split_range(total, self.tp_rank, self.tp_size, f"{what} over tp_size")

    def split(self, total: int, what: str) -> int:
        """How many of `total` units (KV heads, MLP columns) this rank holds."""
        return len(self.columns(total, what))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results of a row-parallel layer across the tensor-parallel ranks."""
        if self.tp_size > 1:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x
