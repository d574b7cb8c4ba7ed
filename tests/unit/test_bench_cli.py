"""`pdcluster bench ...`: every subcommand parses, and the ones that need no cluster run for real
(the simulator replay of `bench results --replay-only`, `bench overlap`) on hand-made results."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench import cpu_share, fidelity, overlap, results
from cluster.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PROFILE = ROOT / "router/planner/profiles/smollm2-135m-cpu.json"
SUBCOMMANDS = ("engine", "transfer", "stream", "overhead", "serve", "results", "fidelity", "overlap", "cpu-share")


@pytest.mark.parametrize("what", SUBCOMMANDS)
def test_every_bench_subcommand_answers_help(what, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", what, "--help"])
    assert exit_.value.code == 0
    assert f"usage: pdcluster bench {what}" in capsys.readouterr().out


def test_the_entry_point_parses_bench_results_without_loading_torch_ray_or_matplotlib():
    run = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "results", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--replay-only" in run.stdout and "--profile" in run.stdout
    code = ("import sys; from cluster.cli import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_bench_options_reach_their_subcommand():
    parse = build_parser().parse_args
    a = parse(["bench", "results", "--workloads", "chatbot", "--scale", "0.2", "--profile", "p.json",
               "--out", "/tmp/pilot"])
    assert a.fn is results.main and (a.workloads, a.scale, a.profile, a.out) == ("chatbot", 0.2, "p.json", "/tmp/pilot")
    assert not a.replay_only
    a = parse(["bench", "fidelity", "--reanalyse", "f.json", "--out", "d"])
    assert a.fn is fidelity.main and (a.reanalyse, a.out, a.profile) == ("f.json", "d", None)
    a = parse(["bench", "overlap", "x/serve.json"])
    assert a.fn is overlap.main and a.serve_json == "x/serve.json"
    assert parse(["bench", "overlap"]).serve_json == overlap.DEFAULT_SERVE_JSON
    a = parse(["bench", "cpu-share", "--rate", "2", "--workload", "chatbot"])
    assert a.fn is cpu_share.main and (a.rate, a.workload) == (2.0, "chatbot")
    a = parse(["bench", "transfer", "--variants", "shm,zmq", "--repeats", "1"])
    assert (a.what, a.variants, a.repeats, a.out) == ("transfer", "shm,zmq", 1, "bench-results/transfer.json")
    assert not a.hosts
    a = parse(["bench", "transfer", "--hosts", "--rates", "1gbit", "--variants", "auto"])
    assert (a.hosts, a.rates, a.variants) == (True, "1gbit", "auto")
    assert parse(["bench", "serve", "--config", "c.yaml"]).out == "bench-results/serve"


def _serve_json(workload: str = "chatbot") -> dict:
    """A serve.json as `bench results` writes it, one mode, the fields the replay reads."""
    return {"workload": workload, "rates": [1.0, 3.0], "num_requests": 6, "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
            "target": 0.9, "burstiness": 1.0, "seed": 0,
            "modes": [{"label": "disaggregated", "config": "deploy/bench-disagg.yaml",
                       "points": [{"rate": 1.0, "attainment": 1.0}, {"rate": 3.0, "attainment": 0.5}],
                       "goodput": 1.0, "goodput_interpolated": 1.5}]}


def test_results_replay_only_writes_the_simulated_files_next_to_the_measurement(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)                       # the serve.json names its config relative to the repository
    (tmp_path / "chatbot").mkdir()
    (tmp_path / "chatbot" / "serve.json").write_text(json.dumps(_serve_json()))
    shutil.copy(SHIPPED_PROFILE, tmp_path / "profile-cpu.json")
    rc = main(["bench", "results", "--replay-only", "--workloads", "chatbot,summarization", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skip summarization" in out and "### chatbot: simulated" in out
    sim = json.loads((tmp_path / "chatbot" / "simulated.json").read_text())
    assert sim["profile"] == str(tmp_path / "profile-cpu.json")
    [mode] = sim["modes"]
    assert [p["rate"] for p in mode["points"]] == [1.0, 3.0]
    assert [p["measured_attainment"] for p in mode["points"]] == [1.0, 0.5]
    assert all(0.0 <= p["attainment"] <= 1.0 for p in mode["points"])
    for name in ("simulated.md", "attainment_sim.png"):
        assert (tmp_path / "chatbot" / name).stat().st_size > 0
    assert (tmp_path / "simulated.md").read_text() == (tmp_path / "chatbot" / "simulated.md").read_text()


def test_results_stops_before_any_cluster_on_a_missing_profile_or_an_unknown_workload(tmp_path, capsys):
    assert main(["bench", "results", "--profile", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    assert "no profile at" in capsys.readouterr().err
    assert main(["bench", "results", "--replay-only", "--out", str(tmp_path)]) == 2
    assert f"no profile at {tmp_path / 'profile-cpu.json'}" in capsys.readouterr().err
    assert main(["bench", "results", "--workloads", "chatbot,poetry", "--out", str(tmp_path)]) == 2
    assert "unknown workloads ['poetry']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _request(arrival: float, ttft: float, prefill: float, e2e: float, tpot: float, status: str = "ok") -> dict:
    return {"status": status, "arrival_s": arrival, "ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot,
            "timings": {"prefill_s": prefill}}


def test_overlap_splits_tpot_by_how_much_of_the_decode_window_a_prefill_covered(tmp_path, capsys):
    # a decodes over [1, 2] while b's prefill runs over [1.1, 2]: 90% covered; b decodes over
    # [2, 3] with no prefill running; the failed request counts for neither
    point = {"requests": [_request(0.0, 1.0, 1.0, 2.0, 0.080), _request(1.0, 1.0, 0.9, 2.0, 0.050),
                          _request(0.5, 0.2, 0.2, 3.0, 0.5, status="failed")]}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"modes": [{"label": "disaggregated", "points": [point]}]}))
    assert main(["bench", "overlap", str(path)]) == 0
    assert capsys.readouterr().out.strip() == ("disaggregated: TPOT median, prefill busy < 20% of the decode "
                                               "window: 50 ms (n=1); >= 50%: 80 ms (n=1)")
    assert main(["bench", "overlap", str(tmp_path / "none.json")]) == 2
    assert "cannot read the modes" in capsys.readouterr().err


def test_bench_engine_takes_a_peer_and_its_venv(tmp_path, monkeypatch):
    parse = build_parser().parse_args
    a = parse(["bench", "engine", "--peer", "vllm", "--vllm-venv", "/opt/v", "--cpu", "0", "--no-transformers"])
    assert (a.what, a.peer, a.vllm_venv, a.cpu, a.no_transformers) == ("engine", "vllm", "/opt/v", 0, True)
    a = parse(["bench", "engine"])
    assert (a.peer, a.vllm_venv, a.cpu, a.no_transformers) == (None, None, None, False)
    with pytest.raises(SystemExit):
        parse(["bench", "engine", "--peer", "sglang"])


def test_a_missing_peer_venv_is_a_clear_error_before_anything_loads(tmp_path, monkeypatch, capsys):
    from cluster.bench import engine_peer
    monkeypatch.delenv(engine_peer.VENV_ENV, raising=False)
    assert engine_peer.default_vllm_venv() == ROOT.parent / "vllm-cpu-venv"
    monkeypatch.setenv(engine_peer.VENV_ENV, str(tmp_path / "env-venv"))
    assert engine_peer.default_vllm_venv() == tmp_path / "env-venv"
    missing = tmp_path / "no-venv"
    assert main(["bench", "engine", "--peer", "vllm", "--vllm-venv", str(missing), "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert f"no vLLM venv at {missing}" in err and "setup-vllm-cpu.sh" in err and "--vllm-venv" in err
    assert "torch" not in err   # failed at the check, before any engine was built
    assert not (tmp_path / "e.json").exists()
