"""Ownership of KV blocks on the prefill side, from the end of prefill to hand-off.

Pure Python (no torch, threads, clocks or I/O): every call takes `now`. The
table sits next to a `BlockManager` but never touches it: an ended lease comes
back as a `LeaseEnd`, and the caller frees its `block_ids` and reports its
outcome. Each live lease is ended exactly once, so its blocks are handed back
exactly once; an ended lease is forgotten, so later calls about it get None.

Lifecycle of one lease (one transfer of one request's KV blocks):

1. `offer(now)` -> OFFERED: prefill is done; the blocks are held until
   `now + ttl`. No receiver yet.
2. `start(now)` OFFERED -> IN_FLIGHT: a decode worker begins pulling. Only one
   receiver per lease, and only before the deadline; otherwise `start` says
   False and the receiver must fail its pull. The deadline is *not* extended:
   the TTL bounds the whole hold, so a stalled pull cannot pin blocks forever.
   `progress(now, bytes_done)` records bytes for stats and extends nothing.
3. Terminal outcomes, each of which returns one `LeaseEnd`:
   - `complete` -> DONE     (from OFFERED too: a push backend may skip `start`),
   - `fail`     -> FAILED   (the receiver or the transport gave up),
   - `abort` / `abort_request` -> ABORTED (client cancel, worker shutdown),
   - `expire(now)` -> EXPIRED for every live lease with deadline <= now,
     whether OFFERED or IN_FLIGHT.
4. The ended lease is dropped from the table. A late `complete`/`fail`/`abort`
   (e.g. after expiry) returns None: never a second free.

The deadline is enforced by `expire` (call it every step, or at
`next_deadline()`) and by `start`. An outcome reported after the deadline but
before `expire` ran still wins: the blocks were never freed, so what the
receiver read is intact.

Transfer ids must be unique for the lifetime of the table (e.g. a uuid per
transfer): duplicates are detected only among live leases, since ended ones
are forgotten.
"""
from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


class LeaseState(enum.Enum):
    OFFERED = "offered"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self not in (LeaseState.OFFERED, LeaseState.IN_FLIGHT)


@dataclass(frozen=True)
class LeaseEnd:
    """An ended lease: the caller frees `block_ids` and reports `outcome`."""

    transfer_id: Hashable
    req_id: Hashable
    block_ids: tuple[int, ...]
    outcome: LeaseState
    reason: str


@dataclass(frozen=True)
class LeaseView:
    """A snapshot of one live lease (what `get` returns)."""

    transfer_id: Hashable
    req_id: Hashable
    block_ids: tuple[int, ...]
    state: LeaseState
    offered_at: float
    deadline: float
    started_at: float | None
    bytes_done: int


@dataclass(frozen=True)
class LeaseStats:
    """Counters since the table was made, plus what is held now."""

    num_offered: int
    num_started: int
    num_done: int
    num_failed: int
    num_aborted: int
    num_expired: int
    num_live: int
    num_held_blocks: int
    bytes_done: int  # sum of the last `bytes_done` of every lease, live or ended

    def by_outcome(self) -> dict[LeaseState, int]:
        return {
            LeaseState.DONE: self.num_done,
            LeaseState.FAILED: self.num_failed,
            LeaseState.ABORTED: self.num_aborted,
            LeaseState.EXPIRED: self.num_expired,
        }


class _Lease:
    __slots__ = ("transfer_id", "req_id", "block_ids", "state", "offered_at",
                 "deadline", "started_at", "bytes_done", "seq")

    def __init__(self, transfer_id: Hashable, req_id: Hashable, block_ids: tuple[int, ...],
                 now: float, deadline: float, seq: int) -> None:
        self.transfer_id = transfer_id
        self.req_id = req_id
        self.block_ids = block_ids
        self.state = LeaseState.OFFERED
        self.offered_at = now
        self.deadline = deadline
        self.started_at: float | None = None
        self.bytes_done = 0
        self.seq = seq  # tells this lease apart from a stale heap entry of a reused id


def _check_ttl(ttl_s: float, name: str) -> float:
    ttl_s = float(ttl_s)
    # `not >` also rejects NaN; an infinite TTL would hold blocks forever.
    if not ttl_s > 0 or math.isinf(ttl_s):
        raise ValueError(f"{name} must be a finite number > 0, got {ttl_s}")
    return ttl_s


class LeaseTable:
    # Stale heap entries (ended before their deadline) are dropped lazily; the heap
    # is rebuilt when they outnumber live leases, so memory stays O(live).
    _COMPACT_SLACK = 64

    def __init__(self, default_ttl_s: float = 30.0) -> None:
        self.default_ttl_s = _check_ttl(default_ttl_s, "default_ttl_s")
        self._leases: dict[Hashable, _Lease] = {}
        self._by_req: dict[Hashable, dict[Hashable, None]] = {}  # ordered set, offer order
        self._holders: dict[int, int] = {}   # block_id -> live leases over it (a cached prefix is shared)
        self._heap: list[tuple[float, int, Hashable]] = []      # (deadline, seq, transfer_id)
        self._seq = 0
        self._counts = {state: 0 for state in LeaseState}       # OFFERED/IN_FLIGHT: ever entered
        self._bytes_ended = 0

    # -- queries -------------------------------------------------------------
    def live(self) -> int:
        return len(self._leases)

    def held_blocks(self) -> int:
        """Distinct blocks under at least one live lease."""
        return len(self._holders)

    def holds(self, block_id: int) -> bool:
        """Whether a live lease still holds this block."""
        return block_id in self._holders

    def get(self, transfer_id: Hashable) -> LeaseView | None:
        lease = self._leases.get(transfer_id)
        if lease is None:
            return None
        return LeaseView(lease.transfer_id, lease.req_id, lease.block_ids, lease.state,
                         lease.offered_at, lease.deadline, lease.started_at, lease.bytes_done)

    def next_deadline(self) -> float | None:
        """The earliest deadline among live leases (when `expire` next has work)."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def stats(self) -> LeaseStats:
        c = self._counts
        live_bytes = sum(lease.bytes_done for lease in self._leases.values())
        return LeaseStats(
            num_offered=c[LeaseState.OFFERED], num_started=c[LeaseState.IN_FLIGHT],
            num_done=c[LeaseState.DONE], num_failed=c[LeaseState.FAILED],
            num_aborted=c[LeaseState.ABORTED], num_expired=c[LeaseState.EXPIRED],
            num_live=len(self._leases), num_held_blocks=len(self._holders),
            bytes_done=self._bytes_ended + live_bytes,
        )

    # -- beginning -------------------------------------------------------------
    def offer(self, transfer_id: Hashable, req_id: Hashable, block_ids: Sequence[int],
              now: float, ttl_s: float | None = None) -> None:
        """Hold `block_ids` for `transfer_id` until `now + ttl_s` (default TTL if None).

        A block may be under several live leases at once: prompts over one cached prefix
        share its blocks (prefix caching), each lease holding its own reference, which the
        caller frees when that lease ends. Raises ValueError, changing nothing, on a live
        duplicate `transfer_id`, on a block listed twice, or on a bad TTL.
        """
        ttl = self.default_ttl_s if ttl_s is None else _check_ttl(ttl_s, "ttl_s")
        if transfer_id in self._leases:
            raise ValueError(f"transfer {transfer_id!r} already has a live lease")
        blocks = tuple(block_ids)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"transfer {transfer_id!r} lists a block twice: {blocks}")
        self._seq += 1
        lease = _Lease(transfer_id, req_id, blocks, now, now + ttl, self._seq)
        self._leases[transfer_id] = lease
        self._by_req.setdefault(req_id, {})[transfer_id] = None
        for b in blocks:
            self._holders[b] = self._holders.get(b, 0) + 1
        heapq.heappush(self._heap, (lease.deadline, lease.seq, transfer_id))
        self._counts[LeaseState.OFFERED] += 1

    def start(self, transfer_id: Hashable, now: float) -> bool:
        """A receiver begins pulling. False, changing nothing, if the lease is unknown,
        ended, already started by another receiver, or past its deadline."""
        lease = self._leases.get(transfer_id)
        if lease is None or lease.state is not LeaseState.OFFERED or now >= lease.deadline:
            return False
        lease.state = LeaseState.IN_FLIGHT
        lease.started_at = now
        self._counts[LeaseState.IN_FLIGHT] += 1
        return True

    def progress(self, transfer_id: Hashable, now: float, bytes_done: int) -> bool:
        """Record the bytes pulled so far (cumulative; stats only, the deadline stays).

        False if the lease is unknown, ended, or not started."""
        if bytes_done < 0:
            raise ValueError(f"bytes_done must be >= 0, got {bytes_done}")
        lease = self._leases.get(transfer_id)
        if lease is None or lease.state is not LeaseState.IN_FLIGHT:
            return False
        lease.bytes_done = max(lease.bytes_done, int(bytes_done))  # a late, smaller report is stale
        return True

    # -- ending ------------------------------------------------------------------
    def complete(self, transfer_id: Hashable, now: float) -> LeaseEnd | None:
        return self._end(transfer_id, LeaseState.DONE, "done")

    def fail(self, transfer_id: Hashable, now: float, reason: str) -> LeaseEnd | None:
        return self._end(transfer_id, LeaseState.FAILED, reason)

    def abort(self, transfer_id: Hashable, now: float, reason: str = "aborted") -> LeaseEnd | None:
        return self._end(transfer_id, LeaseState.ABORTED, reason)

    def abort_request(self, req_id: Hashable, now: float,
                      reason: str = "request cancelled") -> list[LeaseEnd]:
        """End every live lease of `req_id`, in offer order."""
        transfer_ids = list(self._by_req.get(req_id, ()))
        return [self._end(t, LeaseState.ABORTED, reason) for t in transfer_ids]

    def expire(self, now: float) -> list[LeaseEnd]:
        """End every live lease whose deadline is <= now, earliest deadline first."""
        ended: list[LeaseEnd] = []
        while True:
            self._drop_stale_top()
            if not self._heap or self._heap[0][0] > now:
                return ended
            _, _, transfer_id = heapq.heappop(self._heap)
            lease = self._leases[transfer_id]
            reason = f"lease expired while {lease.state.value} (ttl {lease.deadline - lease.offered_at:g}s)"
            ended.append(self._end(transfer_id, LeaseState.EXPIRED, reason))

    # -- internals -----------------------------------------------------------------
    def _end(self, transfer_id: Hashable, outcome: LeaseState, reason: str) -> LeaseEnd | None:
        lease = self._leases.pop(transfer_id, None)
        if lease is None:
            return None
        for b in lease.block_ids:
            if self._holders[b] == 1:
                del self._holders[b]
            else:
                self._holders[b] -= 1
        siblings = self._by_req[lease.req_id]
        del siblings[transfer_id]
        if not siblings:
            del self._by_req[lease.req_id]
        self._counts[outcome] += 1
        self._bytes_ended += lease.bytes_done
        if len(self._heap) > 2 * len(self._leases) + self._COMPACT_SLACK:
            self._compact()
        return LeaseEnd(transfer_id, lease.req_id, lease.block_ids, outcome, reason)

    def _is_live_entry(self, entry: tuple[float, int, Hashable]) -> bool:
        lease = self._leases.get(entry[2])
        return lease is not None and lease.seq == entry[1]

    def _drop_stale_top(self) -> None:
        while self._heap and not self._is_live_entry(self._heap[0]):
            heapq.heappop(self._heap)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._is_live_entry(e)]
        heapq.heapify(self._heap)
