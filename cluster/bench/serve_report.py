"""Markdown tables from a `bench serve` result, and the same requests scored against other SLOs.

Every request's latencies are kept in serve.json, so the attainment under a
tighter or looser SLO needs no new run: `rescore` recomputes it, and the SLO
sensitivity table (goodput per mode as the TPOT or TTFT SLO is scaled) shows
how much of a comparison is the SLO choice (DistServe's "SLO scale" plots).
"""
from __future__ import annotations

import dataclasses

from cluster.bench.serve_metrics import SLO, RequestResult, attainment, goodput, goodput_interpolated, percentile

_FIELDS = {f.name for f in dataclasses.fields(RequestResult)}
SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def requests_of(point: dict) -> list[RequestResult]:
    return [RequestResult(**{k: v for k, v in r.items() if k in _FIELDS}) for r in point["requests"]]


def rescore(mode: dict, slo: SLO, target: float) -> tuple[list[tuple[float, float]], float, float]:
    """(rate, attainment) per point, goodput and interpolated goodput of one mode under `slo`."""
    pts = [(p["rate"], attainment(requests_of(p), slo)) for p in mode["points"]]
    return pts, goodput(pts, target), goodput_interpolated(pts, target)


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.0f}"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def goodput_table(result: dict) -> str:
    modes = result["modes"]
    base = next((m for m in modes if m["label"] == "colocated"), None)
    lines = ["| mode | goodput (req/s) | interpolated | vs colocated |", "|---|---|---|---|"]
    for m in modes:
        ratio = "–"
        if base is not None and base["goodput"] > 0:
            ratio = f"{m['goodput'] / base['goodput']:.2f}x"
        elif base is not None and m["goodput"] > 0:
            ratio = "∞ (colocated 0)"
        if m.get("error"):
            lines.append(f"| {m['label']} | failed to run: {m['error']} | – | – |")
            continue
        lines.append(f"| {m['label']} | {m['goodput']:g} | {m['goodput_interpolated']:.2f} | {ratio} |")
    return "\n".join(lines)


def attainment_table(result: dict) -> str:
    """Joint attainment per rate and mode, the TTFT-only / TPOT-only ones in brackets."""
    modes = result["modes"]
    rates = sorted({p["rate"] for m in modes for p in m["points"]})
    lines = ["| rate (req/s) | " + " | ".join(m["label"] for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for rate in rates:
        cells = []
        for m in modes:
            p = next((p for p in m["points"] if p["rate"] == rate), None)
            cells.append("–" if p is None else
                         f"**{p['attainment']:.0%}** ({p['ttft_attainment']:.0%} / {p['tpot_attainment']:.0%})")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(result: dict) -> str:
    """p50 / p90 TTFT (s) and TPOT (ms) per mode and rate, over the requests that finished."""
    lines = ["| mode | rate | ok / sent | TTFT p50 | TTFT p90 | TPOT p50 (ms) | TPOT p90 (ms) | "
             "prefill p50 | queue+transfer p90 |", "|---|---|---|---|---|---|---|---|---|"]
    for m in result["modes"]:
        for p in m["points"]:
            c = p["counts"]
            ph = p["phase_s"]
            qt = _sum_p90(p, ("queue_s", "transfer_s"))
            lines.append(f"| {m['label']} | {p['rate']:g} | {c['ok']} / {p['num_requests'] - c['unsent']} | "
                         f"{_s(p['ttft_s']['p50'])} | {_s(p['ttft_s']['p90'])} | {_ms(p['tpot_s']['p50'])} | "
                         f"{_ms(p['tpot_s']['p90'])} | {_s(ph['prefill_s']['p50'])} | {_s(qt)} |")
    return "\n".join(lines)


def _sum_p90(point: dict, keys: tuple[str, ...]) -> float | None:
    vals = [sum(r["timings"].get(k, 0.0) for k in keys) for r in point["requests"] if r["status"] == "ok"]
    return percentile(vals, 90)


def sensitivity_table(result: dict, scales: tuple[float, ...] = SCALES) -> str:
    """Goodput (interpolated, req/s) per mode when one SLO is scaled and the other kept."""
    slo, target = result["slo"], result["target"]
    modes = result["modes"]
    lines = ["| SLO | " + " | ".join(m["label"] for m in modes) + " |", "|---|" + "---|" * len(modes)]
    for which in ("tpot_s", "ttft_s"):
        for k in scales:
            s = dict(slo)
            s[which] = slo[which] * k
            cells = []
            for m in modes:
                _, g, gi = rescore(m, SLO(s["ttft_s"], s["tpot_s"]), target)
                cells.append(f"{g:g} ({gi:.2f})")
            name = f"TPOT {1e3 * s['tpot_s']:.0f} ms" if which == "tpot_s" else f"TTFT {s['ttft_s']:g} s"
            lines.append(f"| {name} ({k:g}x) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    slo = result["slo"]
    head = (f"### {result['workload']}: TTFT SLO {slo['ttft_s']:g} s, TPOT SLO {1e3 * slo['tpot_s']:.0f} ms, "
            f"target {result['target']:.0%}\n\n{result['num_requests']} requests per rate, seed {result['seed']}, "
            f"burstiness {result['burstiness']:g}; {result['date_utc']}, commit {result['commit']}, load average "
            f"before {result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f}.\n")
    return "\n\n".join([
        head,
        "Goodput (highest swept rate with attainment >= target at it and every lower rate; interpolated: "
        "where the curve crosses the target):\n\n" + goodput_table(result),
        "Attainment per rate, **both SLOs** (TTFT only / TPOT only):\n\n" + attainment_table(result),
        "Latencies (seconds unless noted; finished requests only):\n\n" + latency_table(result),
        "Goodput when one SLO is scaled (same requests, rescored; interpolated in brackets):\n\n"
        + sensitivity_table(result),
    ]) + "\n"
