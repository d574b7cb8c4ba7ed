"""A searched plan as a cluster config fragment (deploy/plans/<name>.yaml).

The fragment holds `prefill:`, `decode:` and `affinity:` sections in the
config schema (cluster/config.py), so `pdcluster serve --plan X.yaml` merges
it over the base config, with `router.disaggregation` set to the mode the plan
won in. `affinity` carries the placement: low (each unit's prefill and decode
instances share their nodes stage by stage; the cluster places them so,
cluster/placement.py) or high (any node will do). A conditional plan adds the
`conditional:` section its router weighs the paths with (the plan's SLOs, the
chunk, the profile), and a plan searched with prefix caching sets
`enable_prefix_caching` on its 1 x 1 pools. What the config schema has no key
for (the predictions, the runners-up, the best colocated plan) goes in the
header comment, where the config loader ignores it.
"""
from __future__ import annotations

import os

import yaml

from router.planner.profile import GIB, Profile
from router.planner.search import Candidate, SearchResult, SearchSettings


def plan_sections(c: Candidate, profile: Profile, block_size: int, max_num_seqs: int,
                  max_num_batched_tokens: int, prefix_caching: bool = False) -> dict:
    """The config sections of the whole cluster: the unit's pools times the number of units
    (with prefix caching on the pools that can keep one: 1 x 1, as cluster/config.py checks)."""
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
        if prefix_caching and pool.tp * pool.pp == 1:
            section["enable_prefix_caching"] = True
        out[name] = section
    return out


def router_sections(c: Candidate, s: SearchSettings, profile_ref: str) -> dict:
    """The router the plan was simulated with: its disaggregation mode and, for a conditional
    plan, what its choice weighs (the searched SLOs, the chunk, the profile)."""
    out: dict = {"router": {"disaggregation": c.disaggregation}}
    if c.disaggregation == "always":
        return out
    return {**out, "conditional": {"ttft_slo_s": s.ttft_slo, "tpot_slo_s": s.tpot_slo,
                            "local_prefill_tokens": s.sim.local_chunk_tokens, "profile": profile_ref}}


def mode_lines(result: SearchResult) -> list[str]:
    """Header lines weighing the router's modes (and prefix caching) against each other."""
    b, lines = result.best, []
    for how, c in result.best_by_mode.items():
        if how != b.disaggregation:
            lines.append(f"# best {how}: {c.describe()}; {b.disaggregation} / {how} per GPU = "
                         + (f"{b.per_gpu / c.per_gpu:.2f}x" if c.per_gpu > 0 else "inf"))
    tied = [how for how, c in result.best_by_mode.items() if how != b.disaggregation and c.per_gpu == b.per_gpu]
    if tied:        # candidates are ranked stably: on a tie the plan keeps the mode searched first (always)
        lines.append(f"# disaggregation: {b.disaggregation} ties with {', '.join(tied)}; the plan keeps "
                     f"{b.disaggregation}")
    elif len(result.best_by_mode) > 1:
        lines.append(f"# disaggregation: {b.disaggregation} wins")
    if result.uncached_goodput is not None:
        lines.append(f"# prefix caching: the best plan without it: {result.uncached_goodput:.2f} req/s per unit "
                     f"(with it {b.goodput:.2f})")
    return lines


def placement(c: Candidate) -> str:
    if c.regime == "low":
        return (f"low node affinity: each unit spans {c.prefill.pp} node(s); stage s of every prefill and "
                f"decode instance of a unit sits on the unit's node s, so KV moves over the intra-node link")
    return "high node affinity: instances placed independently; KV moves over the inter-node link"


def render(result: SearchResult, profile: Profile, command: str, profile_ref: str | None = None) -> str:
    """The YAML text: header comment with predictions, then the config sections. `profile_ref`:
    how a conditional plan's router finds the profile (a path or shipped name; default its name)."""
    s, b = result.settings, result.best
    lines = [
        f"# Plan found by: {command}",
        f"# profile {profile.name} ({profile.hardware_name}); workload {s.workload}; "
        f"SLOs TTFT {s.ttft_slo}s, TPOT {s.tpot_slo}s, attainment target {s.target:.0%}",
        f"# prefix caching: {'on (1 x 1 instances)' if s.sim.prefix_caching else 'off'}; "
        f"cluster {result.shape.nodes} nodes x {result.shape.gpus_per_node} GPUs; "
        f"{result.num_plans} configurations, {result.num_sims} simulations of {s.num_requests}+ requests",
        f"# predicted goodput: {b.goodput * b.num_units:.2f} req/s for the cluster "
        f"({b.goodput:.2f} per unit x {b.num_units} units), {b.per_gpu:.3f} req/s per GPU, "
        f"attainment {b.attainment:.1%} at the unit's goodput",
        f"# best:       {b.describe()}",
        f"# placement:  {placement(b)}",
    ]
    lines += mode_lines(result)
    for i, c in enumerate(result.runners_up[:5], start=1):
        lines.append(f"# runner-up {i}: {c.describe()}")
    if result.best_colocated is not None:
        c = result.best_colocated
        lines.append(f"# best colocated: {c.describe()}; "
                     f"disaggregated / colocated per GPU = {b.per_gpu / c.per_gpu:.2f}x"
                     if c.per_gpu > 0 else f"# best colocated: {c.describe()}")
    body = plan_sections(b, profile, s.sim.block_size, s.sim.max_num_seqs, s.sim.max_num_batched_tokens,
                         s.sim.prefix_caching)
    body["affinity"] = affinity_section(b)
    body.update(router_sections(b, s, profile_ref or profile.name))
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
