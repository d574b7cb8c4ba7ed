"""One prefill + one decode instance of the default model, through real Ray and gRPC."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from cluster.client import Client, InvalidRequest
from cluster.local import Cluster
from engine import SamplingParams
from tests.helpers import hf_greedy
from tests.integration.conftest import all_blocks_free, stop_and_check_nothing_left, cluster_config, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW = 16
PROMPTS = [
    "The capital of France is",
    "Hi",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "The history of the printing press begins in the fifteenth century. " * 12 + "In short,",
]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(cluster_config(), log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout_s=120) as c:
        yield c


def test_greedy_is_token_identical_to_engine_and_transformers(client, llm):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(llm.model_config.path, dtype=torch.float32).eval()
    ours = [client.complete(p, max_tokens=MAX_NEW, temperature=0.0) for p in PROMPTS]
    engine_outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for prompt, got, want in zip(PROMPTS, ours, engine_outs):
        ids = llm.tokenizer.encode(prompt)
        assert got.prompt_tokens == len(ids)
        assert got.token_ids == want.token_ids == hf_greedy(hf, ids, MAX_NEW)[:len(got.token_ids)]
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
    assert max(len(llm.tokenizer.encode(p)) for p in PROMPTS) > 100   # several KV blocks moved
    assert ours[0].text.strip().startswith("Paris")


def test_prefill_and_decode_run_on_different_instances(client, cluster):
    r = client.complete("Tell me a story about a robot.", max_tokens=8, temperature=0.0, ignore_eos=True)
    assert r.prefill_instance == "prefill-0" and r.decode_instance == "decode-0"
    assert cluster.infos[r.prefill_instance]["pid"] != cluster.infos[r.decode_instance]["pid"]
    m = r.metrics
    assert m["prefill_s"] > 0 and m["transfer_s"] > 0 and m["decode_s"] > 0
    assert 0 < m["ttft_s"] <= m["e2e_s"] and m["mean_tpot_s"] > 0


def test_chat_messages_get_the_template(client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.complete(messages=messages, max_tokens=24, temperature=0.0)
    want = llm.chat(messages, SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert r.token_ids == want.token_ids and r.finish_reason == "eos"
    assert "Paris" in r.text


def test_32_concurrent_streams_of_mixed_lengths_all_complete(client, cluster):
    jobs = [(f"Request {i}: " + "tell me about the sea. " * (1 + i % 7), 4 + (i * 5) % 29) for i in range(32)]

    def run(job):
        prompt, n = job
        chunks = list(client.generate(prompt, max_tokens=n, temperature=0.8, seed=7, ignore_eos=True))
        return n, sum(len(c.token_ids) for c in chunks)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, jobs, timeout=300))
    assert all(got == n for n, got in results), results
    assert wait_until(lambda: all_blocks_free(cluster))


def test_client_cancel_mid_stream_frees_blocks_on_both_sides(client, cluster):
    stream = client.generate("Count from one to a thousand:", max_tokens=400, temperature=0.0, ignore_eos=True)
    got = [next(stream) for _ in range(5)]
    assert len(got) == 5
    stats = cluster.worker_stats()
    assert stats["decode-0"]["num_free_blocks"] < stats["decode-0"]["num_blocks"]
    stream.close()   # cancels the gRPC call
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30), cluster.worker_stats()


def test_abort_rpc_ends_the_stream_with_abort(client, cluster):
    chunks, done = [], threading.Event()

    def consume():
        for c in client.generate("Write a long essay.", max_tokens=400, temperature=0.0, ignore_eos=True,
                                 request_id="to-abort"):
            chunks.append(c)
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    assert wait_until(lambda: len(chunks) >= 3, timeout_s=60)
    with Client(cluster.address) as other:
        assert other.abort("to-abort") is True
        assert other.abort("no-such-request") is False
    assert done.wait(60)
    t.join(10)
    assert client.last.finish_reason == "abort" and len(chunks) < 400
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=b"caf\xc3 \xff"), "not valid UTF-8"),
    (dict(token_ids=[1] * 9000), "context"),
    (dict(token_ids=[1, 2, 999999]), "outside the vocabulary"),
    (dict(token_ids=[]), "prompt is empty"),
    (dict(prompt="hi", max_tokens=0), "max_tokens must be > 0"),
    (dict(prompt="hi", max_tokens=-3), "max_tokens must be > 0"),
    (dict(prompt="hi", max_tokens=9000), "exceeds the context"),
    (dict(prompt="hi", temperature=-0.5), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(messages=[]), "messages is empty"),
])
def test_bad_input_is_invalid_argument_naming_the_problem(client, kwargs, needle):
    with pytest.raises(InvalidRequest) as err:
        client.complete(**kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.message


def test_bad_input_does_not_disturb_a_request_in_flight(client, cluster):
    result = {}

    def good():
        result["r"] = client.complete("The capital of France is", max_tokens=24, temperature=0.0, ignore_eos=True)

    t = threading.Thread(target=good)
    t.start()
    with Client(cluster.address) as other:
        for kwargs in (dict(prompt=""), dict(prompt="x", top_p=7.0), dict(prompt=b"\xff")):
            with pytest.raises(InvalidRequest):
                other.complete(**kwargs)
    t.join(120)
    assert len(result["r"].token_ids) == 24 and result["r"].finish_reason == "length"


def test_request_without_input_and_a_duplicate_id_are_rejected(client, cluster):
    from protos import pdcluster_pb2 as pb
    from protos import pdcluster_pb2_grpc as pb_grpc
    with grpc.insecure_channel(cluster.address) as ch:   # the raw stub: the SDK refuses to build these
        stub = pb_grpc.GenerationStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no input" in err.value.details()
    stream = client.generate("Say something long.", max_tokens=300, ignore_eos=True, request_id="dup")
    next(stream)
    with Client(cluster.address) as other:
        with pytest.raises(InvalidRequest) as dup:
            other.complete("hi", request_id="dup")
    assert dup.value.code == grpc.StatusCode.ALREADY_EXISTS and "dup" in dup.value.message
    stream.close()
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30)


def test_admin_state_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with Client(cluster.address) as c:
        state = c.state()
    roles = sorted((i.name, i.role, i.alive, i.plan) for i in state.instances)
    assert roles == [("decode-0", "decode", True, "tp1-pp1"), ("prefill-0", "prefill", True, "tp1-pp1")]
    assert state.transfer_backend == "auto" and state.max_active_requests == 256
    assert all(i.num_blocks > 0 for i in state.instances)
    with grpc.insecure_channel(cluster.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pdcluster.v1.Generation"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"pdcluster.v1.Generation", "pdcluster.v1.Admin", "grpc.health.v1.Health"} <= names


def test_async_client_streams_completes_and_aborts(cluster):
    import asyncio

    from cluster.client import AsyncClient

    async def main():
        client = AsyncClient(cluster.address, timeout_s=120)
        try:
            chunks = [c async for c in client.generate("The capital of France is", max_tokens=6,
                                                       temperature=0.0, ignore_eos=True)]
            whole = await client.complete("The capital of France is", max_tokens=6, temperature=0.0,
                                          ignore_eos=True)
            assert [t for c in chunks for t in c.token_ids] == whole.token_ids and len(whole.token_ids) == 6
            assert "".join(c.text for c in chunks) == whole.text
            long = asyncio.ensure_future(client.complete("Go on and on.", max_tokens=400, ignore_eos=True,
                                                         request_id="async-abort"))
            for _ in range(600):
                if (await client.state()).num_active_requests == 1 and await client.abort("async-abort"):
                    break
                await asyncio.sleep(0.05)
            result = await asyncio.wait_for(long, 120)
            assert result.finish_reason == "abort" and len(result.token_ids) < 400
            with pytest.raises(InvalidRequest):
                await client.complete("", max_tokens=3)
        finally:
            await client.close()

    asyncio.run(main())
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30)
