"""The figure of `pdcluster bench autoscale`, one per trace, drawn headless (matplotlib's Agg backend).

Three panels over the trace's time: the arrival rate; the autoscaled pools (instances holding
GPUs, loading and draining ones included, and those taking work) next to the static-peak and
static-mean pools; the joint SLO attainment of the requests arriving in each window, per cluster.
Input: one trace of the record `cluster.bench.autoscale` writes.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")   # before pyplot: no display here, and none needed

import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {"autoscaled": "tab:blue", "static-peak": "tab:red", "static-mean": "tab:orange"}
_POOLS = {"prefill": "tab:purple", "decode": "tab:green"}


def plot_trace(trace: dict, settings: dict, path: str, bin_s: float) -> None:
    fig, (ax_rate, ax_pool, ax_att) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    minutes = lambda ts: [t / 60 for t in ts]   # noqa: E731
    bins = [(i + 0.5) * bin_s for i in range(len(trace["rate_series"]))]
    ax_rate.step(minutes([i * bin_s for i in range(len(bins))]), trace["rate_series"], where="post",
                 color="black", linewidth=1, label=f"arrivals per {bin_s:g} s")
    ax_rate.axhline(trace["peak_rate"], color=_COLORS["static-peak"], linestyle=":", linewidth=1,
                    label=f"peak {trace['peak_rate']:.0f} req/s")
    ax_rate.axhline(trace["mean_rate"], color=_COLORS["static-mean"], linestyle=":", linewidth=1,
                    label=f"mean {trace['mean_rate']:.0f} req/s")
    ax_rate.set_ylabel("request rate (req/s)")
    ax_rate.legend(loc="upper right", fontsize=8)

    by = {c["cluster"]: c for c in trace["clusters"]}
    auto, grid = by["autoscaled"], minutes(trace["grid_s"])
    for role, color in _POOLS.items():
        ax_pool.step(grid, [h[role] for h in auto["held_over_time"]], where="post", color=color,
                     label=f"autoscaled {role}, holding GPUs")
        ax_pool.step(grid, [r[role] for r in auto["ready_over_time"]], where="post", color=color, linestyle="--",
                     linewidth=1, label=f"autoscaled {role}, taking work")
        for name, style in (("static-peak", ":"), ("static-mean", "-.")):
            ax_pool.axhline(by[name][role], color=color, linestyle=style, linewidth=0.8, alpha=0.7)
    ax_pool.plot([], [], color="grey", linestyle=":", label="static-peak (dotted), static-mean (dash-dot)")
    ax_pool.set_ylabel(f"instances (prefill tp{settings['prefill_tp']}, decode tp{settings['decode_tp']})")
    ax_pool.legend(loc="upper right", fontsize=7)

    for name, c in by.items():
        pts = [(b / 60, 100 * a) for b, a in zip(bins, c["window_attainment"]) if a is not None]
        ax_att.plot([p[0] for p in pts], [p[1] for p in pts], color=_COLORS[name], linewidth=1,
                    label=f"{name}: {c['attainment']:.1%} overall, {c['gpu_hours']:.1f} GPU-h")
    ax_att.set_ylabel(f"SLO attainment per {bin_s:g} s (%)")
    ax_att.set_ylim(-3, 103)
    ax_att.set_xlabel("time (min)")
    ax_att.legend(loc="lower left", fontsize=8)
    for ax in (ax_rate, ax_pool, ax_att):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{trace['trace']} trace: autoscaled ({settings['policy']}) vs static pools, "
                 f"TTFT {settings['ttft_s']:g} s / TPOT {settings['tpot_s']:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
