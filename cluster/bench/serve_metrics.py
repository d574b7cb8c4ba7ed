"""The serving benchmark's arithmetic: per-request latencies, percentiles, SLO attainment, goodput.

Pure (no clocks, no gRPC): the load generator records times, this turns them
into the figures `docs/results.md` reports, and the unit tests check it by hand.

Definitions (DistServe's):
  * TTFT: from the request's *scheduled* arrival to its first token, so a load
    generator that falls behind its schedule is charged, not hidden;
  * TPOT: (e2e - TTFT) / (n_out - 1), the mean gap between later tokens;
  * a request attains the SLO when it succeeded and both TTFT <= ttft_slo and
    TPOT <= tpot_slo; a failed, cancelled or never-sent request misses it;
  * attainment: the fraction of a rate point's requests that attain it;
  * goodput: the highest swept rate with attainment >= target at it and at
    every lower swept rate (a dip below the target ends the run of passes).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)

# A request's outcome: it finished, the server or transport failed it, the run's
# time limit cancelled it in flight, or the limit came before its arrival time.
OK, FAILED, CANCELLED, UNSENT = "ok", "failed", "cancelled", "unsent"


class BenchError(ValueError):
    """A benchmark parameter that cannot be used (the message names it)."""


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise BenchError(f"{name.replace('_s', '')} SLO must be a positive number of seconds, got {v!r}")


@dataclass
class RequestResult:
    index: int
    arrival_s: float                  # scheduled, seconds after the rate point's start
    prompt_tokens: int
    output_tokens: int                # asked for (max_tokens, EOS ignored)
    status: str = UNSENT
    n_out: int = 0                    # tokens received
    ttft_s: float | None = None
    e2e_s: float | None = None
    send_lag_s: float | None = None   # how late the generator sent it (should be ~0)
    finish_reason: str = ""
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)   # the server's phase timings
    prefill_instance: str = ""
    decode_instance: str = ""

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.n_out) if self.status == OK else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d


def tpot(e2e_s: float | None, ttft_s: float | None, n_out: int) -> float | None:
    """Mean time per output token after the first; 0 for a one-token answer (no gap to miss)."""
    if e2e_s is None or ttft_s is None or n_out < 1:
        return None
    if n_out == 1:
        return 0.0
    return (e2e_s - ttft_s) / (n_out - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise BenchError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def attains(r: RequestResult, slo: SLO) -> bool:
    t = r.tpot_s
    return r.status == OK and r.ttft_s is not None and t is not None and r.ttft_s <= slo.ttft_s and t <= slo.tpot_s


def attainment(results: Sequence[RequestResult], slo: SLO) -> float:
    """Fraction of requests meeting both SLOs; every request counts, failed ones as misses."""
    if not results:
        return 0.0
    return sum(attains(r, slo) for r in results) / len(results)


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in PERCENTILES} | {
        "mean": sum(values) / len(values) if values else None}


def summarize(results: Sequence[RequestResult], slo: SLO, rate: float, duration_s: float) -> dict:
    """One rate point: counts by outcome, attainment (joint and per SLO), latency percentiles."""
    ok = [r for r in results if r.status == OK]
    ttfts = [r.ttft_s for r in ok]
    tpots = [r.tpot_s for r in ok]
    n = len(results)
    by_status = {s: sum(r.status == s for r in results) for s in (OK, FAILED, CANCELLED, UNSENT)}
    phase = {}
    for key in ("queue_s", "prefill_s", "transfer_s", "decode_s"):
        vals = [r.timings[key] for r in ok if key in r.timings]
        phase[key] = _pcts(vals)
    return {
        "rate": rate,
        "num_requests": n,
        "counts": by_status,
        "attainment": attainment(results, slo),
        "ttft_attainment": sum(r.status == OK and r.ttft_s <= slo.ttft_s for r in results) / n if n else 0.0,
        "tpot_attainment": sum(r.status == OK and r.tpot_s <= slo.tpot_s for r in results) / n if n else 0.0,
        "ttft_s": _pcts(ttfts),
        "tpot_s": _pcts(tpots),
        "e2e_s": _pcts([r.e2e_s for r in ok]),
        "phase_s": phase,
        "max_send_lag_s": max((r.send_lag_s for r in results if r.send_lag_s is not None), default=None),
        "duration_s": duration_s,
        "output_tokens_per_s": sum(r.n_out for r in ok) / duration_s if duration_s > 0 else 0.0,
    }


def goodput(points: Iterable[tuple[float, float]], target: float = 0.9) -> float:
    """Highest rate whose attainment, and that of every lower rate, is >= target; 0 if none.

    `points` are (rate, attainment) pairs in any order.
    """
    _check_target(target)
    best = 0.0
    for rate, att in sorted(points):
        if att < target:
            break
        best = rate
    return best


def goodput_interpolated(points: Iterable[tuple[float, float]], target: float = 0.9) -> float:
    """Goodput with the crossing interpolated linearly between the last pass and the first miss."""
    _check_target(target)
    pts = sorted(points)
    prev = None
    for rate, att in pts:
        if att < target:
            if prev is None:
                return 0.0
            (r0, a0), (r1, a1) = prev, (rate, att)
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1) if a0 != a1 else r0
        prev = (rate, att)
    return prev[0] if prev else 0.0


def next_bisection_rate(points: Iterable[tuple[float, float]], target: float = 0.9,
                        min_gap: float = 0.0) -> float | None:
    """Midway between the last passing and the first failing rate; None when there is no such gap
    (all pass, the lowest fails) or it is already narrower than `min_gap`."""
    _check_target(target)
    pts = sorted(points)
    last_pass = None
    for rate, att in pts:
        if att < target:
            if last_pass is None or rate - last_pass <= min_gap:
                return None
            return (last_pass + rate) / 2
        last_pass = rate
    return None


def _check_target(target: float) -> None:
    if not (0 < target <= 1):
        raise BenchError(f"attainment target must be in (0, 1], got {target}")
