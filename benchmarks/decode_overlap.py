"""How much a request's TPOT grows while a prefill runs: the split quoted in docs/results.md.

    .venv/bin/python benchmarks/decode_overlap.py docs/results/summarization/serve.json

For every finished request, its decode window is first token -> last token.
The prefill-busy intervals are [first token - prefill_s, first token] of every
request of the same rate point (for the colocated modes they mix both
instances: an upper bound on the overlap). The median TPOT of requests whose
window was < 20% covered is printed next to that of requests >= 50% covered.
"""
from __future__ import annotations

import json
import statistics
import sys


def coverage(window: tuple[float, float], busy: list[tuple[float, float]]) -> float:
    a, b = window
    if b <= a:
        return 0.0
    return min(1.0, sum(max(0.0, min(b, e) - max(a, s)) for s, e in busy) / (b - a))


def split(mode: dict) -> tuple[list[float], list[float]]:
    idle, busy_tpots = [], []
    for point in mode["points"]:
        ok = [r for r in point["requests"] if r["status"] == "ok"]
        busy = sorted({(r["arrival_s"] + r["ttft_s"] - r["timings"]["prefill_s"], r["arrival_s"] + r["ttft_s"])
                       for r in ok})
        for r in ok:
            c = coverage((r["arrival_s"] + r["ttft_s"], r["arrival_s"] + r["e2e_s"]), busy)
            if c < 0.2:
                idle.append(r["tpot_s"])
            elif c >= 0.5:
                busy_tpots.append(r["tpot_s"])
    return idle, busy_tpots


def main(path: str) -> None:
    for mode in json.load(open(path))["modes"]:
        idle, busy = split(mode)
        med = lambda xs: f"{1e3 * statistics.median(xs):.0f} ms (n={len(xs)})" if xs else "-"  # noqa: E731
        print(f"{mode['label']:>18}: TPOT median, prefill busy < 20% of the decode window: {med(idle)}; "
              f">= 50%: {med(busy)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/summarization/serve.json")
