"""Which instance gets a request: pure functions over live load views.

The router keeps its own exact counters (prompt tokens it sent to a prefill
instance and not yet heard back about, requests it gave a decode instance and
not yet seen finish) and refreshes the rest (free blocks) from the snapshots
the workers send after each step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class InstanceView:
    name: str
    role: str                      # "prefill" | "decode" | "colocated"
    plan: str = "tp1-pp1"
    available: bool = True         # may take new work now: not dead, not out of rotation
    dead: bool = False             # its process is gone (reported by the cluster, from Ray)
    draining: bool = False         # being removed (scaling down): no new work
    first_work_at: float | None = None   # when it was first given work
    transfer_endpoint: str = ""    # a prefill instance's KV sender (the decode side's handshake address)
    queued_tokens: int = 0         # router: prompt tokens sent, prefill not done yet
    active: int = 0                # router: requests in flight on this instance
    free_blocks: int = 0           # worker snapshot
    num_blocks: int = 0            # worker snapshot
    assigned_blocks: int = 0       # router: blocks of decode work sent since the last snapshot
    last_seen: float = 0.0         # time of the last message from the instance
    load: object = None            # the last snapshot (a worker_pb2.Load)
    num_failed: int = 0            # requests it failed (reported a Failed for), since start


def pick_prefill(views: list[InstanceView]) -> InstanceView | None:
    """The live prefill instance with the fewest queued prompt tokens (then the fewest requests)."""
    live = [v for v in views if v.role == "prefill" and v.available]
    return min(live, key=lambda v: (v.queued_tokens, v.active, v.name), default=None)


def pick_decode(views: list[InstanceView], blocks_needed: int,
                held: Callable[[InstanceView], int] | None = None) -> InstanceView | None:
    """The live decode instance with the most free blocks left once it took the request (then
    the smallest batch). `held(v)`: leading blocks of the prompt that `v` holds in its prefix
    cache already (KV-aware routing): they cost it no new block and no transfer.

    Instances that can take the request now come first; if none can, the one
    with the most room still gets it and queues it until blocks free up.
    """
    live = [v for v in views if v.role == "decode" and v.available]

    def left(v: InstanceView) -> int:
        return v.free_blocks - v.assigned_blocks - (blocks_needed - (held(v) if held else 0))

    return max(live, key=lambda v: (left(v) >= 0, left(v), -v.active, v.name), default=None)


def pick_colocated(views: list[InstanceView]) -> InstanceView | None:
    """The live colocated instance with the least load: prompt tokens still to prefill plus
    requests running there (each costs a token of every step), then the fewest requests."""
    live = [v for v in views if v.role == "colocated" and v.available]
    return min(live, key=lambda v: (v.queued_tokens + v.active, v.active, v.name), default=None)
