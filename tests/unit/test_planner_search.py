"""router.planner.search and plan_file: a searched plan is valid, loadable, and beats nothing it should not."""
import pytest
import yaml

from cluster.config import load_config
from router.planner.plan_file import plan_sections, render, write_plan
from router.planner.profile import PlannerError, load_profile, profile_from_dict
from router.planner.search import ClusterShape, SearchSettings, search_plan
from tests.unit.test_planner_profile import SHIPPED, make_profile_dict

TOY = profile_from_dict(make_profile_dict())
FAST = dict(num_requests=80, max_requests=300, horizon_s=4.0, keep=2, joint=2, max_instances=2)


def test_plan_for_one_gpu_per_node_loads_as_a_cluster_config(tmp_path):
    shape = ClusterShape(nodes=3, gpus_per_node=1, intra_node_gb_s=10.0, inter_node_gb_s=1.0)
    res = search_plan(TOY, shape, SearchSettings(2.0, 0.06, **FAST))
    b = res.best
    assert b.goodput > 0 and b.attainment >= 0.9
    assert b.prefill.tp == b.decode.tp == 1                     # one GPU per node: no tensor parallelism
    assert b.unit_gpus * b.num_units <= shape.num_gpus
    path = tmp_path / "plans" / "toy.yaml"
    write_plan(str(path), render(res, TOY, "pdcluster plan (test)"))
    text = path.read_text()
    assert "# predicted goodput:" in text and "runner-up 1" in text and "best colocated" in text
    cfg = load_config(str(path))
    assert cfg.affinity.regime == b.regime   # the placement travels with the plan
    if b.regime == "low":
        assert cfg.affinity.num_units == b.num_units
    assert cfg.prefill.num_instances == b.prefill.num_instances * b.num_units
    assert cfg.decode.num_instances == b.decode.num_instances * b.num_units
    assert cfg.prefill.num_gpus == 1.0 and cfg.decode.kv_cache_memory_gb > 0
    assert res.num_plans >= 4 and res.num_sims >= res.num_plans


def test_ranked_by_goodput_per_gpu_and_both_regimes_searched():
    shape = ClusterShape(nodes=2, gpus_per_node=4, intra_node_gb_s=50.0, inter_node_gb_s=1.0)
    res = search_plan(TOY, shape, SearchSettings(2.0, 0.06, **FAST))
    ranked = [res.best] + res.runners_up
    assert [c.per_gpu for c in ranked] == sorted((c.per_gpu for c in ranked), reverse=True)
    assert {c.regime for c in ranked} == {"high", "low"}
    for c in ranked:
        if c.regime == "low":     # one unit's stage segments share a node, both phases the same p
            assert c.prefill.pp == c.decode.pp
            assert c.prefill.num_instances * c.prefill.tp + c.decode.num_instances * c.decode.tp <= 4
            assert c.transfer_gb_s == 50.0
    assert res.best_colocated is not None and res.best_colocated.regime.startswith("colocated")


def test_shipped_13b_profile_plans_a_cluster_section_per_phase(tmp_path):
    p = load_profile(SHIPPED)
    shape = ClusterShape(1, 4, p.intra_node_gb_s, p.inter_node_gb_s)
    res = search_plan(p, shape, SearchSettings(0.25, 0.1, **FAST), regimes=("high",), with_colocated=False)
    text = render(res, p, "test")
    body = yaml.safe_load(text)
    (tmp_path / "plan.yaml").write_text(text)
    cfg = load_config(str(tmp_path / "plan.yaml"))              # tp > 1 plans load too
    assert cfg.prefill.tp_size == res.best.prefill.tp and cfg.decode.tp_size == res.best.decode.tp
    assert body["affinity"] == {"regime": "high"} and cfg.affinity.regime == "high"
    # the router's mode the plan won in comes with it (conditional: and what its choice weighs)
    assert {"prefill", "decode", "affinity", "router"} <= set(body) <= {"prefill", "decode", "affinity", "router",
                                                                        "conditional"}
    assert body["router"]["disaggregation"] == cfg.router.disaggregation == res.best.disaggregation
    assert ("conditional" in body) == (res.best.disaggregation == "conditional")
    assert body["prefill"]["tp_size"] * body["prefill"]["pp_size"] * body["prefill"]["num_instances"] \
        + body["decode"]["tp_size"] * body["decode"]["pp_size"] * body["decode"]["num_instances"] <= 4
    with pytest.raises(ValueError):
        plan_sections(res.best.__class__("colocated", None, None, res.best.prefill, 1, 1.0, 1.0), p, 16, 64, 4096)


@pytest.mark.parametrize("shape, settings, regimes, match", [
    (ClusterShape(1, 1, 1.0, 1.0), SearchSettings(1.0, 1.0), ("high",), "at least 2 GPUs"),
    (ClusterShape(0, 4, 1.0, 1.0), SearchSettings(1.0, 1.0), ("high",), "nodes"),
    (ClusterShape(1, 2, 0.0, 1.0), SearchSettings(1.0, 1.0), ("high",), "intra_node_gb_s"),
    (ClusterShape(1, 2, 1.0, 1.0), SearchSettings(1.0, 1.0), ("medium",), "affinity regime"),
    (ClusterShape(1, 2, 1.0, 1.0), SearchSettings(1e-4, 1e-4, **FAST), ("high",), "loosen the SLOs"),
    (ClusterShape(1, 2, 1.0, 1.0), SearchSettings(-0.25, 0.1), ("high",), "ttft_slo"),
    (ClusterShape(1, 2, 1.0, 1.0), SearchSettings(0.25, 0.1, target=0.0), ("high",), "target"),
    (ClusterShape(1, 2, 1.0, 1.0), SearchSettings(0.25, 0.1, num_requests=0), ("high",), "num_requests"),
])
def test_bad_search_inputs_raise_typed_errors(shape, settings, regimes, match):
    with pytest.raises(PlannerError, match=match):
        search_plan(TOY, shape, settings, regimes=regimes)


def test_cli_plan_writes_a_plan_that_serve_merges_over_the_config(tmp_path, capsys):
    from cluster.cli import build_parser, main
    from cluster.serve import plan_fragment
    out = tmp_path / "plan.yaml"
    rc = main(["plan", "--profile", SHIPPED, "--workload", "code", "--ttft-slo", "0.25", "--tpot-slo", "0.1",
               "--nodes", "2", "--gpus-per-node", "1", "--num-requests", "80", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "# best:" in printed.out and "wrote" in printed.err
    base = tmp_path / "base.yaml"
    base.write_text("router:\n  port: 0\nprefill:\n  num_threads: 1\n")
    cfg = load_config(str(base), plan_fragment(str(out)))
    assert cfg.router.port == 0 and cfg.prefill.num_instances >= 1 and cfg.decode.num_gpus == 1.0
    assert build_parser().parse_args(["serve", "--plan", str(out)]).plan == str(out)
    assert main(["plan", "--profile", "no-such-profile", "--ttft-slo", "1", "--tpot-slo", "1",
                 "--nodes", "1", "--gpus-per-node", "2"]) == 2
    assert "no-such-profile" in capsys.readouterr().err


def test_plan_fragment_rejects_bad_files(tmp_path):
    from cluster.serve import plan_fragment
    from engine.errors import ConfigError
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        plan_fragment(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        plan_fragment(str(tmp_path / "missing.yaml"))
