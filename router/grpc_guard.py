"""A gRPC server interceptor in front of every service: the bearer token, and bytes that are
not a valid message.

Without it, a request whose bytes do not parse as its message type fails with
UNKNOWN (grpc's answer to a deserializer that raises): the guard parses them
itself and answers INVALID_ARGUMENT naming the message type. With a token
configured, a call without it (or with a wrong one) gets UNAUTHENTICATED before
any servicer runs, on the Generation and Admin services and on reflection;
the health service stays open so that load balancers can probe it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc

from router.auth import BearerToken, refusal

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class _Malformed:
    error: str


class GrpcGuard(grpc.aio.ServerInterceptor):
    def __init__(self, token: BearerToken) -> None:
        self.token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        if self.token.required and not details.method.startswith(OPEN_PREFIXES):
            why = refusal(self.token, _metadata(details.invocation_metadata, "authorization"))
            if why is not None:
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, why)
        if handler.request_streaming:   # reflection only: left as grpc serves it
            return handler
        return _tolerant(handler)


def _metadata(metadata, key: str):
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v
    return None


def _refusing(handler, code: grpc.StatusCode, message: str):
    async def refuse(request, context):
        await context.abort(code, message)
    return _same_kind(handler, refuse, lambda b: b)


def _tolerant(handler):
    """The handler with a request deserializer that never raises: bad bytes reach the behaviour
    as _Malformed, which answers INVALID_ARGUMENT."""
    parse, inner = handler.request_deserializer, handler.unary_unary or handler.unary_stream

    def deserialize(data: bytes):
        try:
            return parse(data) if parse is not None else data
        except Exception as e:   # DecodeError, or invalid UTF-8 in a string field
            return _Malformed(f"the request is not a valid message: {e}")

    if inspect.isasyncgenfunction(inner):
        async def behaviour(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            async for response in inner(request, context):
                yield response
    else:
        async def behaviour(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
    return _same_kind(handler, behaviour, deserialize)


def _same_kind(handler, behaviour, deserialize):
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                  handler.response_streaming)]
    return make(behaviour, request_deserializer=deserialize, response_serializer=handler.response_serializer)
