"""Both front doors of a real router (gRPC and HTTP servers on 127.0.0.1) with no worker behind it:
the bearer token, TLS and mutual TLS, malformed messages, the per-request limits through both
fronts, and the status codes of the core's refusals (429, 503).

The router's links to its instances are a stand-in that accepts every command and never
answers: an admitted request waits, which is what the overload (429) and cancellation checks
need. Generation itself is tested against real clusters (tests/integration/test_front_door.py).
"""
from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import Client, InvalidRequest, Overloaded, Unauthenticated, Unavailable
from cluster.config import load_config
from engine.default_model import default_model_path
from engine.errors import ConfigError
from engine.tokenizer import load_tokenizer
from protos import pdcluster_pb2 as pb
from router.admission import ModelInfo
from router.server import InstanceInfo, Router
from tests.certs import make_certs

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class SilentLinks:
    """Instances that take every command and never answer."""

    def connect(self, name, endpoint) -> None:
        pass

    def disconnect(self, name) -> None:
        pass

    def send(self, name, msg) -> bool:
        return True

    async def recv(self):
        await asyncio.sleep(3600)


class RunningRouter:
    """A Router on its own loop thread (as the cluster runs it), started and stopped from the test."""

    def __init__(self, tokenizer, instances: bool = True, **router_keys) -> None:
        self.cfg = load_config(None, {"router": {"port": 0, "http_port": 0, "request_timeout_s": 60, **router_keys}})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        model = ModelInfo(default_model_path(), vocab_size=49152, max_model_len=2048, num_blocks=1000,
                          block_size=16, transfer_backend="shm")
        self.router = Router(self.cfg.router, model, tokenizer, SilentLinks())
        if instances:
            for role in ("prefill", "decode"):
                self.router.add_instance(InstanceInfo(f"{role}-0", role, "tp1-pp1", f"inproc://{role}"))
        self.run(self.router.start())
        self.grpc = f"127.0.0.1:{self.router.port}"
        scheme = "https" if self.cfg.router.tls else "http"
        self.http = f"{scheme}://127.0.0.1:{self.router.http_port_bound}"

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.router.stop(0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def router(request, tokenizer):
    r = RunningRouter(tokenizer, **getattr(request, "param", {}))
    yield r
    r.close()


def _ssl(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def _completion(http: httpx.Client, base: str, body: dict, headers=None) -> httpx.Response:
    return http.post(f"{base}/v1/completions", json=body, headers=headers)


# -- the bearer token ----------------------------------------------------------------------------
@pytest.mark.parametrize("router", [{"auth_token": TOKEN}], indirect=True)
def test_the_token_is_required_on_every_http_endpoint_but_health(router):
    with httpx.Client(timeout=10) as http:
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/models"), ("GET", "/metrics")):
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}):
                r = http.request(method, router.http + path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (path, headers, r.text)
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
                assert r.headers["www-authenticate"] == "Bearer"
        assert http.get(router.http + "/health").status_code == 200
        assert http.get(router.http + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        assert http.get(router.http + "/metrics", headers=AUTH).status_code == 200
        # the right token passes auth; then the request waits on the silent instances (timeout here)
        with pytest.raises(httpx.ReadTimeout):
            http.post(router.http + "/v1/completions", json={"prompt": "x"}, headers=AUTH, timeout=0.5)


@pytest.mark.parametrize("router", [{"auth_token": TOKEN}], indirect=True)
def test_the_token_is_required_on_generation_and_admin_rpcs_but_not_health(router):
    for token in (None, "wrong"):
        with Client(router.grpc, timeout_s=10, token=token) as c:
            with pytest.raises(Unauthenticated, match="UNAUTHENTICATED"):
                c.state()
            with pytest.raises(Unauthenticated):
                c.abort("nothing")
            with pytest.raises(Unauthenticated):
                c.complete("hi", max_tokens=2)
    with Client(router.grpc, timeout_s=10, token=TOKEN) as c:
        assert len(c.state().instances) == 2 and c.abort("nothing") is False
    with grpc.insecure_channel(router.grpc) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_the_token_comes_from_the_environment_when_the_yaml_has_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PDCLUSTER_AUTH_TOKEN", "from-env")
    assert load_config(None).router.auth_token == "from-env"
    assert load_config(None, {"router": {"auth_token": "from-yaml"}}).router.auth_token == "from-yaml"
    monkeypatch.setenv("PDCLUSTER_AUTH_TOKEN", "")
    assert load_config(None).router.auth_token is None
    with pytest.raises(ConfigError, match=r"router\.auth_token"):
        load_config(None, {"router": {"auth_token": "has space"}})


# -- malformed messages ------------------------------------------------------------------------------
def test_bytes_that_are_no_message_get_invalid_argument_not_unknown(router):
    with grpc.insecure_channel(router.grpc) as ch:
        # a broken varint, a field longer than the bytes left, invalid UTF-8 in a string field
        broken, short, bad_utf8 = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"
        for method, streaming, junks in (("/pdcluster.v1.Generation/Generate", True, (broken, short, bad_utf8)),
                                         ("/pdcluster.v1.Generation/Abort", False, (broken, short, bad_utf8)),
                                         ("/pdcluster.v1.Admin/GetClusterState", False, (broken, short))):
            make = ch.unary_stream if streaming else ch.unary_unary
            call = make(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            for junk in junks:
                with pytest.raises(grpc.RpcError) as e:
                    result = call(junk, timeout=10)
                    list(result) if streaming else None
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, junk, e.value.details())
                assert "not a valid message" in e.value.details()


# -- TLS -----------------------------------------------------------------------------------------------
def test_tls_on_both_fronts_with_a_test_ca(tokenizer, certs):
    r = RunningRouter(tokenizer, tls_cert=certs.server_cert, tls_key=certs.server_key, auth_token=TOKEN)
    try:
        with Client(r.grpc, timeout_s=10, ca_cert=certs.ca, token=TOKEN) as c:
            assert len(c.state().instances) == 2
        with httpx.Client(verify=_ssl(certs.ca), timeout=10) as http:
            assert http.get(r.http + "/v1/models", headers=AUTH).status_code == 200
            assert http.get(r.http + "/v1/models").status_code == 401   # TLS does not replace the token
        # plain text to the TLS ports: a clear client error, and the router keeps serving
        with Client(r.grpc, timeout_s=10, token=TOKEN) as plain:
            with pytest.raises(Unavailable):
                plain.state()
        with httpx.Client(timeout=10) as http:
            with pytest.raises(httpx.TransportError):
                http.get(r.http.replace("https://", "http://") + "/v1/models", headers=AUTH)
        # a client that trusts another CA refuses the server
        with Client(r.grpc, timeout_s=10, ca_cert=certs.other_ca, token=TOKEN) as wrong:
            with pytest.raises(Unavailable):
                wrong.state()
        with httpx.Client(verify=_ssl(certs.other_ca), timeout=10) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                http.get(r.http + "/health")
        with Client(r.grpc, timeout_s=10, ca_cert=certs.ca, token=TOKEN) as c:
            assert len(c.state().instances) == 2
        with httpx.Client(verify=_ssl(certs.ca), timeout=10) as http:
            assert http.get(r.http + "/health").status_code == 200
    finally:
        r.close()


def test_mutual_tls_asks_every_client_for_a_certificate(tokenizer, certs):
    r = RunningRouter(tokenizer, tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)
    try:
        with Client(r.grpc, timeout_s=10, ca_cert=certs.ca, client_cert=certs.client_cert,
                    client_key=certs.client_key) as c:
            assert len(c.state().instances) == 2
        with Client(r.grpc, timeout_s=10, ca_cert=certs.ca) as anonymous:
            with pytest.raises(Unavailable):
                anonymous.state()
        with httpx.Client(verify=_ssl(certs.ca, certs.client_cert, certs.client_key), timeout=10) as http:
            assert http.get(r.http + "/v1/models").status_code == 200
        with httpx.Client(verify=_ssl(certs.ca), timeout=10) as http:
            with pytest.raises(httpx.TransportError):
                http.get(r.http + "/v1/models")
    finally:
        r.close()


def test_tls_config_needs_both_files(certs):
    with pytest.raises(ConfigError, match=r"router\.tls_cert is set but router\.tls_key is not"):
        load_config(None, {"router": {"tls_cert": certs.server_cert}})
    with pytest.raises(ConfigError, match=r"router\.tls_key: file '/nope.key' does not exist"):
        load_config(None, {"router": {"tls_cert": certs.server_cert, "tls_key": "/nope.key"}})
    with pytest.raises(ConfigError, match=r"router\.tls_client_ca needs"):
        load_config(None, {"router": {"tls_client_ca": certs.ca}})
    with pytest.raises(ValueError, match="client_cert and client_key"):
        Client("127.0.0.1:1", client_cert=certs.client_cert)


# -- refusals: the same path, the same message, each front's status code ---------------------------------
@pytest.mark.parametrize("router", [{"max_prompt_tokens": 8, "max_tokens_limit": 10, "max_stop_strings": 1}],
                         indirect=True)
def test_limits_refuse_alike_on_both_fronts(router):
    long_prompt = "one two three four five six seven eight nine ten eleven"
    cases = [({"prompt": long_prompt}, {"prompt": long_prompt}, "router.max_prompt_tokens"),
             ({"prompt": "hi", "max_tokens": 11}, {"prompt": "hi", "max_tokens": 11}, "router.max_tokens_limit"),
             ({"prompt": "hi", "stop": ["a", "b"]}, {"prompt": "hi", "stop": ["a", "b"]}, "router.max_stop_strings"),
             ({"prompt": "hi", "top_p": 0}, {"prompt": "hi", "top_p": 0.0}, "top_p must be")]
    with httpx.Client(timeout=10) as http, Client(router.grpc, timeout_s=10) as c:
        for body, kwargs, words in cases:
            r = _completion(http, router.http, body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            with pytest.raises(InvalidRequest) as e:
                c.complete(**kwargs)
            assert e.value.message == r.json()["error"]["message"]


@pytest.mark.parametrize("router", [{"max_active_requests": 1}], indirect=True)
def test_overload_is_429_and_resource_exhausted_and_a_left_stream_frees_its_slot(router):
    with httpx.Client(timeout=10) as http, Client(router.grpc, timeout_s=10) as c:
        with http.stream("POST", router.http + "/v1/completions", json={"prompt": "hi", "stream": True}) as held:
            assert held.status_code == 200 and held.headers["content-type"].startswith("text/event-stream")
            r = _completion(http, router.http, {"prompt": "hi"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
            with pytest.raises(Overloaded):
                c.complete("hi", max_tokens=2)
        # the client left the stream: its request ends and the slot is free again
        deadline = time.monotonic() + 10
        while router.router.core.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not router.router.core.requests


def test_no_instance_is_503_and_unavailable(tokenizer):
    r = RunningRouter(tokenizer, instances=False)
    try:
        with httpx.Client(timeout=10) as http, Client(r.grpc, timeout_s=10) as c:
            resp = http.post(r.http + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 503 and "no live prefill instance" in resp.json()["error"]["message"]
            assert http.get(r.http + "/health").status_code == 503
            with pytest.raises(Unavailable, match="no live prefill instance"):
                c.complete("hi")
    finally:
        r.close()


def test_http_errors_keep_openai_shape(router):
    with httpx.Client(timeout=10) as http:
        for r in (http.post(router.http + "/v1/completions", content=b"{not json"),
                  http.get(router.http + "/v1/nothing"),
                  http.delete(router.http + "/v1/completions"),
                  http.post(router.http + "/v1/completions", content=b"x" * (4 * 1024 * 1024 + 1)),
                  _completion(http, router.http, {"prompt": "x", "model": "gpt-4"})):
            err = r.json()["error"]
            assert 400 <= r.status_code < 500 and set(err) == {"message", "type", "param", "code"}, r.text
        assert _completion(http, router.http, {"prompt": "x", "model": "gpt-4"}).status_code == 404
        json.dumps(http.get(router.http + "/v1/models").json())


def test_two_routers_in_one_process_keep_their_own_metrics(tokenizer):
    a, b = RunningRouter(tokenizer), RunningRouter(tokenizer)
    try:
        with httpx.Client(timeout=10) as http:
            for r in (a, b):
                assert "pdcluster:time_to_first_token_seconds_count" in http.get(r.http + "/metrics").text
        assert a.router.metrics.registry is not b.router.metrics.registry
    finally:
        a.close()
        b.close()


def test_config_checks_the_http_port():
    assert load_config(None).router.http_port == 8000
    assert load_config(None, {"router": {"http_port": None}}).router.http_port is None
    with pytest.raises(ConfigError, match=r"router\.http_port must be in"):
        load_config(None, {"router": {"http_port": 70000}})
    with pytest.raises(ConfigError, match=r"router\.http_port and router\.port"):
        load_config(None, {"router": {"http_port": 7000, "port": 7000}})


def test_a_router_without_http_serves_grpc_only(tokenizer):
    r = RunningRouter(tokenizer, http_port=None)
    try:
        assert r.router.http_port_bound is None
        with Client(r.grpc, timeout_s=10) as c:
            assert len(c.state().instances) == 2
    finally:
        r.close()


def test_a_message_with_every_field_set_passes_the_guard(router):
    req = pb.GenerateRequest(request_id="", prompt=b"hi", sampling=pb.SamplingParams(max_tokens=1))
    with grpc.insecure_channel(router.grpc) as ch:
        call = ch.unary_stream("/pdcluster.v1.Generation/Generate", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:   # admitted, then it waits on the silent instances
            list(call(req, timeout=0.5))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
