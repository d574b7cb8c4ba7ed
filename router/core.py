"""The router's request lifecycle, shared by every front door (gRPC, HTTP).

Per request: `admit` (validated input -> RESOURCE_EXHAUSTED / ALREADY_EXISTS or a
RequestState) -> `stream`:
  1. dispatch: the prompt goes to the prefill instance with the fewest queued
     prompt tokens (colocated modes: the least loaded instance) -> PrefillWork;
  2. PREFILLED: the first token streams; the decode instance with the most room
     *now* gets the KV offer (late binding) -> DecodeWork; with stream_layers it
     was bound at the early offer (OFFERED) and pulls while prefill runs;
  3. TOKENS stream until a finish reason, a stop string or the client's ABORT;
  4. the request leaves: `end` aborts it wherever it still is and frees the
     router's counters.

A request survives its workers (request_state.py). When an instance it is on
dies (`instance_died`, from the cluster, which learns it from Ray) or a worker
answers `Failed(retry=True)` (its KV was lost), the request moves: a new
attempt runs prompt + streamed tokens on a live instance, up to
`router.migration_limit` times; past it the request fails UNAVAILABLE saying
why. A request with no live instance to go to waits for one while the cluster
replaces the dead (READY). An instance that fails requests again and again
leaves rotation for a while (breaker.py). The router sees only snapshots and
plain messages; it never reaches into a worker.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from engine.block_manager import blocks_needed, prefix_hashes
from engine.sampling_params import SamplingParams
from protos import pdcluster_pb2 as pb
from protos import worker_pb2 as wpb
from router import modes
from router.admission import Admission
from router.breaker import CircuitBreakers
from router.conditional import ConditionalPolicy, DecodeSide, PrefillSide, stall_budget
from router.detokenizer import Detokenizer
from router.dispatch import InstanceView, pick_colocated, pick_decode, pick_prefill
from router.errors import RequestError, Status
from router.links import WorkerLinks
from router.prefix_index import PrefixIndex
from router.request_state import Event, RequestState

log = logging.getLogger(__name__)
KEEP_DEAD_VIEWS = 16
UNKNOWN_LENGTH_LEFT = 64   # tokens a request without max_tokens is assumed to have left (TPOT headroom)


class RouterSettings(Protocol):
    """What the router reads of its config section (cluster.config.RouterConfig)."""

    host: str
    port: int
    max_active_requests: int
    request_timeout_s: float
    migration_limit: int
    breaker_failures: int
    breaker_cooldown_s: float
    disaggregation: str                 # always | never | conditional (mode disaggregated)


class RequestObserver:
    """Sees every request's progress (metrics, the autoscaler's window): called on the router's
    loop, must not block. A subclass overrides what it needs; the rest do nothing."""

    def admitted(self, st: RequestState, now: float) -> None:
        """It was admitted (it counts as an arrival)."""

    def tokens(self, st: RequestState, num_tokens: int, now: float) -> None:
        """`num_tokens` more streamed at `now` (st.first_token_at tells whether they were the first)."""

    def ended(self, st: RequestState, reason: str, now: float) -> None:
        """The request is over: a finish reason, or "error" / "cancelled" when it did not finish."""

    def migrated(self, st: RequestState, why: str) -> None:
        """It moved to another instance."""


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    role: str                  # prefill | decode | colocated
    plan: str
    command_endpoint: str
    transfer_endpoint: str = ""   # a prefill instance's KV sender address (what its offers name)
    prefix_caching: bool = False  # it keeps computed prompt blocks (*.enable_prefix_caching)


class RouterCore:
    def __init__(self, settings: RouterSettings, admission: Admission, links: WorkerLinks,
                 mode: str = modes.DISAGGREGATED, conditional: ConditionalPolicy | None = None) -> None:
        """`conditional`: the policy for router.disaggregation conditional / never (its model also
        picks the decode instance of a local prefill)."""
        self.settings, self.admission, self.links = settings, admission, links
        self.colocated = modes.is_colocated(mode)
        self.disaggregation = "always" if self.colocated else settings.disaggregation
        if self.disaggregation != "always" and conditional is None:
            raise ValueError(f"router.disaggregation {self.disaggregation} needs a conditional policy")
        self.conditional = conditional
        # KV-aware placement: which instance has seen which prefix (only where the choice uses it)
        self.prefix_index = PrefixIndex() if self.disaggregation != "always" else None
        self._caching: set[str] = set()   # instances with a prefix cache: only they have overlap
        self.first_role = "colocated" if self.colocated else "prefill"
        self.views: dict[str, InstanceView] = {}
        self.requests: dict[str, RequestState] = {}
        self._by_worker_id: dict[str, RequestState] = {}
        self.breakers = CircuitBreakers(settings.breaker_failures, settings.breaker_cooldown_s)
        self._replacing: Counter[str] = Counter()   # role -> dead instances the cluster is replacing
        self._ids = itertools.count()
        self.draining = False
        self.num_migrations = 0
        self.num_deaths = 0
        self.scaling_events: Counter[tuple[str, str]] = Counter()   # (role, "up" | "down") -> instances
        self.num_local_prefills = 0        # attempts prefilled on their decode instance (conditional)
        self.observers: list[RequestObserver] = []

    # -- instances -----------------------------------------------------------------------
    def add_instance(self, info: InstanceInfo) -> None:
        """A new instance (or a replacement) whose model is loaded: it takes work from now on."""
        self.links.connect(info.name, info.command_endpoint)
        self.views[info.name] = InstanceView(info.name, info.role, info.plan, last_seen=time.monotonic(),
                                             transfer_endpoint=info.transfer_endpoint)
        if info.prefix_caching:
            self._caching.add(info.name)
        if self._replacing[info.role] > 0:
            self._replacing[info.role] -= 1
        dead = [n for n, v in self.views.items() if v.dead]
        for name in dead[:-KEEP_DEAD_VIEWS]:   # the cluster's state shows the latest deaths only
            self.forget_instance(name)
        for st in list(self.requests.values()):
            if st.waiting_for_instance:
                st.post(Event.READY, info.name, None, any_attempt=True)

    def instance_died(self, name: str, reason: str, replacing: bool = False) -> None:
        """The cluster saw the instance's process (or one of its ranks) die: its requests move."""
        view = self.views.get(name)
        if view is None or view.dead:
            return
        view.dead, view.available = True, False
        self.num_deaths += 1
        if self.prefix_index is not None:
            self.prefix_index.forget(name)
        self._caching.discard(name)
        self.links.disconnect(name)
        self.breakers.forget(name)
        if replacing:
            self._replacing[view.role] += 1
        log.warning("instance %s died (%s); %s", name, reason,
                    "a replacement is starting" if replacing else "no replacement")
        if view.role == "prefill" and view.transfer_endpoint:   # pulls from it fail now, not on timeouts
            lost = wpb.ToWorker(peer_lost=wpb.PeerLost(endpoint=view.transfer_endpoint))
            for v in self.views.values():
                if v.role == "decode" and not v.dead:
                    self.links.send(v.name, lost)
        why = f"instance {name} died ({reason})"
        for st in list(self.requests.values()):
            if not st.finished and self._lost_on(st, name):
                st.post(Event.LOST, name, why)

    @staticmethod
    def _lost_on(st: RequestState, name: str) -> bool:
        """Does the current attempt need `name`? Its decode instance, or its prefill instance
        until a decode instance has the KV offer (after that, a dead prefill instance is the
        decode side's business: PeerLost, then transfer.on_failure)."""
        if name == st.decode:
            return True
        return name == st.prefill and (not st.prefill_done or st.pending_decode is not None)

    def replacement_abandoned(self, role: str) -> None:
        """The cluster gave up a replacement it announced (it failed to start, or the restart
        budget is spent): requests stop waiting for it once no other instance can come."""
        if self._replacing[role] > 0:
            self._replacing[role] -= 1
        if not self.has_capacity_coming(role):
            for st in self.requests.values():
                if st.waiting_for_instance:
                    st.post(Event.READY, "", None, any_attempt=True)

    def drain_instance(self, name: str) -> None:
        """Take an instance out of rotation for good (the autoscaler removes it): no new work;
        requests decoding there move now (prompt + streamed tokens, elsewhere), so it empties
        in one step instead of at its longest request's end. A prefill instance finishes the
        prompts it has."""
        view = self.views.get(name)
        if view is None or view.draining:
            return
        view.draining, view.available = True, False
        if view.role == "prefill":
            return
        for st in list(self.requests.values()):
            if not st.finished and st.decode == name:
                st.post(Event.LOST, name, f"instance {name} is being removed", planned=True)

    def is_drained(self, name: str) -> bool:
        """Nothing of ours is left on it (what its last snapshot says agrees)."""
        view = self.views.get(name)
        if view is None or view.dead:
            return True
        load = view.load
        return view.active == 0 and (load is None or load.num_waiting + load.num_running + load.num_leases == 0)

    def forget_instance(self, name: str) -> None:
        """A dead or removed instance's view goes (after `instance_died`, once it is cleaned up)."""
        self.views.pop(name, None)
        self.breakers.forget(name)

    def _available(self) -> list[InstanceView]:
        now = time.monotonic()
        for v in self.views.values():
            v.available = not v.dead and not v.draining and self.breakers.available(v.name, now)
        return list(self.views.values())

    def has_capacity_coming(self, role: str) -> bool:
        """Some instance of `role` is alive or being replaced: a request may wait for it."""
        return self._replacing[role] > 0 or any(v.role == role and not v.dead and not v.draining
                                                for v in self.views.values())

    # -- requests ------------------------------------------------------------------------
    def admit(self, ids: list[int], params: SamplingParams, sampling: pb.SamplingParams,
              request_id: str = "") -> RequestState:
        """Checks that need no instance; raises RequestError. The caller must `end` what it gets."""
        if self.draining:
            raise RequestError(Status.UNAVAILABLE, "the router is shutting down")
        req_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if req_id in self.requests:
            raise RequestError(Status.ALREADY_EXISTS, f"request id {req_id!r} is already running")
        if len(self.requests) >= self.settings.max_active_requests:
            raise RequestError(Status.RESOURCE_EXHAUSTED,
                               f"{len(self.requests)} requests in flight, the limit is "
                               f"{self.settings.max_active_requests}; retry later")
        if not self.has_capacity_coming(self.first_role):
            raise RequestError(Status.UNAVAILABLE, f"no live {self.first_role} instance")
        st = RequestState(req_id, list(ids), params, sampling, Detokenizer(self.admission.tokenizer, params.stop),
                          time.monotonic(), block_size=self.admission.model.block_size)
        self.requests[req_id] = st
        for o in self.observers:
            o.admitted(st, st.arrival)
        return st

    def abort(self, req_id: str) -> bool:
        st = self.requests.get(req_id)
        if st is not None and not st.finished:
            st.post(Event.ABORT, "", None, any_attempt=True)
        return st is not None

    async def stream(self, st: RequestState) -> AsyncIterator[pb.GenerateResponse]:
        """The request's chunks and its final result; raises RequestError when it cannot finish."""
        self._dispatch(st)
        timeout = self.settings.request_timeout_s
        while not st.finished:
            try:
                kind, instance, msg, attempt = await asyncio.wait_for(st.events.get(), timeout)
            except asyncio.TimeoutError:
                raise RequestError(Status.UNAVAILABLE, f"request {st.req_id} made no progress for {timeout:.0f}s") \
                    from None
            if attempt is not None and attempt != st.attempt:
                continue   # queued for an attempt that has since moved: its news is stale
            now = time.monotonic()
            if kind is Event.PREFILLED:
                for response in self._prefilled(st, instance, msg, now):
                    yield response
            elif kind is Event.OFFERED:
                self._bind_decode_early(st, msg)
            elif kind is Event.TOKENS:
                if msg.transfer_s:
                    st.transfer_s = msg.transfer_s
                ends = bool(msg.finish_reason)
                yield self._chunk(st, msg.token_ids, now, ends)
                if st.detok.stopped or ends:
                    self.breakers.success(instance)
                    yield self._finish(st, "stop" if st.detok.stopped else msg.finish_reason, now)
            elif kind is Event.FAILED:
                self._failed(st, instance, msg)
            elif kind is Event.LOST:
                if self._lost_on(st, instance):   # (still: its KV may have reached decode meanwhile)
                    self._migrate(st, msg.why, planned=msg.planned)
            elif kind is Event.READY:   # an instance came up (or none can come: then it fails)
                if st.pending_decode is not None:
                    self._send_decode(st, st.pending_decode)
                elif st.waiting_for_instance:
                    self._dispatch(st)
            elif kind is Event.ABORT:
                yield self._finish(st, "abort", now)

    def end(self, st: RequestState, reason: str = "cancelled") -> None:
        """The stream is over (finished, failed: "error", or cancelled): free everything it holds."""
        if st.finish_reason:
            reason = st.finish_reason
        if not st.finished:
            st.finished = True
            self._leave_instances(st)
        if st.req_id in self.requests:
            for o in self.observers:
                o.ended(st, reason, time.monotonic())
        self._release_prefill(st)
        self._release_decode(st)
        self.requests.pop(st.req_id, None)
        self._by_worker_id.pop(st.worker_id, None)

    # -- the steps of one request -----------------------------------------------------------
    def _dispatch(self, st: RequestState) -> None:
        """Send the current attempt to a prefill (or colocated) instance, or to the decode instance
        that will prefill it itself (router.disaggregation), or let it wait for one."""
        st.start_attempt()
        view, local = self._place_prefill(st)
        if view is None:
            if not self.has_capacity_coming(self.first_role):
                raise RequestError(Status.UNAVAILABLE, f"no live {self.first_role} instance for request "
                                                       f"{st.req_id}")
            st.waiting_for_instance = True   # the replacement's add_instance wakes it (READY)
            return
        st.waiting_for_instance = False
        self._by_worker_id[st.worker_id] = st
        st.prefill, st.prefill_done, st.local_prefill = view.name, False, local
        self.num_local_prefills += local
        st.charged_tokens = len(st.attempt_ids)
        view.queued_tokens += st.charged_tokens
        if self.colocated or local:   # both phases here: counted active until the request ends
            st.decode, st.decode_active = view.name, True
        else:
            st.prefill_active = True
        view.active += 1
        self._dispatched_to(view)
        self._note_prefix(view.name, st.attempt_hashes)
        work = wpb.PrefillWork(req_id=st.worker_id, prompt_token_ids=st.attempt_ids, sampling=st.attempt_sampling)
        if not self.links.send(view.name, wpb.ToWorker(prefill=work)):
            st.post(Event.LOST, view.name, f"{view.name} is not reachable")

    def _prefilled(self, st: RequestState, instance: str, done: wpb.PrefillDone, now: float):
        self._release_prefill(st)
        st.prefill_done = True
        st.queue_s, st.prefill_s = done.queue_s, done.prefill_s
        self.breakers.success(instance)
        ends = bool(done.finish_reason)
        yield self._chunk(st, [done.first_token_id], now, ends)
        if ends and st.decode and not self.colocated:   # bound early: free its early pull
            self.links.send(st.decode, wpb.ToWorker(abort=wpb.Abort(req_id=st.worker_id)))
        if self.conditional is not None and not st.local_prefill and done.prefill_s > 0:
            self.conditional.observed_prefill(len(st.attempt_ids), done.prefill_s)
        if st.detok.stopped or ends:
            yield self._finish(st, "stop" if st.detok.stopped else done.finish_reason, now)
        elif not (self.colocated or st.local_prefill):   # else the same instance decodes on
            self._send_decode(st, done)

    def _chunk(self, st: RequestState, token_ids, now: float, final: bool) -> pb.GenerateResponse:
        response = st.chunk(token_ids, now, final=final)
        for o in self.observers:
            o.tokens(st, len(token_ids), now)
        return response

    def _bind_decode(self, st: RequestState) -> InstanceView | None:
        """The decode instance with the most room now, counting a prefix of the prompt it holds
        (not pulled, no new blocks); counted against it until the request ends."""
        bs = self.admission.model.block_size
        need = blocks_needed(len(st.attempt_ids) + 1, bs)
        hashes = st.attempt_hashes
        view = pick_decode(self._available(), need, lambda v: self._overlap(v.name, hashes) // bs)
        if view is not None:
            st.decode, st.decode_blocks, st.decode_active = view.name, need, True
            view.active += 1
            view.assigned_blocks += need
            self._dispatched_to(view)
        return view

    def _place_prefill(self, st: RequestState) -> tuple[InstanceView | None, bool]:
        """(instance, local): where the current attempt is prefilled. Colocated: the least loaded
        instance; disaggregated: the prefill pool (always), its decode instance (never), or
        whichever the conditional policy predicts meets the SLOs better."""
        views = self._available()
        if self.colocated:
            return pick_colocated(views), False
        if self.disaggregation == "always":
            return pick_prefill(views), False
        hashes = st.attempt_hashes
        decodes = [self._decode_side(v, hashes) for v in views if v.role == "decode" and v.available]
        prefills = [] if self.disaggregation == "never" else [
            PrefillSide(v.name, v.queued_tokens, self._overlap(v.name, hashes))
            for v in views if v.role == "prefill" and v.available]
        choice = self.conditional.choose(len(st.attempt_ids), decodes, prefills)
        if choice is None:
            return None, False
        st.placement = choice.reason
        return self.views[choice.instance], choice.local

    def _overlap(self, name: str, hashes: list[int]) -> int:
        """Prompt tokens `name` holds in its prefix cache, as far as the router knows (0 without one)."""
        if self.prefix_index is None or name not in self._caching:
            return 0
        return self.prefix_index.overlap(name, hashes) * self.admission.model.block_size

    def _note_prefix(self, name: str, hashes: list[int]) -> None:
        if self.prefix_index is not None and name in self._caching:
            self.prefix_index.note(name, hashes)

    def _decode_side(self, v: InstanceView, hashes: list[int]) -> DecodeSide:
        """A decode instance as the conditional policy sees it: its batch and KV now (from the
        requests the router has there), its local prefills queued, its measured step speed, and
        how much stall its requests can take: those decoding there and those still being
        prefilled that will decode there (bound to it, or to no decode instance yet), which
        would start decoding while a local prefill's chunks ride on its steps."""
        batch = context = 0
        running, coming = [], []
        for st in self.requests.values():
            if st.finished or st.decode not in (v.name, ""):
                continue
            if st.decode == v.name and st.prefill_done:
                batch += 1
                context += len(st.attempt_ids) + st.num_output_tokens
                running.append(st)
            elif st.prefill:   # being prefilled, or prefilled and waiting for a decode instance
                coming.append(st)
        load = v.load
        factor = 1.0
        if load is not None and load.num_steps > 10 and load.num_running:
            factor = self.conditional.step_factor(load.num_running, context, load.mean_step_s)
        budget = self._stall_budget(running, coming, batch, context, factor, time.monotonic())
        return DecodeSide(v.name, batch, context, max(0, v.queued_tokens), self._overlap(v.name, hashes), factor,
                          budget)

    def _stall_budget(self, running: list[RequestState], coming: list[RequestState], batch: int, context: int,
                      factor: float, now: float) -> float:
        """conditional.stall_budget of one instance's running requests and those coming to it (with
        no token yet), each assumed to run to max_tokens, at the step of all of them together."""
        if not running and not coming:
            return math.inf
        step = self.conditional.latency.decode(batch + len(coming),
                                               context + sum(len(st.attempt_ids) for st in coming)) * factor
        total = lambda st: st.params.max_tokens or st.num_output_tokens + UNKNOWN_LENGTH_LEFT  # noqa: E731
        return stall_budget([*((total(st), st.num_output_tokens,
                                now - st.first_token_at if st.first_token_at is not None else 0.0) for st in running),
                             *((total(st), 0, 0.0) for st in coming)], step, self.conditional.tpot_slo_s)

    def _dispatched_to(self, view: InstanceView) -> None:
        now = time.monotonic()
        self.breakers.dispatched(view.name, now)
        if view.first_work_at is None:   # how long a new instance took to get work (scaling up)
            view.first_work_at = now

    def _bind_decode_early(self, st: RequestState, early: wpb.EarlyOffer) -> None:
        """stream_layers: the prefill lease started before its forward. Bind a decode
        instance now and let it pull layers as they are computed; the DecodeWork that
        follows PrefillDone goes to the same instance and joins that pull."""
        if self.colocated or st.decode or st.prefill_done:
            return
        view = self._bind_decode(st)
        if view is not None:   # with the prompt: a prefix of it cached there is not pulled
            self.links.send(view.name, wpb.ToWorker(prefetch=wpb.EarlyOffer(
                req_id=early.req_id, offer=early.offer, prompt_token_ids=st.attempt_ids)))

    def _send_decode(self, st: RequestState, done: wpb.PrefillDone) -> None:
        view = self.views.get(st.decode) if st.decode else None
        if view is not None and not view.available:   # bound early, gone since: pick again
            self._release_decode(st)
            view = None
        if view is None:
            view = self._bind_decode(st)
        if view is None:
            if not self.has_capacity_coming("decode"):
                raise RequestError(Status.UNAVAILABLE, "no live decode instance")
            # its KV waits under its lease on the prefill instance (a pull that comes after the
            # lease expired fails, and transfer.on_failure decides) until a decode instance is up
            st.pending_decode, st.waiting_for_instance = done, True
            return
        st.pending_decode, st.waiting_for_instance = None, False
        self._note_prefix(view.name, st.attempt_hashes)   # the pulled prompt KV is findable there
        work = wpb.DecodeWork(req_id=st.worker_id, prompt_token_ids=st.attempt_ids, sampling=st.attempt_sampling,
                              first_token_id=done.first_token_id, offer=done.offer)
        if not self.links.send(view.name, wpb.ToWorker(decode=work)):
            st.post(Event.LOST, view.name, f"{view.name} is not reachable")

    def _failed(self, st: RequestState, instance: str, failed: wpb.Failed) -> None:
        view = self.views.get(instance)
        if failed.instance_fault or not failed.retry:
            if view is not None:
                view.num_failed += 1
            self.breakers.failure(instance, time.monotonic())
        if failed.retry:   # sound request, its attempt failed there (a step, its KV lost): move it
            self._migrate(st, f"{instance}: {failed.error}")
            return
        raise RequestError(Status.INTERNAL, f"request {st.req_id} failed: {failed.error}")

    def _migrate(self, st: RequestState, why: str, planned: bool = False) -> None:
        """Run the request again elsewhere: prompt + streamed tokens, the rest of max_tokens.
        `planned`: the cluster moves it (scaling down), which does not use up its migrations."""
        if not planned and st.unplanned_moves >= self.settings.migration_limit:
            raise RequestError(Status.UNAVAILABLE,
                               f"request {st.req_id} could not finish: {why}; it already moved {st.unplanned_moves} "
                               f"time(s), the limit (router.migration_limit) is {self.settings.migration_limit}")
        st.unplanned_moves += not planned
        self._leave_instances(st)
        self._by_worker_id.pop(st.worker_id, None)
        st.attempt += 1
        self.num_migrations += 1
        for o in self.observers:
            o.migrated(st, why)
        log.info("request %s moves (attempt %d, %d tokens streamed): %s", st.req_id, st.attempt,
                 st.num_output_tokens, why)
        self._dispatch(st)

    def _finish(self, st: RequestState, reason: str, now: float) -> pb.GenerateResponse:
        st.finished, st.finish_reason = True, reason
        if st.decode and st.decode in self._caching:   # it keeps the conversation so far
            self._note_prefix(st.decode, prefix_hashes(st.prompt_ids + st.detok.token_ids[:-1],
                                                       self.admission.model.block_size))
        if reason in ("stop", "abort"):
            self._leave_instances(st)
        return st.final(reason, now)

    def _leave_instances(self, st: RequestState) -> None:
        """Abort the current attempt wherever it still runs; release the router's counters."""
        msg = wpb.ToWorker(abort=wpb.Abort(req_id=st.worker_id))
        for name in dict.fromkeys((st.prefill, st.decode)):   # colocated: the same instance, once
            view = self.views.get(name)
            if view is not None and not view.dead:
                self.links.send(name, msg)
        self._release_prefill(st)
        self._release_decode(st)
        st.prefill = st.decode = ""
        st.prefill_done, st.pending_decode, st.waiting_for_instance = False, None, False

    def _release_prefill(self, st: RequestState) -> None:
        view = self.views.get(st.prefill)
        if view is not None:
            view.queued_tokens -= st.charged_tokens
            view.active -= st.prefill_active
        st.charged_tokens, st.prefill_active = 0, False

    def _release_decode(self, st: RequestState) -> None:
        view = self.views.get(st.decode)
        if view is not None:
            view.active -= st.decode_active
        st.decode_active, st.decode_blocks = False, 0

    # -- worker messages -----------------------------------------------------------------
    async def read_workers(self) -> None:
        while True:
            msg = await self.links.recv()
            if msg is not None:
                self.on_worker_message(msg)

    def on_worker_message(self, msg: wpb.FromWorker) -> None:
        view = self.views.get(msg.instance)
        if view is not None:
            view.last_seen = time.monotonic()
            if msg.HasField("load"):
                view.load = msg.load
                view.free_blocks, view.num_blocks = msg.load.num_free_blocks, msg.load.num_blocks
                view.assigned_blocks = 0
        for done in msg.prefilled:
            self._deliver(msg.instance, done.req_id, Event.PREFILLED, done)
        for early in msg.offered:
            self._deliver(msg.instance, early.req_id, Event.OFFERED, early)
        for tokens in msg.tokens:
            self._deliver(msg.instance, tokens.req_id, Event.TOKENS, tokens)
        for failed in msg.failed:
            self._deliver(msg.instance, failed.req_id, Event.FAILED, failed)

    def _deliver(self, instance: str, worker_id: str, kind: Event, msg) -> None:
        """Only to the current attempt, from an instance it is on: a late message of an earlier
        attempt or of an instance it left is dropped."""
        st = self._by_worker_id.get(worker_id)
        if st is not None and not st.finished and instance in (st.prefill, st.decode):
            st.post(kind, instance, msg)

    # -- state -------------------------------------------------------------------------------
    def instance_status(self, view: InstanceView) -> str:
        if view.dead:
            return "dead"
        if view.draining:
            return "draining"
        return "out_of_rotation" if self.breakers.is_open(view.name) else "serving"

    def pool_loads(self) -> dict[str, tuple[int, int, float]]:
        """Per role, over its serving instances: (instances, prompt tokens queued for prefill,
        mean fraction of KV blocks in use) — the autoscaler's view of the pools."""
        out: dict[str, tuple[int, int, float]] = {}
        for role in ("colocated",) if self.colocated else ("prefill", "decode"):
            views = [v for v in self.views.values() if v.role == role and not v.dead and not v.draining]
            used = [1 - v.free_blocks / v.num_blocks for v in views if v.num_blocks]
            out[role] = (len(views), sum(max(0, v.queued_tokens) for v in views),
                         sum(used) / len(used) if used else 0.0)
        return out
