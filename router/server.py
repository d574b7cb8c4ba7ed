"""The gRPC front door: the Generation and Admin services over the router's core.

`Generate` parses the request (one of prompt / messages / token_ids, and the
sampling parameters) through the shared admission path (admission.py), admits
it (core.py), then streams its chunks and final result. A RequestError becomes
the matching status code with the same message. The router also serves
`grpc.health.v1` and server reflection. The request lifecycle, dispatch and
migration are in core.py; this module only speaks gRPC.

`Router.start` also starts what stands beside gRPC on the same loop: the
OpenAI-compatible HTTP API (http_server.py, router.http_port) with the
Prometheus metrics (metrics.py). Both fronts take the same TLS certificate
(tls.py) and bearer token (auth.py; on gRPC the guard interceptor,
grpc_guard.py, checks it and answers INVALID_ARGUMENT to bytes that are not a
message).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from protos import pdcluster_pb2 as pb
from protos import pdcluster_pb2_grpc as pb_grpc
from protos import worker_pb2 as wpb
from router import modes
from router.admission import Admission, ModelInfo, RequestLimits, sampling_message
from router.auth import BearerToken
from router.conditional import ConditionalPolicy
from router.core import InstanceInfo, RouterCore, RouterSettings
from router.front_settings import FrontDoorSettings
from router.errors import RequestError, Status
from router.grpc_guard import GrpcGuard
from router.http_server import HttpFront
from router.links import WorkerLinks
from router.metrics import RouterMetrics
from router.tls import grpc_server_credentials

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["InstanceInfo", "ModelInfo", "Router"]
log = logging.getLogger(__name__)
SERVICES = ("pdcluster.v1.Generation", "pdcluster.v1.Admin")
STATUS_CODES = {Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
                Status.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
                Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
                Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
                Status.INTERNAL: grpc.StatusCode.INTERNAL}


class Settings(RouterSettings, FrontDoorSettings, Protocol):
    """The router's config section (cluster.config.RouterConfig) as the core and the fronts read it."""


class Router(pb_grpc.GenerationServicer, pb_grpc.AdminServicer):
    def __init__(self, settings: Settings, model: ModelInfo, tokenizer: PreTrainedTokenizerBase | None,
                 links: WorkerLinks, mode: str = modes.DISAGGREGATED,
                 conditional: ConditionalPolicy | None = None) -> None:
        """`tokenizer`: None serves token ids only; `mode`: router.modes; `conditional`: the policy
        of router.disaggregation conditional / never."""
        self.settings, self.model = settings, model
        self.core = RouterCore(settings, Admission(model, tokenizer, RequestLimits.from_settings(settings)),
                               links, mode, conditional)
        # the model's id on the HTTP API: router.served_model_name, else its directory's name
        self.served_model_name = (settings.served_model_name or os.path.basename(model.name.rstrip("/"))
                                  or model.name)
        self.metrics = RouterMetrics(self.core, self.served_model_name, model.transfer_backend)
        self.core.observers.append(self.metrics)
        self._server: grpc.aio.Server | None = None
        self._http: HttpFront | None = None
        self._reader: asyncio.Task | None = None
        self.port = 0
        self.http_port_bound: int | None = None   # the HTTP API's port once started (None: not serving)

    # the cluster's handles on the core (called on the router's loop)
    def add_instance(self, info: InstanceInfo) -> None:
        self.core.add_instance(info)

    def instance_died(self, name: str, reason: str, replacing: bool = False) -> None:
        self.core.instance_died(name, reason, replacing)

    @property
    def requests(self) -> dict:
        return self.core.requests

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> int:
        self._reader = asyncio.get_running_loop().create_task(self.core.read_workers())
        server = grpc.aio.server(interceptors=[GrpcGuard(BearerToken(self.settings.auth_token))])
        pb_grpc.add_GenerationServicer_to_server(self, server)
        pb_grpc.add_AdminServicer_to_server(self, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = grpc_server_credentials(self.settings)
        self.port = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"router cannot bind {address}")
        await server.start()
        self._server = server
        if self.settings.http_port is not None:
            self._http = HttpFront(self)
            self.http_port_bound = await self._http.start(self.settings.host, self.settings.http_port)
        return self.port

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new requests, let those in flight finish (bounded), then stop serving."""
        self.core.draining = True
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        deadline = time.monotonic() + drain_timeout_s
        while self.core.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._http is not None:
            await self._http.stop()
            self._http, self.http_port_bound = None, None
        await self._server.stop(grace=1.0)
        self._server = None
        if self._reader is not None:
            self._reader.cancel()

    # -- Generation service ---------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            ids, params = self._parse(request)
            st = self.core.admit(ids, params, sampling_message(params), request.request_id)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RequestError as e:
            await context.abort(STATUS_CODES[e.status], e.message)
        ended = "cancelled"
        try:
            async for response in self.core.stream(st):
                yield response
        except RequestError as e:
            ended = "error"
            await context.abort(STATUS_CODES[e.status], e.message)
        finally:
            self.core.end(st, ended)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.core.abort(request.request_id))

    def _parse(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The request's prompt ids and sampling parameters, checked (InvalidRequestError). An unset
        max_tokens is 16, or less where the context or router.max_tokens_limit leaves less."""
        params = SamplingParams.from_message(request.sampling)
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequestError("request has no input: set prompt, token_ids or messages")
        admission = self.core.admission
        if kind == "token_ids":
            ids = admission.prompt_ids(token_ids=list(request.token_ids.ids))
        elif kind == "prompt":
            try:
                text = request.prompt.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidRequestError(f"prompt is not valid UTF-8: {e.reason} at byte {e.start}") from None
            ids = admission.prompt_ids(prompt=text)
        else:
            ids = admission.prompt_ids(messages=[{"role": m.role, "content": m.content}
                                                 for m in request.messages.messages])
        if not request.sampling.HasField("max_tokens"):
            room = admission.default_max_tokens(len(ids))
            params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room))
        admission.check(ids, params)
        return ids, params

    # -- Admin service -----------------------------------------------------------------
    async def GetClusterState(self, request, context) -> pb.ClusterState:
        core = self.core
        state = pb.ClusterState(num_active_requests=len(core.requests), model=self.model.name,
                                max_active_requests=self.settings.max_active_requests,
                                transfer_backend=self.model.transfer_backend,
                                num_migrations=core.num_migrations, num_instance_deaths=core.num_deaths)
        for v in core.views.values():
            load = v.load or wpb.Load()
            state.instances.append(pb.InstanceState(
                name=v.name, role=v.role, plan=v.plan, num_waiting=load.num_waiting,
                num_running=load.num_running, queued_prompt_tokens=load.queued_prompt_tokens,
                num_free_blocks=load.num_free_blocks, num_blocks=load.num_blocks, num_leases=load.num_leases,
                mean_step_s=load.mean_step_s, num_steps=load.num_steps, alive=not v.dead,
                status=core.instance_status(v)))
        return state
