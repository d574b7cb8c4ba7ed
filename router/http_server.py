"""The OpenAI-compatible HTTP front door, beside gRPC in the router process.

FastAPI routes over the router's core, served by uvicorn as a task on the
router's own asyncio loop (started and stopped by `Router.start` / `stop`):

    POST /v1/completions, /v1/chat/completions   (streamed as server-sent events, or not)
    GET  /v1/models, /metrics (Prometheus), /health

A request goes the same way as a gRPC `Generate`: the body is parsed
(openai_protocol.py), then the shared admission path (admission.py) and
`RouterCore.admit` decide, so both fronts refuse the same requests with the
same messages. A refusal is OpenAI's error shape with the status code of the
core's `Status` (400, 429, 503, 500). With `router.auth_token` set, every
endpoint but /health needs `Authorization: Bearer <token>` (401 without).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from typing import TYPE_CHECKING

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InvalidRequestError
from router.admission import sampling_message
from router.auth import BearerToken, refusal
from router.errors import RequestError, Status
from router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.openai_protocol import ProtocolError, ResponseWriter, error_body, parse_body, sse
from router.request_state import RequestState
from router.tls import uvicorn_ssl_options

if TYPE_CHECKING:
    from router.server import Router

log = logging.getLogger(__name__)
# gRPC refuses messages over 4 MiB by default: the same bound for a body here
MAX_BODY_BYTES = 4 * 1024 * 1024
HTTP_STATUS = {Status.INVALID_ARGUMENT: 400, Status.ALREADY_EXISTS: 409, Status.RESOURCE_EXHAUSTED: 429,
               Status.UNAVAILABLE: 503, Status.INTERNAL: 500}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
               503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or ERROR_CODES.get(status)


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e.message, ERROR_TYPES.get(e.status, "invalid_request_error"), e.code,
                                   e.param), status_code=e.status, headers=headers)


# (async: Starlette runs a plain function handler on a thread)
async def _api_error_response(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


async def _http_exception_response(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(ApiError(e.status_code, str(e.detail)))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=e)
    return error_response(ApiError(500, f"internal error: {type(e).__name__}"))


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, RequestError):
        return ApiError(HTTP_STATUS[e.status], e.message)
    return ApiError(400, str(e), param=e.param if isinstance(e, ProtocolError) else None)


class HttpFront:
    """The HTTP API of one router: its FastAPI app and the uvicorn server that runs it."""

    def __init__(self, router: Router) -> None:
        self.router, self.core = router, router.core
        self.token = BearerToken(router.settings.auth_token)
        self.created = int(time.time())
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # -- the app -------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="pdcluster", docs_url=None, redoc_url=None, openapi_url=None)
        api = APIRouter(dependencies=[Depends(self._authorize)])
        api.add_api_route("/v1/completions", self._completions, methods=["POST"])
        api.add_api_route("/v1/chat/completions", self._chat, methods=["POST"])
        api.add_api_route("/v1/models", self._models, methods=["GET"])
        api.add_api_route("/metrics", self._metrics, methods=["GET"])
        app.include_router(api)
        app.add_api_route("/health", self._health, methods=["GET"])
        app.add_exception_handler(ApiError, _api_error_response)
        app.add_exception_handler(StarletteHTTPException, _http_exception_response)
        app.add_exception_handler(Exception, _internal_error)
        return app

    async def _authorize(self, request: Request) -> None:
        why = refusal(self.token, request.headers.get("authorization"))
        if why is not None:
            raise ApiError(401, why)

    async def _health(self) -> Response:
        core = self.core
        if core.draining:
            return error_response(ApiError(503, "the router is shutting down"))
        if not core.has_capacity_coming(core.first_role):
            return error_response(ApiError(503, f"no live {core.first_role} instance"))
        return JSONResponse({"status": "ok"})

    async def _models(self) -> JSONResponse:
        r = self.router
        card = {"id": r.served_model_name, "object": "model", "created": self.created, "owned_by": "pdcluster",
                "root": r.model.name, "max_model_len": r.model.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def _metrics(self) -> Response:
        return Response(self.router.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # -- one request ---------------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool) -> Response:
        raw = await _read_body(request)
        req_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            req = parse_body(raw, chat)
            self._check_model(req.model)
            admission = self.core.admission
            ids = admission.prompt_ids(prompt=req.prompt, token_ids=req.token_ids, messages=req.messages)
            params = req.sampling(admission.default_max_tokens(len(ids)))
            admission.check(ids, params)
            st = self.core.admit(ids, params, sampling_message(params), req_id)
        except (InvalidRequestError, RequestError) as e:
            return error_response(_api_error(e))
        writer = ResponseWriter(req_id, self.router.served_model_name, int(time.time()), chat,
                                req.return_token_ids, req.include_usage)
        if req.stream:
            return _RequestStream(self._events(st, writer), lambda: self.core.end(st))
        return await self._collect(st, writer)

    def _check_model(self, model: str | None) -> None:
        names = (self.router.served_model_name, self.router.model.name)
        if model is not None and model not in names:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.router.served_model_name!r}", "model_not_found", "model")

    async def _collect(self, st: RequestState, writer: ResponseWriter) -> Response:
        texts, ids, final, ended = [], [], None, "cancelled"
        try:
            async for resp in self.core.stream(st):
                if resp.HasField("chunk"):
                    texts.append(resp.chunk.text)
                    ids.extend(resp.chunk.token_ids)
                else:
                    final = resp.final
        except RequestError as e:
            ended = "error"
            return error_response(_api_error(e))
        finally:
            self.core.end(st, ended)
        return JSONResponse(writer.response("".join(texts), ids, final.finish_reason, final.prompt_tokens))

    async def _events(self, st: RequestState, writer: ResponseWriter):
        """The SSE stream: a chunk per core chunk, a last one with the finish reason, the usage when
        asked for, then [DONE]; an error after the headers went out is an `error` event."""
        ended = "cancelled"
        try:
            async for resp in self.core.stream(st):
                if resp.HasField("chunk"):
                    yield sse(writer.chunk(resp.chunk.text, resp.chunk.token_ids))
                    continue
                f = resp.final
                yield sse(writer.chunk("", [], f.finish_reason))
                if writer.include_usage:
                    yield sse(writer.usage_chunk(f.prompt_tokens, f.completion_tokens))
            yield sse("[DONE]")
        except RequestError as e:
            ended = "error"
            a = _api_error(e)
            yield sse(error_body(a.message, ERROR_TYPES.get(a.status, "server_error"), a.code))
            yield sse("[DONE]")
        finally:
            self.core.end(st, ended)

    # -- the server ----------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind (0: any free port) and serve; returns the bound port. OSError when it cannot bind."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, **uvicorn_ssl_options(self.router.settings))
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():   # it failed to start: raise its error here
                self._task.result()
                raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")
            await asyncio.sleep(0.01)
        return bound

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("the HTTP server did not stop in 10 s")
        self._server = self._task = None


class _RequestStream(StreamingResponse):
    """A streaming response that ends its request however the response ends: a stream the client
    left before its first byte never runs the generator's `finally`."""

    def __init__(self, content, on_close) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body has {length} bytes; the limit is {MAX_BODY_BYTES}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over the limit of {MAX_BODY_BYTES} bytes")
    return bytes(body)
