"""Where the ranks of an instance run: its bundles, and the units of low node affinity.

Every rank of an instance is one Ray bundle: its CPUs (and GPUs), plus the
custom resources its pool's `placement.resources` asks for; its node must
carry the pool's `placement.labels`. Every instance holds a slot of its pool
(0, 1, ...; the pool manager's, and a dead instance's slot goes to its
replacement), which picks its `placement.instances` entry. By default
(`affinity.regime: high`) each instance reserves its own placement group of
those bundles, with the pool's `placement.strategy`, and Ray puts it
wherever it fits.

Low node affinity (DistServe; `affinity.regime: low`, as `pdcluster plan`
writes it): the pools are `num_units` equal units, and stage s of every
prefill and decode instance of a unit must share one node, so that KV moves
only inside it. Ray cannot ask two placement groups to share a node, so each
(unit, stage) is one STRICT_PACK group holding the bundles of that stage's
ranks of all the unit's instances; an instance's slot is its position in
the units, and it runs each rank in its bundle there. Which bundle is whose
is pure arithmetic (`UnitLayout`), tested without Ray.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from cluster.config import ClusterConfig, PlacementConfig, PoolConfig
from engine.errors import ConfigError

log = logging.getLogger(__name__)


def rank_bundle(pool: PoolConfig, where: PlacementConfig | None = None) -> dict:
    """The resources of one rank of an instance of `pool` placed as `where` says (default: the pool)."""
    where = where or pool.placement
    bundle = {"CPU": float(pool.num_threads)}
    if pool.num_gpus:
        bundle["GPU"] = float(pool.num_gpus)
    for name, amount in (where.resources or {}).items():
        bundle[name] = float(amount)
    return bundle


def bundles(pool: PoolConfig, where: PlacementConfig | None = None) -> list[dict]:
    """One resource bundle per rank of an instance of this pool."""
    return [rank_bundle(pool, where) for _ in range(pool.tp_size * pool.pp_size)]


def label_selectors(pool: PoolConfig, where: PlacementConfig | None = None) -> list[dict] | None:
    """Per bundle, the node labels it needs (None: any node)."""
    labels = (where or pool.placement).labels
    return [dict(labels) for _ in range(pool.tp_size * pool.pp_size)] if labels else None


def describe_needs(pool: PoolConfig, where: PlacementConfig | None = None) -> str:
    where = where or pool.placement
    need = f"{pool.tp_size * pool.pp_size} x {rank_bundle(pool, where)}"
    if where.labels:
        need += f" on nodes labelled {where.labels}"
    if where.strategy != "PACK" and pool.tp_size * pool.pp_size > 1:
        need += f" ({where.strategy})"
    return need


@dataclass(frozen=True)
class UnitLayout:
    """Low node affinity, as arithmetic: unit u holds instances [u * per_unit, (u + 1) * per_unit)
    of each pool; group (u, s) holds stage s's ranks of all of them, prefill's first."""
    num_units: int
    pools: dict   # role -> PoolConfig, prefill then decode

    def per_unit(self, role: str) -> int:
        return self.pools[role].num_instances // self.num_units

    @property
    def num_stages(self) -> int:
        return next(iter(self.pools.values())).pp_size

    def group_roles(self) -> list[tuple[str, int, int]]:
        """(role, position in the unit, tp rank) of each bundle of any (u, s) group, in order."""
        return [(role, j, t) for role, pool in self.pools.items()
                for j in range(self.per_unit(role)) for t in range(pool.tp_size)]

    def group_bundles(self) -> list[dict]:
        return [rank_bundle(self.pools[role]) for role, _, _ in self.group_roles()]

    def rank_slots(self, role: str, slot: int) -> list[tuple[int, int, int]]:
        """(unit, stage, bundle index in group (unit, stage)) of each rank of the instance in
        `slot` (0 .. num_instances - 1) of `role`; rank r = stage * tp_size + tp rank."""
        unit, j = divmod(slot, self.per_unit(role))
        order = self.group_roles()
        pool = self.pools[role]
        return [(unit, r // pool.tp_size, order.index((role, j, r % pool.tp_size)))
                for r in range(pool.tp_size * pool.pp_size)]


class Units:
    """The placement groups of low node affinity."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.layout = UnitLayout(cfg.affinity.num_units, cfg.pools())
        self.groups: dict[tuple[int, int], object] = {}

    def reserve(self) -> None:
        from ray.util.placement_group import placement_group
        for u in range(self.layout.num_units):
            for s in range(self.layout.num_stages):
                self.groups[(u, s)] = placement_group(self.layout.group_bundles(), strategy="STRICT_PACK",
                                                      name=f"unit{u}-stage{s}")

    def wait(self, timeout_s: float) -> None:
        """Every unit's groups are reserved, or ConfigError naming what one node must hold."""
        import ray
        refs = {g.ready(): key for key, g in self.groups.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        missing = sorted(refs[r] for r in refs if r not in ready)
        if missing:
            need = self.layout.group_bundles()
            raise ConfigError(f"the Ray cluster cannot place unit {missing[0][0]} stage {missing[0][1]} of the low "
                              f"node affinity plan: one node must hold {len(need)} bundles {need}; free: "
                              f"{ray.available_resources()}")

    def slots(self, role: str, slot: int) -> list[tuple[object, int]]:
        """(placement group, bundle index) of each rank of the instance in `slot`."""
        return [(self.groups[(u, s)], b) for u, s, b in self.layout.rank_slots(role, slot)]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group
        for g in self.groups.values():
            try:
                remove_placement_group(g)
            except Exception as e:   # already gone with its cluster
                log.debug("unit group removal: %s", e)
        self.groups.clear()
