"""The global router: an asyncio gRPC server in front of the prefill and decode pools.

Per request (`Generate`): validate -> admit (or RESOURCE_EXHAUSTED) -> send
the prompt to the prefill instance with the fewest queued prompt tokens ->
stream its first token -> pick the decode instance with the most room *now*
(late binding) and forward the KV offer to it -> stream its tokens -> final
message with the phase timings. A request that ends early (client cancel,
`Abort`, stop string, error) sends Abort to every instance it touched, which
frees its blocks there. The router sees only worker snapshots and plain
messages; it never reaches into a worker.

With `transfer.stream_layers` the prefill instance sends an early offer before
its forward pass: the decode instance is bound then (early binding) and pulls
each layer as it is computed; the DecodeWork after the first token goes to it.

In the colocated modes (the baselines) there is one pool whose instances run
both phases: the request goes to the instance with the least load (prompt
tokens still to prefill + requests running), which streams the first token
(PrefillDone, no KV offer) and then the rest; the transfer time stays 0.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.block_manager import blocks_needed
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.validation import validate_request
from protos import pdcluster_pb2 as pb
from protos import pdcluster_pb2_grpc as pb_grpc
from protos import worker_pb2 as wpb
from router.detokenizer import Detokenizer
from router.dispatch import InstanceView, pick_colocated, pick_decode, pick_prefill
from router.links import WorkerLinks
from router import modes
from router.request_state import Event, RequestState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
SERVICES = ("pdcluster.v1.Generation", "pdcluster.v1.Admin")
HEARTBEAT_TIMEOUT_S = 10.0


class RouterSettings(Protocol):
    """What the router reads of its config section (cluster.config.RouterConfig)."""

    host: str
    port: int
    max_active_requests: int
    request_timeout_s: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_model_len: int
    num_blocks: int            # the smallest KV cache of any instance: a request must fit in it
    block_size: int
    transfer_backend: str = ""


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    role: str                  # prefill | decode | colocated
    plan: str
    command_endpoint: str


class Router(pb_grpc.GenerationServicer, pb_grpc.AdminServicer):
    def __init__(self, settings: RouterSettings, model: ModelInfo, tokenizer: PreTrainedTokenizerBase | None,
                 links: WorkerLinks, mode: str = modes.DISAGGREGATED) -> None:
        """`tokenizer`: None serves token ids only; `mode`: router.modes (disaggregated, or
        colocated / colocated_chunked: one pool runs both phases)."""
        self.settings, self.model, self.tokenizer, self.links = settings, model, tokenizer, links
        self.colocated = modes.is_colocated(mode)
        self.views: dict[str, InstanceView] = {}
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self._server: grpc.aio.Server | None = None
        self._reader: asyncio.Task | None = None
        self._draining = False
        self.port = 0

    def add_instance(self, info: InstanceInfo) -> None:
        self.links.connect(info.name, info.command_endpoint)
        self.views[info.name] = InstanceView(info.name, info.role, info.plan, last_seen=time.monotonic())

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> int:
        self._reader = asyncio.get_running_loop().create_task(self._read_workers())
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(self, server)
        pb_grpc.add_AdminServicer_to_server(self, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"router cannot bind {self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        return self.port

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new requests, let those in flight finish (bounded), then stop serving."""
        self._draining = True
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        deadline = time.monotonic() + drain_timeout_s
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._server.stop(grace=1.0)
        self._server = None
        if self._reader is not None:
            self._reader.cancel()

    # -- Generation service ---------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        try:
            ids, params = self._parse(request)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        req_id = request.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if req_id in self.requests:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {req_id!r} is already running")
        if len(self.requests) >= self.settings.max_active_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{len(self.requests)} requests in flight, the limit is "
                                f"{self.settings.max_active_requests}; retry later")
        if self.colocated:
            prefill = pick_colocated(self._live_views())
        else:
            prefill = pick_prefill(self._live_views())
        if prefill is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no live {'colocated' if self.colocated else 'prefill'} instance")
        st = RequestState(req_id, ids, params, Detokenizer(self.tokenizer, params.stop), time.monotonic())
        self.requests[req_id] = st
        try:
            self._send_prefill(st, prefill, request.sampling)
            async for response in self._stream(st, request.sampling, context):
                yield response
        finally:
            self._end(st)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        st = self.requests.get(request.request_id)
        if st is not None and not st.finished:
            st.events.put_nowait((Event.ABORT, None))
        return pb.AbortResponse(found=st is not None)

    # -- Admin service -----------------------------------------------------------------
    async def GetClusterState(self, request, context) -> pb.ClusterState:
        now = time.monotonic()
        state = pb.ClusterState(num_active_requests=len(self.requests), model=self.model.name,
                                max_active_requests=self.settings.max_active_requests,
                                transfer_backend=self.model.transfer_backend)
        for v in self.views.values():
            load = v.load or wpb.Load()
            state.instances.append(pb.InstanceState(
                name=v.name, role=v.role, plan=v.plan, num_waiting=load.num_waiting,
                num_running=load.num_running, queued_prompt_tokens=load.queued_prompt_tokens,
                num_free_blocks=load.num_free_blocks, num_blocks=load.num_blocks, num_leases=load.num_leases,
                mean_step_s=load.mean_step_s, num_steps=load.num_steps,
                alive=now - v.last_seen < HEARTBEAT_TIMEOUT_S))
        return state

    # -- one request ---------------------------------------------------------------------
    def _parse(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        params = SamplingParams.from_message(request.sampling)
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequestError("request has no input: set prompt, token_ids or messages")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token_ids")
            if kind == "prompt":
                try:
                    text = request.prompt.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidRequestError(f"prompt is not valid UTF-8: {e.reason} at byte {e.start}") from None
                if not text:
                    raise InvalidRequestError("prompt is empty")
                ids = self.tokenizer.encode(text)
            else:
                ids = self._chat_ids(request.messages.messages)
        validate_request(ids, params, self.model.vocab_size, self.model.max_model_len,
                         self.model.num_blocks, self.model.block_size)
        return ids, params

    def _chat_ids(self, messages) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages is empty")
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template: send a prompt or token_ids")
        for i, m in enumerate(messages):
            if not m.role:
                raise InvalidRequestError(f"messages[{i}].role is empty")
        convo = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        except Exception as e:   # the template rejects the conversation (jinja raises its own errors)
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def _stream(self, st: RequestState, sampling: pb.SamplingParams, context):
        timeout = self.settings.request_timeout_s
        while not st.finished:
            try:
                kind, msg = await asyncio.wait_for(st.events.get(), timeout)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"request {st.req_id} made no progress for {timeout:.0f}s")
            now = time.monotonic()
            if kind is Event.PREFILLED:
                self._release_prefill(st)
                st.queue_s, st.prefill_s = msg.queue_s, msg.prefill_s
                ends = bool(msg.finish_reason)
                yield st.chunk([msg.first_token_id], now, final=ends)
                if ends and st.decode and not self.colocated:   # bound early: free its early pull
                    self.links.send(st.decode, wpb.ToWorker(abort=wpb.Abort(req_id=st.req_id)))
                if st.detok.stopped or ends:
                    yield self._finish(st, "stop" if st.detok.stopped else msg.finish_reason, now)
                elif self.colocated:
                    continue   # the same instance decodes on: its tokens follow
                elif not self._send_decode(st, msg, sampling):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "no live decode instance")
            elif kind is Event.OFFERED:
                self._bind_decode_early(st, msg)
            elif kind is Event.TOKENS:
                if msg.transfer_s:
                    st.transfer_s = msg.transfer_s
                ends = bool(msg.finish_reason)
                yield st.chunk(msg.token_ids, now, final=ends)
                if st.detok.stopped or ends:
                    yield self._finish(st, "stop" if st.detok.stopped else msg.finish_reason, now)
            elif kind is Event.FAILED:
                await context.abort(grpc.StatusCode.INTERNAL, f"request {st.req_id} failed: {msg.error}")
            elif kind is Event.ABORT:
                yield self._finish(st, "abort", now)

    def _finish(self, st: RequestState, reason: str, now: float) -> pb.GenerateResponse:
        st.finished = True
        if reason in ("stop", "abort"):
            self._abort_everywhere(st)
        return st.final(reason, now)

    def _send_prefill(self, st: RequestState, view: InstanceView, sampling: pb.SamplingParams) -> None:
        st.prefill = view.name
        if self.colocated:   # both phases here: counted active until the request ends (`_end`)
            st.decode = view.name
        view.queued_tokens += len(st.prompt_ids)
        view.active += 1
        work = wpb.PrefillWork(req_id=st.req_id, prompt_token_ids=st.prompt_ids, sampling=sampling)
        if not self.links.send(view.name, wpb.ToWorker(prefill=work)):
            st.events.put_nowait((Event.FAILED, wpb.Failed(req_id=st.req_id, error=f"{view.name} is not reachable")))

    def _bind_decode(self, st: RequestState) -> InstanceView | None:
        """The decode instance with the most room now; counted against it until the request ends."""
        need = blocks_needed(len(st.prompt_ids) + 1, self.model.block_size)
        view = pick_decode(self._live_views(), need)
        if view is not None:
            st.decode, st.decode_blocks = view.name, need
            view.active += 1
            view.assigned_blocks += need
        return view

    def _bind_decode_early(self, st: RequestState, early: wpb.EarlyOffer) -> None:
        """stream_layers: the prefill lease started before its forward. Bind a decode
        instance now and let it pull layers as they are computed; the DecodeWork that
        follows PrefillDone goes to the same instance and joins that pull."""
        if self.colocated or st.decode or st.prefill_done:
            return
        view = self._bind_decode(st)
        if view is not None:
            self.links.send(view.name, wpb.ToWorker(prefetch=early))

    def _send_decode(self, st: RequestState, done: wpb.PrefillDone, sampling: pb.SamplingParams) -> bool:
        view = self.views.get(st.decode) if st.decode else None
        if view is not None and not view.alive:   # bound early, gone since: pick again
            view.active -= 1
            st.decode, view = "", None
        if view is None:
            view = self._bind_decode(st)
        if view is None:
            return False
        work = wpb.DecodeWork(req_id=st.req_id, prompt_token_ids=st.prompt_ids, sampling=sampling,
                              first_token_id=done.first_token_id, offer=done.offer)
        if not self.links.send(view.name, wpb.ToWorker(decode=work)):
            st.events.put_nowait((Event.FAILED, wpb.Failed(req_id=st.req_id, error=f"{view.name} is not reachable")))
        return True

    def _live_views(self) -> list[InstanceView]:
        """Instances heard from lately (an idle worker still sends a heartbeat every second)."""
        now = time.monotonic()
        for v in self.views.values():
            v.alive = now - v.last_seen < HEARTBEAT_TIMEOUT_S
        return list(self.views.values())

    def _release_prefill(self, st: RequestState) -> None:
        if not st.prefill_done and st.prefill in self.views:
            view = self.views[st.prefill]
            view.queued_tokens -= len(st.prompt_ids)
            if not self.colocated:
                view.active -= 1
        st.prefill_done = True

    def _abort_everywhere(self, st: RequestState) -> None:
        msg = wpb.ToWorker(abort=wpb.Abort(req_id=st.req_id))
        for name in dict.fromkeys((st.prefill, st.decode)):   # colocated: the same instance, once
            if name:
                self.links.send(name, msg)

    def _end(self, st: RequestState) -> None:
        """The stream is over (finished, failed or cancelled): free everything it holds."""
        if not st.finished:
            st.finished = True
            self._abort_everywhere(st)
        self._release_prefill(st)
        if st.decode in self.views:
            self.views[st.decode].active -= 1
        self.requests.pop(st.req_id, None)

    # -- worker messages -----------------------------------------------------------------
    async def _read_workers(self) -> None:
        while True:
            msg = await self.links.recv()
            if msg is None:
                continue
            view = self.views.get(msg.instance)
            if view is not None:
                view.last_seen = time.monotonic()
                if msg.HasField("load"):
                    view.load = msg.load
                    view.free_blocks, view.num_blocks = msg.load.num_free_blocks, msg.load.num_blocks
                    view.assigned_blocks = 0
            for done in msg.prefilled:
                self._deliver(done.req_id, Event.PREFILLED, done)
            for early in msg.offered:
                self._deliver(early.req_id, Event.OFFERED, early)
            for tokens in msg.tokens:
                self._deliver(tokens.req_id, Event.TOKENS, tokens)
            for failed in msg.failed:
                self._deliver(failed.req_id, Event.FAILED, failed)

    def _deliver(self, req_id: str, kind: Event, msg) -> None:
        st = self.requests.get(req_id)
        if st is not None and not st.finished:
            st.events.put_nowait((kind, msg))
