"""Figures of the serving benchmark, drawn headless (matplotlib's Agg backend).

  * attainment vs rate, one line per mode: joint SLO attainment, and the TTFT
    and TPOT attainments apart (which SLO a mode misses first);
  * TTFT and TPOT distributions (CDFs) of every mode at one rate, with the SLOs.
Input is the `modes` list `cluster.bench.serve` writes into serve.json.
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")   # before pyplot: no display here, and none needed

import matplotlib.pyplot as plt  # noqa: E402

from cluster.bench.serve_metrics import SLO  # noqa: E402

_STYLE = {"disaggregated": ("tab:blue", "o"), "conditional": ("tab:green", "D"), "never": ("tab:purple", "v"),
          "colocated": ("tab:red", "s"), "colocated_chunked": ("tab:orange", "^")}


def _style(label: str, i: int) -> tuple[str, str]:
    return _STYLE.get(label, (f"C{(i + 3) % 10}", "D"))


def plot_attainment(modes: Sequence[dict], target: float, path: str, title: str = "") -> None:
    keys = (("attainment", "both SLOs (joint)"), ("ttft_attainment", "TTFT SLO only"),
            ("tpot_attainment", "TPOT SLO only"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, (key, name) in zip(axes, keys):
        for i, m in enumerate(modes):
            color, marker = _style(m["label"], i)
            pts = sorted(m["points"], key=lambda p: p["rate"])
            label = m["label"] + (f" (goodput {m['goodput']:g})" if key == "attainment" else "")
            ax.plot([p["rate"] for p in pts], [100 * p[key] for p in pts], marker=marker, color=color,
                    label=label)
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment (%)")
    axes[0].legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cdf_rate(modes: Sequence[dict], target: float, requested: float | None = None) -> float:
    """The rate to show distributions at: the one asked for (nearest swept), else the highest
    rate at which the best mode still meets the target (where the modes differ), else the lowest."""
    rates = sorted({p["rate"] for m in modes for p in m["points"]})
    if not rates:
        raise ValueError("no rate points to plot")
    if requested is not None:
        return min(rates, key=lambda r: abs(r - requested))
    best = max((m["goodput"] for m in modes), default=0.0)
    return best if best in rates else rates[0]


def _cdf(ax, values: list[float], color: str, label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) * 100 for i in range(len(xs))], where="post", color=color, label=label)


def plot_latency_cdfs(modes: Sequence[dict], slo: SLO, path: str, title: str = "", rate: float | None = None,
                      target: float = 0.9) -> float:
    """CDFs of TTFT and TPOT per mode at one rate (failed requests are absent: see the counts)."""
    rate = cdf_rate(modes, target, rate)
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(modes):
        point = next((p for p in m["points"] if p["rate"] == rate), None)
        if point is None:
            continue
        ok = [r for r in point["requests"] if r["status"] == "ok"]
        color, _ = _style(m["label"], i)
        label = f"{m['label']} ({len(ok)}/{len(point['requests'])} ok)"
        _cdf(ax_ttft, [r["ttft_s"] for r in ok], color, label)
        _cdf(ax_tpot, [1e3 * r["tpot_s"] for r in ok], color, label)
    ax_ttft.axvline(slo.ttft_s, color="grey", linestyle="--", linewidth=1, label="SLO")
    ax_tpot.axvline(1e3 * slo.tpot_s, color="grey", linestyle="--", linewidth=1, label="SLO")
    ax_ttft.set_xlabel("TTFT (s)")
    ax_tpot.set_xlabel("TPOT (ms)")
    for ax in (ax_ttft, ax_tpot):
        ax.set_ylabel("requests (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title} — latency distributions at {rate:g} req/s" if title else f"at {rate:g} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rate


def plot_measured_vs_simulated(measured: Sequence[dict], simulated: Sequence[dict], target: float, path: str,
                               title: str = "") -> None:
    """Joint attainment vs rate: measured (solid) and the simulator's replay of the same requests (dashed)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, m in enumerate(measured):
        color, marker = _style(m["label"], i)
        pts = sorted(m["points"], key=lambda p: p["rate"])
        ax.plot([p["rate"] for p in pts], [100 * p["attainment"] for p in pts], marker=marker, color=color,
                label=f"{m['label']} measured")
        sim = next((s for s in simulated if s["label"] == m["label"]), None)
        if sim is not None:
            spts = sorted(sim["points"], key=lambda p: p["rate"])
            ax.plot([p["rate"] for p in spts], [100 * p["attainment"] for p in spts], marker=marker,
                    color=color, linestyle="--", alpha=0.7, label=f"{m['label']} simulated")
    ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment, both SLOs (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
