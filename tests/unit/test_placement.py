"""Placement without Ray: the config keys, each instance's bundles, and the units of low node affinity."""
from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.placement import UnitLayout, bundles, describe_needs, label_selectors, rank_bundle
from engine.errors import ConfigError


def test_a_pool_placement_becomes_every_rank_bundle_and_its_node_labels():
    cfg = load_config(None, {"decode": {"tp_size": 2, "num_threads": 2, "placement": {
        "strategy": "STRICT_SPREAD", "resources": {"host_b": 1}, "labels": {"zone": "in(b,c)"}}}})
    pool = cfg.decode
    assert bundles(pool) == [{"CPU": 2.0, "host_b": 1.0}] * 2
    assert label_selectors(pool) == [{"zone": "in(b,c)"}] * 2
    assert "STRICT_SPREAD" in describe_needs(pool) and "host_b" in describe_needs(pool)
    assert label_selectors(cfg.prefill) is None and rank_bundle(cfg.prefill) == {"CPU": 1.0}


def test_per_instance_entries_go_round_by_slot_over_the_pool_placement():
    cfg = load_config(None, {"prefill": {"num_instances": 3, "placement": {
        "labels": {"gpu": "a100"}, "instances": [{"resources": {"host_b": 1}}, {"resources": {"host_c": 1}}]}}})
    where = [cfg.prefill.placement.for_instance(i) for i in range(3)]
    assert [w.resources for w in where] == [{"host_b": 1}, {"host_c": 1}, {"host_b": 1}]
    assert all(w.labels == {"gpu": "a100"} for w in where)
    assert bundles(cfg.prefill, where[1]) == [{"CPU": 1.0, "host_c": 1.0}]


@pytest.mark.parametrize("placement, match", [
    ({"strategy": "ANYWHERE"}, "prefill.placement.strategy"),
    ({"resources": {"CPU": 2}}, "not a custom resource"),
    ({"resources": {"host_b": 0}}, "prefill.placement.resources.host_b"),
    ({"resources": [1]}, "prefill.placement.resources must be dict"),
    ({"labels": {"host": 3}}, "prefill.placement.labels"),
    ({"instances": [{"resource": {}}]}, r"prefill.placement.instances\[0\]"),
    ({"instances": {"a": 1}}, "prefill.placement.instances must be list"),
    ({"where": "b"}, "unknown config key prefill.placement.where"),
])
def test_bad_placement_keys_are_named(placement, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"prefill": {"placement": placement}})


@pytest.mark.parametrize("sections, match", [
    ({"affinity": {"regime": "medium"}}, "affinity.regime"),
    ({"affinity": {"regime": "low", "num_units": 2}}, "multiple of affinity.num_units"),
    ({"affinity": {"regime": "low"}, "decode": {"pp_size": 2}}, "pp_size"),
    ({"affinity": {"regime": "low"}, "prefill": {"placement": {"strategy": "SPREAD"}}}, "resources and labels only"),
    ({"affinity": {"regime": "low"}, "mode": "colocated"}, "no such pools"),
    ({"security": {"curve": False, "encrypt_kv": True}}, "security.encrypt_kv"),
    ({"ray": {"placement_timeout_s": 0}}, "ray.placement_timeout_s"),
])
def test_affinity_security_and_ray_keys_are_checked(sections, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sections)


def test_low_affinity_puts_each_stage_of_a_unit_in_one_group():
    cfg = load_config(None, {"affinity": {"regime": "low", "num_units": 2},
                             "prefill": {"num_instances": 2, "tp_size": 2, "pp_size": 2},
                             "decode": {"num_instances": 4, "tp_size": 1, "pp_size": 2}})
    layout = UnitLayout(2, cfg.pools())
    assert layout.num_stages == 2 and layout.per_unit("prefill") == 1 and layout.per_unit("decode") == 2
    # a group holds stage s of one unit: the prefill's two tensor ranks, then each decode's one
    assert layout.group_roles() == [("prefill", 0, 0), ("prefill", 0, 1), ("decode", 0, 0), ("decode", 1, 0)]
    assert len(layout.group_bundles()) == 4
    # prefill slot 1 = unit 1; its ranks 0..3 = (stage 0: tp 0, 1), (stage 1: tp 0, 1)
    assert layout.rank_slots("prefill", 1) == [(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    # decode slot 3 = unit 1, second decode of the unit; its stages 0 and 1 in those groups
    assert layout.rank_slots("decode", 3) == [(1, 0, 3), (1, 1, 3)]
    # every bundle of every group belongs to exactly one rank of one instance
    used = [(u, s, b) for role in ("prefill", "decode") for slot in range(cfg.pools()[role].num_instances)
            for (u, s, b) in layout.rank_slots(role, slot)]
    assert sorted(used) == sorted((u, s, b) for u in range(2) for s in range(2) for b in range(4))
