"""The client SDK: the gRPC API in a few Python calls.

    from cluster import Client
    client = Client("127.0.0.1:50051")
    for chunk in client.generate("The capital of France is", max_tokens=16, temperature=0):
        print(chunk.text, end="", flush=True)
    result = client.complete(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32)
    print(result.text, result.metrics["ttft_s"])

`AsyncClient` has the same methods as coroutines / async iterators. Errors
come back as `ClientError` subclasses carrying the gRPC status and the
server's message (InvalidRequest, Overloaded, Unavailable, Unauthenticated).

A router with TLS and a bearer token (router.tls_cert, router.auth_token):

    client = Client("127.0.0.1:50051", ca_cert="ca.pem", token="...")
    # mutual TLS (router.tls_client_ca): also client_cert="me.pem", client_key="me.key"
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from protos import pdcluster_pb2 as pb
from protos import pdcluster_pb2_grpc as pb_grpc


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class InvalidRequest(ClientError, ValueError):
    """The router rejected the request as given (INVALID_ARGUMENT, ALREADY_EXISTS)."""


class Overloaded(ClientError):
    """RESOURCE_EXHAUSTED: too many requests in flight; retry later."""


class Unavailable(ClientError):
    """The cluster cannot serve now (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL)."""


class Unauthenticated(ClientError, PermissionError):
    """The router wants a (different) bearer token: UNAUTHENTICATED, PERMISSION_DENIED."""


def _error(e: grpc.RpcError) -> ClientError:
    code = e.code()
    kind = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
            grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
            grpc.StatusCode.PERMISSION_DENIED: Unauthenticated}.get(code, Unavailable)
    return kind(code, e.details() or "")


@dataclass(frozen=True)
class Security:
    """How to reach a router: TLS (on with any of tls, ca_cert, client_cert) and a bearer token.

    `ca_cert`: the CA that signed the router's certificate (PEM path or bytes; None: the system's);
    `client_cert` / `client_key`: this client's certificate, for a router that asks for one.
    """
    tls: bool = False
    ca_cert: str | bytes | None = None
    client_cert: str | bytes | None = None
    client_key: str | bytes | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("give both client_cert and client_key, or neither")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca_cert), private_key=_pem(self.client_key),
                                            certificate_chain=_pem(self.client_cert))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


def _pem(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _channel(address: str, security: Security, aio: bool):
    grpc_ns = grpc.aio if aio else grpc
    if security.uses_tls:
        return grpc_ns.secure_channel(address, security.credentials())
    return grpc_ns.insecure_channel(address)


@dataclass(frozen=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)   # queue_s, prefill_s, transfer_s, ttft_s, ...
    prefill_instance: str = ""
    decode_instance: str = ""
    migrations: int = 0             # times it moved to another instance (one died or lost its KV)


def make_request(prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 token_ids: Sequence[int] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] | str = (), ignore_eos: bool = False,
                 request_id: str = "") -> pb.GenerateRequest:
    given = [x is not None for x in (prompt, messages, token_ids)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    sampling = pb.SamplingParams(top_k=top_k, ignore_eos=ignore_eos,
                                 stop=[stop] if isinstance(stop, str) else list(stop))
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if prompt is not None:
        req.prompt = prompt.encode("utf-8", "surrogatepass") if isinstance(prompt, str) else bytes(prompt)
    elif messages is not None:
        req.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids)
    return req


class _Collector:
    def __init__(self) -> None:
        self.text, self.ids, self.final = [], [], None

    def add(self, resp: pb.GenerateResponse) -> Chunk | None:
        if resp.HasField("final"):
            self.final = resp.final
            return None
        self.text.append(resp.chunk.text)
        self.ids.extend(resp.chunk.token_ids)
        return Chunk(tuple(resp.chunk.token_ids), resp.chunk.text)

    def completion(self) -> Completion:
        f = self.final
        t = f.timings
        metrics = {name: getattr(t, name) for name in
                   ("queue_s", "prefill_s", "transfer_s", "decode_s", "ttft_s", "mean_tpot_s", "e2e_s")}
        return Completion(f.request_id, "".join(self.text), self.ids, f.finish_reason, f.prompt_tokens,
                          metrics, f.prefill_instance, f.decode_instance, f.migrations)


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float | None = None, *, tls: bool = False,
                 ca_cert: str | bytes | None = None, client_cert: str | bytes | None = None,
                 client_key: str | bytes | None = None, token: str | None = None) -> None:
        self.address, self.timeout_s = address, timeout_s
        security = Security(tls, ca_cert, client_cert, client_key, token)
        self._md = security.metadata
        self._channel = _channel(address, security, aio=False)
        self._gen = pb_grpc.GenerationStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self.last: Completion | None = None   # the final result of the last finished generate()

    def generate(self, prompt: str | None = None, **kwargs) -> Iterator[Chunk]:
        """Stream chunks of new tokens; afterwards `self.last` holds the final result."""
        collector = _Collector()
        try:
            for resp in self._gen.Generate(make_request(prompt, **kwargs),
                                           timeout=self.timeout_s, metadata=self._md):
                chunk = collector.add(resp)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as e:
            raise _error(e) from None
        self.last = collector.completion()

    def complete(self, prompt: str | None = None, **kwargs) -> Completion:
        for _ in self.generate(prompt, **kwargs):
            pass
        return self.last

    def abort(self, request_id: str) -> bool:
        try:
            return self._gen.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout_s,
                                   metadata=self._md).found
        except grpc.RpcError as e:
            raise _error(e) from None

    def state(self) -> pb.ClusterState:
        try:
            return self._admin.GetClusterState(pb.ClusterStateRequest(), timeout=self.timeout_s or 30,
                                               metadata=self._md)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float | None = None, *, tls: bool = False,
                 ca_cert: str | bytes | None = None, client_cert: str | bytes | None = None,
                 client_key: str | bytes | None = None, token: str | None = None) -> None:
        self.address, self.timeout_s = address, timeout_s
        security = Security(tls, ca_cert, client_cert, client_key, token)
        self._md = security.metadata
        self._channel = _channel(address, security, aio=True)
        self._gen = pb_grpc.GenerationStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)

    async def generate(self, prompt: str | None = None, **kwargs) -> AsyncIterator[Chunk]:
        try:
            async for resp in self._gen.Generate(make_request(prompt, **kwargs),
                                                 timeout=self.timeout_s, metadata=self._md):
                if resp.HasField("chunk"):
                    yield Chunk(tuple(resp.chunk.token_ids), resp.chunk.text)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def stream(self, prompt: str | None = None, **kwargs) -> AsyncIterator[Chunk | Completion]:
        """Chunks as they arrive, then the final `Completion` (for callers that time the chunks)."""
        collector = _Collector()
        try:
            async for resp in self._gen.Generate(make_request(prompt, **kwargs),
                                                 timeout=self.timeout_s, metadata=self._md):
                chunk = collector.add(resp)
                if chunk is not None:
                    yield chunk
        except grpc.RpcError as e:
            raise _error(e) from None
        if collector.final is None:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "the stream ended without a final result")
        yield collector.completion()

    async def complete(self, prompt: str | None = None, **kwargs) -> Completion:
        collector = _Collector()
        try:
            async for resp in self._gen.Generate(make_request(prompt, **kwargs),
                                                 timeout=self.timeout_s, metadata=self._md):
                collector.add(resp)
        except grpc.RpcError as e:
            raise _error(e) from None
        return collector.completion()

    async def abort(self, request_id: str) -> bool:
        try:
            return (await self._gen.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout_s,
                                          metadata=self._md)).found
        except grpc.RpcError as e:
            raise _error(e) from None

    async def state(self) -> pb.ClusterState:
        try:
            return await self._admin.GetClusterState(pb.ClusterStateRequest(), timeout=self.timeout_s or 30,
                                                     metadata=self._md)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
