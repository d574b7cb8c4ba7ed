"""SLO attainment over simulated requests, and goodput: the highest rate that keeps it.

Goodput is found by search over the request rate with a fixed seed: the same
requests (same lengths, same arrival pattern) stretched or squeezed in time,
so attainment changes only because the rate does. Expand by doubling/halving
until the target is bracketed, then bisect to a relative tolerance.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from router.planner.profile import PlannerError
from router.planner.simulator import RequestResult
from router.workload import RequestSpec, sample_requests


def attainment(results: Sequence[RequestResult], ttft_slo: float, tpot_slo: float) -> float:
    """The fraction of requests that meet both SLOs (judged jointly, per request)."""
    _check_slo(ttft_slo, "ttft_slo")
    _check_slo(tpot_slo, "tpot_slo")
    if not results:
        raise PlannerError("attainment of no requests is undefined")
    ok = sum(1 for r in results if r.ttft_s <= ttft_slo and r.tpot_s <= tpot_slo)
    return ok / len(results)


def _check_slo(v: float, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise PlannerError(f"{name} must be a positive number of seconds, got {v!r}")


@dataclass(frozen=True)
class Goodput:
    rate: float             # requests/s; 0 when even the lowest rate tried misses the target
    attainment: float       # at that rate
    num_sims: int           # simulations run to find it


def unit_rate_requests(workload, num_requests: int, seed: int = 0, burstiness: float = 1.0,
                       max_total_tokens: int | None = None) -> list[RequestSpec]:
    """Requests at 1 req/s; `at_rate` rescales them to any rate.

    Gamma gaps scale linearly with 1/rate for a fixed random stream, so this is
    exactly what `sample_requests` would give at that rate with the same seed.
    """
    return sample_requests(workload, 1.0, num_requests, seed=seed, burstiness=burstiness,
                           max_total_tokens=max_total_tokens)


def at_rate(unit: Sequence[RequestSpec], rate: float) -> list[RequestSpec]:
    if not (rate > 0 and math.isfinite(rate)):
        raise PlannerError(f"rate must be > 0, got {rate}")
    return [replace(r, arrival_s=r.arrival_s / rate) for r in unit]


def goodput(attain_at: Callable[[float], float], target: float = 0.9, start_rate: float = 1.0,
            rel_tol: float = 0.04, max_sims: int = 30) -> Goodput:
    """The highest rate whose attainment (attain_at(rate)) is >= target, to rel_tol."""
    if not 0 < target <= 1:
        raise PlannerError(f"target attainment must be in (0, 1], got {target}")
    if not (start_rate > 0 and math.isfinite(start_rate)):
        raise PlannerError(f"start_rate must be > 0, got {start_rate}")
    sims = 0

    def probe(rate: float) -> float:
        nonlocal sims
        sims += 1
        return attain_at(rate)

    lo, lo_att, hi = 0.0, 0.0, math.inf
    rate, att = start_rate, probe(start_rate)
    if att >= target:
        lo, lo_att = rate, att
        while hi == math.inf and sims < max_sims:
            rate *= 2
            att = probe(rate)
            if att >= target:
                lo, lo_att = rate, att
            else:
                hi = rate
    else:
        hi = rate
        while lo == 0.0 and sims < max_sims and rate > start_rate * 1e-4:
            rate /= 2
            att = probe(rate)
            if att >= target:
                lo, lo_att = rate, att
            else:
                hi = rate
        if lo == 0.0:
            return Goodput(0.0, att, sims)
    while hi != math.inf and hi / lo > 1 + rel_tol and sims < max_sims:
        mid = math.sqrt(lo * hi)
        att = probe(mid)
        if att >= target:
            lo, lo_att = mid, att
        else:
            hi = mid
    return Goodput(lo, lo_att, sims)
