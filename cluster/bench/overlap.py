"""`pdcluster bench overlap`: how much a request's TPOT grows while a prefill runs (the split
quoted in docs/results.md), from a serve.json of `pdcluster bench serve` or `bench results`.

    pdcluster bench overlap docs/results/summarization/serve.json

For every finished request, its decode window is first token -> last token.
The prefill-busy intervals are [first token - prefill_s, first token] of every
request of the same rate point (for the colocated modes they mix both
instances: an upper bound on the overlap). The median TPOT of requests whose
window was < 20% covered is printed next to that of requests >= 50% covered.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cluster.bench.serve_metrics import BenchError

DEFAULT_SERVE_JSON = "docs/results/summarization/serve.json"


def coverage(window: tuple[float, float], busy: list[tuple[float, float]]) -> float:
    a, b = window
    if b <= a:
        return 0.0
    return min(1.0, sum(max(0.0, min(b, e) - max(a, s)) for s, e in busy) / (b - a))


def split(mode: dict) -> tuple[list[float], list[float]]:
    """(TPOTs of requests whose decode window a prefill covered < 20%, those covered >= 50%)."""
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


def _median_ms(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):.0f} ms (n={len(xs)})" if xs else "-"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("serve_json", nargs="?", default=DEFAULT_SERVE_JSON, metavar="SERVE_JSON",
                   help="a serve.json (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    path = Path(args.serve_json)
    try:
        modes = json.loads(path.read_text())["modes"]
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"cannot read the modes of {path}: {type(e).__name__}: {e}") from None
    for mode in modes:
        idle, busy = split(mode)
        print(f"{mode['label']:>18}: TPOT median, prefill busy < 20% of the decode window: {_median_ms(idle)}; "
              f">= 50%: {_median_ms(busy)}")
    return 0
