"""A circuit breaker per instance: one that fails requests again and again leaves rotation.

    closed     serving; consecutive failures are counted, a success resets them
    open       `failures` in a row: no new work for `cooldown_s`
    half-open  after the cooldown one request may go to it as a probe; its success
               closes the breaker, its failure opens it again for another cooldown

Pure: the time is passed in. The router records a failure when an instance
reports a request it could not serve (not when the request itself was bad:
those are refused before dispatch) and a success when a request's phase ends
well there.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Breaker:
    failures: int = 0
    open_until: float | None = None   # set while open or half-open
    probing: bool = False             # half-open and its one probe is out


class CircuitBreakers:
    def __init__(self, failures: int, cooldown_s: float) -> None:
        if failures < 1 or cooldown_s < 0:
            raise ValueError(f"breaker: failures must be >= 1 and cooldown_s >= 0, got {failures}, {cooldown_s}")
        self.failures, self.cooldown_s = failures, cooldown_s
        self._by_name: dict[str, _Breaker] = {}

    def _get(self, name: str) -> _Breaker:
        return self._by_name.setdefault(name, _Breaker())

    def available(self, name: str, now: float) -> bool:
        """May new work go to `name` now (closed, or half-open with no probe out)?"""
        b = self._by_name.get(name)
        if b is None or b.open_until is None:
            return True
        return now >= b.open_until and not b.probing

    def is_open(self, name: str) -> bool:
        """Out of rotation (open, or half-open): for the cluster's status."""
        b = self._by_name.get(name)
        return b is not None and b.open_until is not None

    def dispatched(self, name: str, now: float) -> None:
        """Work went to `name`: if it was half-open, that is its probe."""
        b = self._by_name.get(name)
        if b is not None and b.open_until is not None and now >= b.open_until:
            b.probing = True

    def success(self, name: str) -> None:
        self._by_name.pop(name, None)

    def failure(self, name: str, now: float) -> None:
        b = self._get(name)
        if b.open_until is not None:          # a failed probe (or a late failure): open again
            b.open_until, b.probing = now + self.cooldown_s, False
            return
        b.failures += 1
        if b.failures >= self.failures:
            b.open_until = now + self.cooldown_s

    def forget(self, name: str) -> None:
        self._by_name.pop(name, None)
