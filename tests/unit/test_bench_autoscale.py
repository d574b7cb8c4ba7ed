"""`pdcluster bench autoscale`: options, the dispatch to the real-cluster run, the traces, and a
small simulator run end to end (JSON, markdown, plots). No Ray."""
from __future__ import annotations

import csv
import json
import sys
import types

from cluster.bench import autoscale
from cluster.bench.autoscale_traces import BURSTGPT_COLUMNS, bursty_trace, rate_series, step_trace
from cluster.cli import build_parser, main
from router.workload import load_trace


def test_options_reach_the_subcommand_and_the_real_cluster_ones_are_there():
    a = build_parser().parse_args(["bench", "autoscale", "--step-rate", "40", "--window-s", "15", "--policy", "load"])
    assert a.fn is autoscale.main and (a.where, a.step_rate, a.window_s, a.policy) == ("sim", 40.0, 15.0, "load")
    assert a.out == "bench-results/autoscale"
    a = build_parser().parse_args(["bench", "autoscale", "--where", "cluster", "--config", "c.yaml", "--duration-s",
                                   "240", "--low-rate", "0.5", "--high-rate", "1.5"])
    assert (a.where, a.config, a.duration_s, a.low_rate, a.high_rate) == ("cluster", "c.yaml", 240.0, 0.5, 1.5)


def test_where_cluster_runs_the_real_cluster_module(monkeypatch):
    seen = []
    fake = types.ModuleType("cluster.bench.autoscale_cluster")
    fake.main = lambda args: seen.append(args.high_rate) or 0
    monkeypatch.setitem(sys.modules, "cluster.bench.autoscale_cluster", fake)
    assert main(["bench", "autoscale", "--where", "cluster", "--high-rate", "2"]) == 0
    assert seen == [2.0]


def test_the_step_trace_triples_its_rate_in_the_middle_segment():
    t = step_trace(20.0, 60.0, seed=1)
    rates = rate_series(t.requests, t.duration_s, 60.0)
    assert t.duration_s == 180 and t.peak_rate == 60
    assert 50 < rates[1] < 70 and 15 < rates[0] < 25 and 15 < rates[2] < 25
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(t.requests, t.requests[1:]))


def test_the_bursty_trace_is_a_burstgpt_csv_that_load_trace_reads(tmp_path):
    path = tmp_path / "bursty.csv"
    t = bursty_trace(str(path), 10.0, 600.0, burstiness=4.0, seed=3)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == BURSTGPT_COLUMNS and len(rows) - 1 == len(t.requests)
    assert load_trace(str(path)) == t.requests and t.requests[0].arrival_s == 0
    assert t.peak_rate > 1.2 * t.mean_rate                       # the rate swings between segments
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(t.requests, t.requests[1:])]
    mean = sum(gaps) / len(gaps)
    cv2 = sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean ** 2
    assert cv2 > 2                                               # burstier than Poisson (CV^2 = 1)


def test_a_small_simulator_run_writes_the_table_the_plots_and_the_verdict(tmp_path):
    argv = ["bench", "autoscale", "--out", str(tmp_path), "--step-rate", "8", "--step-minutes", "1",
            "--bursty-rate", "8", "--bursty-minutes", "3", "--budget-ranks", "16", "--startup-s", "10",
            "--interval-s", "10", "--window-s", "20", "--horizon-s", "10", "--quiet"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "autoscale.json").read_text())
    assert [t["trace"] for t in record["traces"]] == ["step", "bursty"]
    for tr in record["traces"]:
        by = {c["cluster"]: c for c in tr["clusters"]}
        assert set(by) == {"autoscaled", "static-peak", "static-mean"}
        assert by["static-peak"]["ranks"] >= by["static-mean"]["ranks"]
        assert 0 < by["autoscaled"]["gpu_hours"] and 0 <= by["autoscaled"]["attainment"] <= 1
        assert set(tr["verdict"]) == {"points_below_static_peak", "gpu_hours_vs_static_peak", "met"}
        assert (tmp_path / f"{tr['trace']}.png").stat().st_size > 10_000
    md = (tmp_path / "autoscale.md").read_text()
    assert "| step | static-peak |" in md and "Scaling events, bursty" in md
    assert (tmp_path / "bursty-trace.csv").is_file()
