"""A searched plan as a cluster config fragment (deploy/plans/<name>.yaml).

The fragment holds `prefill:`, `decode:` and `affinity:` sections in the
config schema (cluster/config.py), so `pdcluster serve --plan X.yaml` merges
it over the base config. `affinity` carries the placement: low (each unit's
prefill and decode instances share their nodes stage by stage; the cluster
places them so, cluster/placement.py) or high (any node will do). What the
config schema has no key for (the predictions, the runners-up, the best
colocated plan) goes in the header comment, where the config loader ignores it.
"""
from __future__ import annotations

import os

import yaml

from router.planner.profile import GIB, Profile
from router.planner.search import Candidate, SearchResult


def plan_sections(c: Candidate, profile: Profile, block_size: int, max_num_seqs: int,
                  max_num_batched_tokens: int) -> dict:
    """The config sections of the whole cluster: the unit's pools times the number of units."""
    if c.colocated is not None:
        raise ValueError("a colocated plan has no prefill/decode sections")
    out = {}
    for name, pool in (("prefill", c.prefill), ("decode", c.decode)):
        kv_gb = profile.kv_capacity_tokens(pool.tp, pool.pp) * profile.kv_bytes_per_token / GIB
        section = {
            "num_instances": pool.num_instances * c.num_units,
            "tp_size": pool.tp,
            "pp_size": pool.pp,
            "num_gpus": 1.0 if profile.device_kind == "gpu" else 0.0,
            "kv_cache_memory_gb": round(kv_gb, 3),
            "block_size": block_size,
            "max_num_seqs": max_num_seqs,
        }
        if name == "prefill":
            section["max_num_batched_tokens"] = max_num_batched_tokens
        out[name] = section
    return out


def placement(c: Candidate) -> str:
    if c.regime == "low":
        return (f"low node affinity: each unit spans {c.prefill.pp} node(s); stage s of every prefill and "
                f"decode instance of a unit sits on the unit's node s, so KV moves over the intra-node link")
    return "high node affinity: instances placed independently; KV moves over the inter-node link"


def render(result: SearchResult, profile: Profile, command: str) -> str:
    """The YAML text: header comment with predictions, then the config sections."""
    s, b = result.settings, result.best
    lines = [
        f"# Plan found by: {command}",
        f"# profile {profile.name} ({profile.hardware_name}); workload {s.workload}; "
        f"SLOs TTFT {s.ttft_slo}s, TPOT {s.tpot_slo}s, attainment target {s.target:.0%}",
        f"# cluster {result.shape.nodes} nodes x {result.shape.gpus_per_node} GPUs; "
        f"{result.num_plans} configurations, {result.num_sims} simulations of {s.num_requests}+ requests",
        f"# predicted goodput: {b.goodput * b.num_units:.2f} req/s for the cluster "
        f"({b.goodput:.2f} per unit x {b.num_units} units), {b.per_gpu:.3f} req/s per GPU, "
        f"attainment {b.attainment:.1%} at the unit's goodput",
        f"# best:       {b.describe()}",
        f"# placement:  {placement(b)}",
    ]
    for i, c in enumerate(result.runners_up[:5], start=1):
        lines.append(f"# runner-up {i}: {c.describe()}")
    if result.best_colocated is not None:
        c = result.best_colocated
        lines.append(f"# best colocated: {c.describe()}; "
                     f"disaggregated / colocated per GPU = {b.per_gpu / c.per_gpu:.2f}x"
                     if c.per_gpu > 0 else f"# best colocated: {c.describe()}")
    body = plan_sections(b, profile, s.sim.block_size, s.sim.max_num_seqs, s.sim.max_num_batched_tokens)
    body["affinity"] = affinity_section(b)
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def affinity_section(c: Candidate) -> dict:
    """Where the plan's instances go: the config's `affinity` section."""
    if c.regime == "low":
        return {"regime": "low", "num_units": c.num_units}
    return {"regime": "high"}


def write_plan(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
