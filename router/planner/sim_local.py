"""Conditional disaggregation in the simulator: decode instances that prefill too, and the choice.

Modes of router/planner/simulator.py (a disaggregated cluster's router.disaggregation):

  * "conditional": each arrival is placed by `router.conditional.ConditionalPolicy.choose`, the
    live router's model (router/core.py `_place_prefill`), fed from the simulated state: either
    on the prefill instance it names (then as in "disaggregated": the KV moves to the decode
    instance with the most room), or on the decode instance it names, which prefills it itself;
  * "never": no prefill pool; the policy only picks which decode instance prefills each prompt.

A decode instance here is decode_worker/worker.py with `local_chunk_tokens`: each step carries
every running decode plus at most `local_chunk_tokens` prompt tokens of its local prefills
(first come, first served), timed as colocated_chunked's steps (simulator.chunked_step_s). A
local prompt's first token comes with its last chunk (TTFT), then it decodes there like a pulled
one. It reserves prompt + output KV when admitted, as pulls do, and counts against max_num_seqs.

What the policy sees, as the live router builds it:

  * DecodeSide: the requests bound there past their prefill and not finished (waiting for
    admission, pulling, decoding) and their KV (prompt + tokens so far); the prompt tokens of its
    local prefills not done; the prefix overlap the router's index gives;
  * PrefillSide: the prompt tokens routed there and not yet prefilled (the batch in flight
    included), and the overlap.

Left out: the live corrections (measured prefill time over predicted, each decode instance's
measured step over predicted): the simulated times are the profile's, so both factors stay 1.
The policy's latency is the decode pool's plan from the simulation's profile. Instances do not
stop taking work in these modes (the elastic simulation runs "disaggregated" only).
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from router.conditional import ConditionalPolicy, PrefillSide
from router.planner.sim_core import NEVER, PoolSpec, SimRequest
from router.planner.sim_instances import LocalDecodeInstance

if TYPE_CHECKING:     # simulator.py builds its router from this module
    from router.planner.simulator import Simulation


class LocalRouter:
    """The live router's placement for router.disaggregation conditional / never, over the
    simulated instances of a `Simulation`."""

    def __init__(self, simulation: Simulation) -> None:
        self.simulation = simulation
        self.policy: ConditionalPolicy | None = None   # with the first decode instance: its plan's latency
        self.waiting: deque[SimRequest] = deque()            # arrivals before any instance could take them

    def decode_instance(self, pool: PoolSpec) -> LocalDecodeInstance:
        sim = self.simulation.sim
        cfg = sim.cfg
        if self.policy is None:
            self.policy = ConditionalPolicy(sim.profile.latency(pool.tp, pool.pp), cfg.conditional_ttft_slo_s,
                                            cfg.conditional_tpot_slo_s, cfg.local_chunk_tokens)
        return LocalDecodeInstance(sim, pool, cfg.local_chunk_tokens, self.simulation.finished)

    def place(self, now: float, r: SimRequest) -> None:
        s = self.simulation
        decodes = {d.name: d for d in s.instances["decode"]}
        prefills = {} if s.mode == NEVER else {p.name: p for p in s.instances["prefill"]}
        choice = None
        if self.policy is not None:
            # requests still being prefilled remotely will decode on some decode instance, so under a
            # local prefill's chunks there (the live router counts those not bound elsewhere yet)
            coming = [q for p in prefills.values() for q in (*p.waiting, *p.prefilling)]
            choice = self.policy.choose(
                r.spec.prompt_tokens, [d.side(s.overlap(d, r.spec), now, self.policy.tpot_slo_s, coming)
                                       for d in decodes.values()],
                [PrefillSide(p.name, p.queued_tokens + p.running_tokens, s.overlap(p, r.spec))
                 for p in prefills.values()])
        if choice is None:
            self.waiting.append(r)
            return
        if not choice.local:
            inst = prefills[choice.instance]
            s.note(inst, r.spec, r.spec.prompt_tokens)
            inst.add(now, r)
            return
        inst = decodes[choice.instance]
        s.note(inst, r.spec, r.spec.prompt_tokens)
        r.decode_at = inst
        inst.add_local(now, r)

    def place_waiting(self, now: float) -> None:
        waiting, self.waiting = self.waiting, deque()
        for r in waiting:
            self.place(now, r)
