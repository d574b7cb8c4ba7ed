"""`pdcluster bench serve --endpoint`'s HTTP load generator (cluster/bench/endpoint.py) against a
scripted OpenAI-compatible server whose timing is known: the first token after TTFT, then one
token every GAP (one of them mid-character, with empty text), a last chunk naming only the
finish reason, the usage, [DONE]. The recorded TTFT, TPOT and output length must be those."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from cluster.bench import endpoint as endpoint_module
from cluster.bench.endpoint import EndpointClient
from cluster.bench.serve import PromptMaker, SweepSpec, run_point, sweep
from cluster.bench.serve_metrics import FAILED, OK, SLO, BenchError, RequestResult
from router.workload import RequestSpec

TTFT, GAP = 0.15, 0.03


def _app(seen: list, metrics: bool = True, refuse: bool = False) -> Starlette:
    async def completions(request: Request):
        body = await request.json()
        seen.append(body)
        if refuse:
            return JSONResponse({"error": {"message": "busy", "type": "x", "param": None, "code": None}}, 429)

        async def events():
            n = body["max_tokens"]
            await asyncio.sleep(TTFT)
            for i in range(n):
                if i:
                    await asyncio.sleep(GAP)
                text = "" if i == 1 else f"t{i}"   # token 1 ends mid-character: no text yet
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def prom(request):
        return PlainTextResponse('vllm:num_requests_running{model_name="scripted"} 0.0\n'
                                 'vllm:num_requests_waiting{model_name="scripted"} 0.0\n')
    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models)]
    if metrics:
        routes.append(Route("/metrics", prom))
    return Starlette(routes=routes)


async def _serve(app, body):
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        return await body(f"http://127.0.0.1:{sock.getsockname()[1]}/v1")
    finally:
        server.should_exit = True
        await task


def test_sse_times_and_lengths_are_what_the_server_streamed():
    seen = []
    specs = [RequestSpec(0.0, 8, 6), RequestSpec(0.05, 5, 1), RequestSpec(0.1, 3, 10)]

    async def body(url):
        client = EndpointClient(url)
        assert await client.resolve_model() == "scripted"
        try:
            return await run_point(client, specs, PromptMaker(100, [0], seed=1), 30, progress=False)
        finally:
            await client.close()
    results, _ = asyncio.run(_serve(_app(seen), body))
    for r, s in zip(results, specs):
        assert r.status == OK and r.n_out == s.output_tokens and r.finish_reason == "length", r
        assert TTFT <= r.ttft_s < TTFT + 0.1
        if s.output_tokens > 1:
            assert GAP <= r.tpot_s < GAP + 0.03
        assert r.send_lag_s < 0.05
    # the same prompts as the gRPC path: token ids of the drawn length, output forced by ignore_eos
    assert sorted(len(b["prompt"]) for b in seen) == [3, 5, 8]
    assert all(b["ignore_eos"] and b["stream"] and b["temperature"] == 0 and b["model"] == "scripted"
               and b["stream_options"] == {"include_usage": True} for b in seen)


def test_refused_requests_fail_and_a_sweep_waits_on_the_servers_metrics(monkeypatch):
    async def body(url):
        client = EndpointClient(url, model="scripted")
        r = RequestResult(0, 0.0, 4, 4)
        await client.send(r, [1, 2, 3, 4], asyncio.get_running_loop().time(), lambda: None)
        await client.close()
        return r
    r = asyncio.run(_serve(_app([], refuse=True), body))
    assert r.status == FAILED and "HTTP 429" in r.error

    monkeypatch.setattr(endpoint_module, "IDLE_PAUSE_S", 0.01)
    spec = SweepSpec("code", (4.0,), 3, SLO(10, 1), warmup=1, time_limit_s=30)

    async def swept(url):
        return await sweep(url, spec, PromptMaker(100, [0]), "scripted", progress=False, log=lambda m: None,
                           client=EndpointClient(url, model="scripted"))
    for metrics in (True, False):   # idle from vllm:num_requests_*, or after a pause without /metrics
        result = asyncio.run(_serve(_app([], metrics=metrics), swept))
        [point] = result["points"]
        assert point["counts"][OK] == 3 and point["idle_after"] and result["goodput"] == 4.0


def test_an_endpoint_must_be_an_http_url():
    with pytest.raises(BenchError, match="--endpoint must be an http"):
        EndpointClient("127.0.0.1:8000")
