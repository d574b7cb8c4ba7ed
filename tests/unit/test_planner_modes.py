"""The plan search weighs router.disaggregation (always / conditional) and prefix caching, and the
plan file records the winner as config."""
import json
from dataclasses import replace

import yaml

from cluster.config import load_config
from router.planner.plan_file import render
from router.planner.profile import profile_from_dict
from router.planner.search import ClusterShape, SearchSettings, search_plan
from router.planner.simulator import SimConfig
from tests.unit.test_planner_profile import make_profile_dict

FAST = dict(num_requests=80, max_requests=300, horizon_s=4.0, keep=2, joint=2, max_instances=2)
SHAPE = ClusterShape(nodes=3, gpus_per_node=1, intra_node_gb_s=10.0, inter_node_gb_s=10.0)


def cheap_prefill():
    d = make_profile_dict()
    d["plans"]["1x1"]["prefill"] = {"a": 0.01, "b": 2e-4, "c": 1e-7}
    return profile_from_dict(d)


def saved(profile, path) -> str:
    path.write_text(json.dumps(profile.to_dict()))
    return str(path)


def test_conditional_is_weighed_and_wins_where_decode_instances_can_absorb_prefills(tmp_path):
    p = cheap_prefill()
    settings = SearchSettings(0.15, 0.1, workload="code", sim=SimConfig(local_chunk_tokens=128), **FAST)
    res = search_plan(p, SHAPE, settings, regimes=("high",), with_colocated=False)
    assert set(res.best_by_mode) == {"always", "conditional"}
    always, cond = res.best_by_mode["always"], res.best_by_mode["conditional"]
    assert cond.decode.tp * cond.decode.pp == 1
    assert res.best is cond and cond.per_gpu > always.per_gpu
    ref = saved(p, tmp_path / "cheap.json")   # the config loader checks that the profile exists
    text = render(res, p, "pdcluster plan (test)", profile_ref=ref)
    assert "# disaggregation: conditional wins" in text and "# best always:" in text
    body = yaml.safe_load(text)
    assert body["router"] == {"disaggregation": "conditional"}
    assert body["conditional"] == {"ttft_slo_s": 0.15, "tpot_slo_s": 0.1, "local_prefill_tokens": 128,
                                   "profile": ref}
    (tmp_path / "plan.yaml").write_text(text)
    cfg = load_config(str(tmp_path / "plan.yaml"))
    assert cfg.router.disaggregation == "conditional" and cfg.local_prefills
    assert cfg.conditional.local_prefill_tokens == 128


def test_without_conditional_only_always_is_weighed_and_recorded():
    p = cheap_prefill()
    settings = SearchSettings(0.15, 0.1, workload="code", conditional=False, **FAST)
    res = search_plan(p, SHAPE, settings, regimes=("high",), with_colocated=False)
    assert set(res.best_by_mode) == {"always"} and res.best.disaggregation == "always"
    assert all(c.disaggregation == "always" for c in res.runners_up)
    body = yaml.safe_load(render(res, p, "test"))
    assert body["router"] == {"disaggregation": "always"} and "conditional" not in body


def test_prefix_caching_is_weighed_on_a_multiturn_workload(tmp_path):
    p = profile_from_dict(make_profile_dict())
    base = SearchSettings(1.0, 0.1, workload="multiturn", **FAST)
    on = search_plan(p, SHAPE, replace(base, sim=SimConfig(prefix_caching=True)), regimes=("high",),
                     with_colocated=False)
    assert on.uncached_goodput is not None and on.best.goodput > on.uncached_goodput > 0
    text = render(on, p, "test", profile_ref=saved(p, tmp_path / "profile.json"))
    assert "# prefix caching: the best plan without it:" in text
    body = yaml.safe_load(text)
    for role in ("prefill", "decode"):      # on the pools that can keep a cache: 1 x 1
        pool = getattr(on.best, role)
        assert body[role].get("enable_prefix_caching", False) == (pool.tp * pool.pp == 1)
    (tmp_path / "plan.yaml").write_text(text)
    load_config(str(tmp_path / "plan.yaml"))
    off = search_plan(p, SHAPE, base, regimes=("high",), with_colocated=False)
    assert off.uncached_goodput is None and "enable_prefix_caching" not in render(off, p, "test")
