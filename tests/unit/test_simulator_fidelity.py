"""cluster/bench/fidelity.py (`pdcluster bench fidelity`): the pure parts (worker busy time from cluster state, the
calibration factors, which measured rates are judged) and the analysis on recorded figures."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.bench.fidelity import (SimulatedCluster, analyse, busy_by_role, busy_delta, calibration_factors,
                                    fit_calibration, judged_rates, markdown)
from cluster.bench.serve import SweepSpec
from cluster.bench.serve_metrics import SLO
from router.planner.profile import calibrated, load_profile

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PROFILE = ROOT / "router/planner/profiles/smollm2-135m-cpu.json"


def _state(*insts):
    return SimpleNamespace(instances=[SimpleNamespace(role=r, num_steps=n, mean_step_s=m) for r, n, m in insts])


def test_busy_time_sums_the_instances_of_each_role_and_differences_two_snapshots():
    before = busy_by_role(_state(("prefill", 2, 0.5), ("decode", 10, 0.1), ("decode", 0, 0.0)))
    after = busy_by_role(_state(("prefill", 6, 0.5), ("decode", 30, 0.1), ("decode", 10, 0.2)))
    d = busy_delta(before, after)
    assert d["prefill"] == {"steps": 4, "busy_s": pytest.approx(2.0)}
    assert d["decode"] == {"steps": 30, "busy_s": pytest.approx(4.0)}


def test_calibration_factor_is_measured_over_simulated_and_one_where_nothing_ran():
    measured = {"prefill": {"steps": 3, "busy_s": 3.0}, "decode": {"steps": 0, "busy_s": 0.0}}
    assert calibration_factors(measured, {"prefill": 2.0, "decode": 1.0}) == {"prefill": 1.5, "decode": 1.0}


def test_judged_rates_are_the_lowest_the_measured_goodput_and_an_overloaded_rate():
    pts = [(0.5, 1.0), (1.0, 0.95), (1.5, 0.6), (2.0, 0.2)]
    assert judged_rates(pts, 0.9) == {"low": 0.5, "near goodput": 1.0, "overloaded": 2.0}
    # nothing fell below the target: no overloaded rate; nothing met it: no goodput
    assert judged_rates([(1.0, 1.0), (2.0, 0.95)], 0.9) == {"low": 1.0, "near goodput": 2.0}
    assert judged_rates([(1.0, 0.5), (2.0, 0.2)], 0.9) == {"low": 1.0, "overloaded": 2.0}
    with pytest.raises(ValueError):
        judged_rates([], 0.9)


def _served_by_a_slower_truth():
    """The shipped profile, and calibration points "measured" on a cluster whose prefill is 1.2x and
    decode 1.5x slower than it: (profile, slo, simulated cluster, calibration points, a rate point)."""
    profile = load_profile(str(SHIPPED_PROFILE))
    slo = SLO(2.5, 0.15)
    sim = SimulatedCluster("deploy/bench-disagg.yaml", 1456, slo)
    cal = SweepSpec("chatbot", (0.5, 2.0), 8, slo, seed=1)
    truth = calibrated(profile, 1.2, 1.5)
    cal_points = []
    for rate in cal.rates:
        busy = sim(truth, cal.requests(rate))[1]
        cal_points.append({"rate": rate, "workers": {p: {"steps": 1, "busy_s": busy[p]} for p in busy}})
    point = {"ttft_attainment": 1.0, "tpot_attainment": 1.0, "workers": cal_points[0]["workers"], "idle_after": True}
    return profile, slo, sim, cal_points, point


def test_analysis_fits_the_calibration_from_worker_busy_time_and_reports_missing_rates():
    profile, slo, sim, cal_points, point = _served_by_a_slower_truth()
    spec = SweepSpec("chatbot", (0.5, 1.0), 8, slo, seed=0)
    cal = SweepSpec("chatbot", (0.5, 2.0), 8, slo, seed=1)
    measured = {"calibration": cal_points,
                "points": [{**point, "rate": 0.5, "attainment": 1.0}, {**point, "rate": 1.0, "attainment": 1.0}]}
    a = analyse(measured, profile, sim, spec, cal, "test")
    c = a["calibration"]
    assert c["prefill"] == pytest.approx(1.2, rel=0.01)   # from the 2 req/s point alone
    assert c["decode"] == pytest.approx(1.5, rel=0.02)
    # slower steps batch more: busy time alone grows by less than the step time
    assert all(f["decode"] < 1.45 for f in c["per_point"])
    row = a["rows"][1]
    assert row["simulated_busy_calibrated"]["decode"] > 1.2 * row["simulated_busy_offline"]["decode"]
    assert a["missing"] == ["overloaded"] and not a["within_tolerance"]
    res = {"workload": "chatbot", "config": "deploy/bench-disagg.yaml", "date_utc": "now", "commit": "x",
           "num_requests": 8, "seed": 0, "slo": {"ttft_s": 2.5, "tpot_s": 0.15}, "target": 0.9,
           "profile": "p", "command": "c", "calibration_seed": 1, "calibration_rates": [0.5, 2.0]}
    md = markdown(res, a)
    assert "no overloaded rate" in md and "NOT within" in md and "prefill x1.200" in md


def test_prefill_is_calibrated_on_the_highest_rate_and_decode_on_both():
    """Serving prefill runs slower when its instance is mostly idle; where prompts queue is
    what decides attainment, so the prefill factor comes from the highest calibration rate."""
    profile = load_profile("router/planner/profiles/smollm2-135m-cpu.json")
    slo = SLO(2.5, 0.15)
    sim = SimulatedCluster("deploy/bench-disagg.yaml", 1456, slo)
    cal = SweepSpec("chatbot", (2.0, 0.5), 8, slo, seed=1)   # listed high first: the rate decides
    busy = {r: sim(calibrated(profile, f, 1.3), cal.requests(r))[1] for r, f in ((0.5, 1.6), (2.0, 1.1))}
    points = [{"rate": r, "workers": {p: {"steps": 1, "busy_s": busy[r][p]} for p in busy[r]}} for r in cal.rates]
    _, fit = fit_calibration(profile, sim, points, cal, "test")
    assert fit["prefill"] == pytest.approx(1.1, rel=0.01)   # not between 1.1 and 1.6
    assert fit["decode"] == pytest.approx(1.3, rel=0.05)


def test_reanalyse_rewrites_the_one_record_in_place(tmp_path, capsys, monkeypatch):
    """`pdcluster bench fidelity --reanalyse`: the recorded measurement scored again; the output
    directory holds one current record, fidelity.json and fidelity.md, whatever the clock says."""
    from cluster.cli import main
    monkeypatch.chdir(ROOT)                  # the record names its config relative to the repository
    profile, slo, sim, cal_points, point = _served_by_a_slower_truth()
    record = {"workload": "chatbot", "config": "deploy/bench-disagg.yaml", "rates": [0.5, 1.0], "num_requests": 8,
              "seed": 0, "calibration_seed": 1, "calibration_rates": [0.5, 2.0],
              "slo": {"ttft_s": 2.5, "tpot_s": 0.15}, "target": 0.9, "date_utc": "2026-12-05T10:00:00Z",
              "commit": "abc1234", "wall_s": 300.0, "command": "pdcluster bench fidelity", "profile": "gone.json",
              "measured": {"calibration": cal_points,
                           "points": [{**point, "rate": 0.5, "attainment": 1.0},
                                      {**point, "rate": 1.0, "attainment": 0.5}]}}
    src = tmp_path / "in.json"
    src.write_text(json.dumps(record))
    out = tmp_path / "out"
    for source in (src, out / "fidelity.json"):          # a second pass re-scores the record just written
        assert main(["bench", "fidelity", "--reanalyse", str(source), "--profile", str(SHIPPED_PROFILE),
                     "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["fidelity.json", "fidelity.md"]
        res = json.loads((out / "fidelity.json").read_text())
        assert res["profile"] == str(SHIPPED_PROFILE) and res["measured"] == record["measured"]
        assert res["analysis"]["calibration"]["decode"] == pytest.approx(1.5, rel=0.02)
        assert res["analysis"]["judged"]["near goodput"]["rate"] == 0.5
        assert "prefill x1.2" in (out / "fidelity.md").read_text()
    assert "wrote" in capsys.readouterr().out
