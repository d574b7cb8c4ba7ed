"""Fault injection for tests: the sender delays, drops, corrupts or truncates replies.

Faults act on what crosses the wire, after the checksum is taken, so that the
receiver's integrity checks and retries are what gets exercised.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FaultSpec:
    delay_s: float = 0.0            # every reply waits this long
    drop_prob: float = 0.0          # a reply is never sent
    corrupt_prob: float = 0.0       # one byte of the payload is flipped
    truncate_prob: float = 0.0      # the payload is cut short ("fail after N bytes")
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop_prob", "corrupt_prob", "truncate_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"faults.{name} must be in [0, 1], got {p}")
        if self.delay_s < 0:
            raise ValueError(f"faults.delay_s must be >= 0, got {self.delay_s}")


class FaultInjector:
    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed)
        self.counts = {"dropped": 0, "corrupted": 0, "truncated": 0}

    def drop(self) -> bool:
        hit = self._rng.random() < self.spec.drop_prob
        self.counts["dropped"] += hit
        return hit

    def mangle(self, payload: list[torch.Tensor]) -> list[torch.Tensor]:
        """Corrupt or truncate the payload (copies; the sender's tensors stay intact)."""
        if self._rng.random() < self.spec.corrupt_prob:
            self.counts["corrupted"] += 1
            first = payload[0].contiguous().clone()
            raw = first.view(torch.uint8).view(-1)
            if raw.numel():
                raw[self._rng.randrange(raw.numel())] ^= 0xFF
            payload = [first, *payload[1:]]
        if self._rng.random() < self.spec.truncate_prob:
            self.counts["truncated"] += 1
            first = payload[0].contiguous().view(-1)
            payload = [first[: first.numel() // 2].clone(), *payload[1:]]
        return payload
