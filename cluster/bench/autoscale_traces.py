"""The traces of `pdcluster bench autoscale`: a rate step and a bursty trace in BurstGPT's layout.

Both are generated here, seeded (nothing is downloaded), from router/workload.py's arrivals and
named length distributions:

  * step: Poisson arrivals at r, then 3r, then r, one segment each;
  * bursty: the rate changes every 1-4 minutes (log-normal around the mean, as BurstGPT's
    request rate swings within an hour) and inside each segment the gaps are Gamma with
    squared CV `burstiness` > 1 (BurstGPT fits its inter-arrival times with Gamma). It is
    written as a CSV in BurstGPT's columns and read back with router.workload.load_trace, so a
    real BurstGPT file can take its place (`--bursty-trace`).
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass

from router.workload import RequestSpec, arrival_times, get_workload, load_trace, sample_requests

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


@dataclass(frozen=True)
class Trace:
    name: str
    requests: list[RequestSpec]
    duration_s: float
    segments: list[tuple[float, float, float]]   # (start s, end s, rate req/s) as generated
    burstiness: float                             # squared CV of the gaps within a segment
    source: str                                   # how it was made, for the report

    @property
    def mean_rate(self) -> float:
        return len(self.requests) / self.duration_s

    @property
    def peak_rate(self) -> float:
        return max(rate for _, _, rate in self.segments)


def step_trace(rate: float, segment_s: float, workload: str = "chatbot", seed: int = 0) -> Trace:
    """r for segment_s, 3r for segment_s, r for segment_s."""
    reqs, segments = [], []
    for k, r in enumerate((rate, 3 * rate, rate)):
        start = k * segment_s
        n = int(r * segment_s * 1.2) + 50          # enough to pass the segment's end; the rest is cut
        part = sample_requests(workload, r, n, seed=seed + 101 * k)
        reqs += [RequestSpec(start + q.arrival_s, q.prompt_tokens, q.output_tokens) for q in part
                 if q.arrival_s < segment_s]
        segments.append((start, start + segment_s, r))
    return Trace("step", reqs, 3 * segment_s, segments, 1.0,
                 f"{workload} lengths, Poisson arrivals at {rate:g} / {3 * rate:g} / {rate:g} req/s, "
                 f"{segment_s / 60:g} min each (seed {seed})")


def bursty_segments(mean_rate: float, duration_s: float, rng: random.Random, sigma: float = 0.6,
                    max_factor: float = 2.5) -> list[tuple[float, float, float]]:
    """Segments of 1-4 minutes whose rates are log-normal around mean_rate (median scaled so the
    mean is mean_rate before clipping), clipped to [mean/4, max_factor x mean]."""
    out, t = [], 0.0
    while t < duration_s:
        length = min(rng.uniform(60.0, 240.0), duration_s - t)
        factor = rng.lognormvariate(-sigma ** 2 / 2, sigma)
        out.append((t, t + length, mean_rate * min(max(factor, 0.25), max_factor)))
        t += length
    return out


def write_bursty_csv(path: str, mean_rate: float, duration_s: float, burstiness: float,
                     workload: str = "chatbot", seed: int = 0) -> list[tuple[float, float, float]]:
    """A synthetic bursty trace in BurstGPT's CSV layout; returns its segments."""
    rng = random.Random(seed)
    lengths = random.Random(seed + 1_000_003)
    wl = get_workload(workload)
    segments = bursty_segments(mean_rate, duration_s, rng)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BURSTGPT_COLUMNS)
        for start, end, rate in segments:
            n = int(rate * (end - start) * 1.5) + 50
            for t in arrival_times(rate, n, rng, burstiness=burstiness):
                if start + t >= end:
                    break
                p, o = wl.prompt.sample(lengths), wl.output.sample(lengths)
                w.writerow([f"{start + t:.6f}", "synthetic", p, o, p + o, "Conversation log"])
    return segments


def bursty_trace(path: str, mean_rate: float, duration_s: float, burstiness: float, workload: str = "chatbot",
                 seed: int = 0) -> Trace:
    """write_bursty_csv, then read back as any BurstGPT file is. load_trace starts the arrivals at
    the first request, so the segments are shifted by the same amount."""
    segments = write_bursty_csv(path, mean_rate, duration_s, burstiness, workload, seed)
    with open(path, newline="") as f:
        first = float(next(csv.DictReader(f))["Timestamp"])
    reqs = load_trace(path)
    shifted = [(max(0.0, s - first), e - first, r) for s, e, r in segments if e > first]
    return Trace("bursty", reqs, shifted[-1][1], shifted, burstiness,
                 f"synthetic, BurstGPT layout ({path}): {workload} lengths, the rate re-drawn every 1-4 min "
                 f"(log-normal, mean {mean_rate:g} req/s), Gamma gaps with CV {math.sqrt(burstiness):g} "
                 f"(seed {seed})")


def rate_series(requests: list[RequestSpec], duration_s: float, bin_s: float) -> list[float]:
    """Arrivals per second in consecutive bins of bin_s."""
    counts = [0] * max(1, math.ceil(duration_s / bin_s))
    for r in requests:
        counts[min(len(counts) - 1, int(r.arrival_s // bin_s))] += 1
    return [c / bin_s for c in counts]
