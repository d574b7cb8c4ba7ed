"""Reused buffers for the sender to pack into.

A fresh multi-MB tensor per transfer costs more in page faults than the packing
itself. zmq sends frames without copying, so a buffer stays lent to its
transfer until the lease ends *and* zmq reports the send finished; only then
does it return to the pool.
"""
from __future__ import annotations

import torch


class StagingPool:
    def __init__(self, max_free: int = 4) -> None:
        self.max_free = max_free
        self._free: list[torch.Tensor] = []
        self._lent: dict[str, torch.Tensor] = {}
        self._draining: list[tuple[torch.Tensor, list]] = []   # (buffer, zmq MessageTrackers)
        self._trackers: dict[str, list] = {}

    def take(self, tid: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A [shape] view for transfer `tid`; a retry of the same transfer gets its own buffer
        back (the bytes it packs are the same, so an unfinished send is not disturbed)."""
        numel = torch.Size(shape).numel()
        nbytes = max(1, numel * dtype.itemsize)
        buf = self._lent.get(tid)
        if buf is None or buf.numel() < nbytes:
            self._reclaim()
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            # by index: list.remove would compare tensors elementwise
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits \
                else torch.empty(nbytes, dtype=torch.uint8)
            self._lent[tid] = buf
        return buf[:nbytes].view(dtype)[:numel].view(shape)

    def sending(self, tid: str, tracker) -> None:
        """zmq is sending from tid's buffer until `tracker.done` (a streamed transfer sends
        each layer from its own slice: every tracker must be done)."""
        trackers = [t for t in self._trackers.get(tid, []) if not t.done]
        self._trackers[tid] = [*trackers, tracker]

    def give_back(self, tid: str) -> None:
        buf = self._lent.pop(tid, None)
        trackers = self._trackers.pop(tid, [])
        if buf is not None:
            self._draining.append((buf, trackers))
        self._reclaim()

    def _reclaim(self) -> None:
        still = []
        for buf, trackers in self._draining:
            if all(t.done for t in trackers):
                self._free.append(buf)
            else:
                still.append((buf, trackers))
        self._draining = still
        while len(self._free) > self.max_free:
            self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))
