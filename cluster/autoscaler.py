"""The autoscaler's actuator: every `autoscaling.interval_s`, observe, decide (router/autoscale.py), act.

One thread:
  1. observe: the router's window (arrivals, lengths, TTFT/TPOT p90) and its
     pools (serving instances, queued prompt tokens, KV use), read on the
     router's loop; the instances still loading come from the pool manager;
  2. decide: the policy (pure) returns the instances wanted per pool;
  3. act: a pool that grows gets new instances from the pool manager (each
     takes work once its model is loaded; Ray's autoscaler is asked for the
     resources, so a launched Ray cluster grows its nodes); a pool that shrinks
     loses its least busy instances: the router drains each (no new work; the
     requests decoding there move to other instances at once), and once it is
     empty the pool manager stops it.

Every decision that changes something is recorded as a ScalingEvent: when it
was decided, why, and for an added instance when it was ready and when it
first got work (the scale-up reaction time).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from router.autoscale import Observation, Policy, PoolObservation
from router.window import RequestWindow

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 120.0   # a removed instance still busy after this is stopped anyway


@dataclass
class ScalingEvent:
    at: float                        # monotonic, when decided
    role: str
    change: int                      # +n added, -n removed
    reason: str
    instances: list[str] = field(default_factory=list)
    ready_at: dict[str, float] = field(default_factory=dict)        # added: model loaded
    first_work_at: dict[str, float] = field(default_factory=dict)   # added: first request given
    stopped_at: dict[str, float] = field(default_factory=dict)      # removed: stopped
    moved: dict[str, int] = field(default_factory=dict)             # removed: live requests moved off it

    def as_dict(self, t0: float) -> dict:
        rel = {k: {n: round(t - t0, 2) for n, t in getattr(self, k).items()}
               for k in ("ready_at", "first_work_at", "stopped_at")}
        return {"at_s": round(self.at - t0, 2), "role": self.role, "change": self.change, "reason": self.reason,
                "instances": self.instances, "moved": self.moved, **rel}


class Autoscaler:
    def __init__(self, cfg, pools, router, loop: asyncio.AbstractEventLoop, policy: Policy, log_fn=print) -> None:
        self.cfg, self.pools, self.router, self.loop, self.policy = cfg, pools, router, loop, policy
        self.log = log_fn
        self.window = RequestWindow(keep_s=max(600.0, 4 * cfg.autoscaling.window_s))
        self._call(lambda: router.core.observers.append(self.window))
        self.events: list[ScalingEvent] = []
        self.decisions: list[tuple[float, dict[str, int], str]] = []   # every decision, for plots
        self._draining: dict[str, tuple[float, ScalingEvent]] = {}     # name -> (since, event)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _call(self, fn):
        """Run `fn` on the router's loop (its state is the loop's alone) and return its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def _run(self) -> None:
        interval = self.cfg.autoscaling.interval_s
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:   # a bad tick must not end autoscaling
                log.exception("autoscaler: a decision failed")

    # -- one decision ------------------------------------------------------------------------
    def observe(self) -> Observation:
        now = time.monotonic()
        loads = self._call(self.router.core.pool_loads)
        pools = {}
        for role, (ready, queued, kv_use) in loads.items():
            pool = self.cfg.pools()[role]
            pools[role] = PoolObservation(ready, self.pools.starting(role), queued, kv_use, pool.tp_size,
                                          pool.pp_size, pool.num_threads * pool.tp_size * pool.pp_size)
        return self._call(lambda: self.window.observation(now, self.cfg.autoscaling.window_s, pools))

    def tick(self) -> None:
        self._follow_up()
        obs = self.observe()
        decision = self.policy.decide(obs)
        self.decisions.append((obs.now, dict(decision.desired), decision.reason))
        for role, change in decision.changes(obs).items():
            if change > 0:
                self._grow(role, change, decision.reason, obs.now)
            else:
                self._shrink(role, -change, decision.reason, obs.now)

    def _grow(self, role: str, n: int, why: str, now: float) -> None:
        event = ScalingEvent(now, role, n, why)
        for _ in range(n):
            event.instances.append(self.pools.launch(role).name)
        self.events.append(event)
        self._call(lambda: self.router.core.scaling_events.update({(role, "up"): n}))
        self.pools.request_capacity()
        self.log(f"autoscaler: + {n} {role} ({', '.join(event.instances)}): {why}")

    def _shrink(self, role: str, n: int, why: str, now: float) -> None:
        views = self._call(lambda: [(v.active, v.name) for v in self.router.core.views.values()
                                    if v.role == role and not v.dead and not v.draining])
        victims = [name for _, name in sorted(views)[:n]]   # the least busy go
        if not victims:
            return
        event = ScalingEvent(now, role, -len(victims), why, victims)
        self.events.append(event)
        self._call(lambda: self.router.core.scaling_events.update({(role, "down"): len(victims)}))
        for name in victims:
            event.moved[name] = self._call(lambda name=name: self._drain(name))
            self._draining[name] = (now, event)
        self.log(f"autoscaler: - {len(victims)} {role} ({', '.join(victims)}): {why}")

    def _drain(self, name: str) -> int:
        """(On the router's loop.) Drain `name`; how many live requests that moves off it."""
        core = self.router.core
        moving = sum(1 for st in core.requests.values() if not st.finished and st.decode == name)
        core.drain_instance(name)
        return moving if core.views[name].role != "prefill" else 0

    def _follow_up(self) -> None:
        """Stop drained instances; note when added ones became ready and first got work."""
        now = time.monotonic()
        for name, (since, event) in list(self._draining.items()):
            if self._call(lambda: self.router.core.is_drained(name)) or now - since > DRAIN_TIMEOUT_S:
                self.pools.retire(name)
                self._call(lambda: self.router.core.forget_instance(name))
                event.stopped_at[name] = time.monotonic()
                del self._draining[name]
        ready = {i.name: i.ready_at for i in self.pools.ready_instances()}
        firsts = self._call(lambda: {n: v.first_work_at for n, v in self.router.core.views.items()})
        for event in self.events:
            for name in event.instances if event.change > 0 else ():
                if name in ready and name not in event.ready_at:
                    event.ready_at[name] = ready[name]
                if firsts.get(name) is not None and name not in event.first_work_at:
                    event.first_work_at[name] = firsts[name]
        self.pools.request_capacity()
