"""What the router saw over the last seconds, for the autoscaler: a request observer.

Arrivals (with their prompt lengths) are counted when admitted; output lengths
and TTFT / TPOT when a request finishes. `observation` cuts the last
`window_s` out of both and adds the pools as the router sees them.
"""
from __future__ import annotations

import math
from collections import deque

from router.autoscale import Observation, PoolObservation
from router.core import RequestObserver


def p90(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(0.9 * len(ordered))) - 1)]


class RequestWindow(RequestObserver):
    def __init__(self, keep_s: float = 600.0) -> None:
        self.keep_s = keep_s
        self._arrived: deque[tuple[float, int]] = deque()                 # (time, prompt tokens)
        self._finished: deque[tuple[float, int, float, float | None]] = deque()   # (time, output, ttft, tpot)

    # -- RequestObserver ---------------------------------------------------------------------
    def admitted(self, st, now: float) -> None:
        self._arrived.append((now, len(st.prompt_ids)))
        self._trim(now)

    def ended(self, st, reason: str, now: float) -> None:
        if st.first_token_at is None or reason in ("cancelled", "error", "abort"):
            return
        n = st.num_output_tokens
        tpot = (st.last_token_at - st.first_token_at) / (n - 1) if n > 1 else None
        self._finished.append((now, n, st.first_token_at - st.arrival, tpot))
        self._trim(now)

    # -- reading ------------------------------------------------------------------------------
    def _trim(self, now: float) -> None:
        for q in (self._arrived, self._finished):
            while q and q[0][0] < now - self.keep_s:
                q.popleft()

    def observation(self, now: float, window_s: float, pools: dict[str, PoolObservation]) -> Observation:
        since = now - window_s
        arrived = [n for t, n in self._arrived if t >= since]
        done = [f for f in self._finished if f[0] >= since]
        return Observation(now=now, window_s=window_s, arrivals=len(arrived), prompt_tokens=tuple(arrived),
                           output_tokens=tuple(f[1] for f in done), ttft_p90_s=p90([f[2] for f in done]),
                           tpot_p90_s=p90([f[3] for f in done if f[3] is not None]), pools=pools)
