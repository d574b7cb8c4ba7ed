"""`pdcluster bench serve --endpoint http://HOST:PORT/v1`: the serving benchmark against any
OpenAI-compatible server (ours, vLLM, SGLang, ...), with the same workloads and SLO accounting.

Each request is a streamed `/v1/completions` call whose prompt is the same random token ids
the gRPC path sends (`prompt: [ids]`), with `max_tokens`, `temperature: 0`, `ignore_eos: true`
(vLLM's extension, which ours shares) and `stream_options.include_usage`. The times come from
the server-sent events as they arrive:

  * a chunk *carries output* when its choice has text, or has no finish reason yet (a chunk
    whose text is empty mid-character still marks a token); the trailing chunk that only
    names the finish reason, and the usage chunk, carry none;
  * TTFT is the first such chunk's arrival, the end-to-end time the last one's, both from
    the request's scheduled arrival, as on the gRPC path (serve_metrics.py);
  * the output length is the server's `usage.completion_tokens` (the number of chunks that
    carried output when the server sends no usage).

Between rate points the server is idle when its Prometheus metrics say so (vLLM's
`vllm:num_requests_running` + `_waiting`, our `pdcluster:router_requests`); a server without
them gets a fixed pause.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable

import httpx2 as httpx

from cluster.bench.serve_metrics import CANCELLED, FAILED, OK, BenchError, RequestResult

IDLE_PAUSE_S = 3.0
BUSY_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "pdcluster:router_requests")


class EndpointClient:
    def __init__(self, endpoint: str, model: str | None = None, token: str | None = None,
                 ca_cert: str | None = None, timeout_s: float | None = None) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise BenchError(f"--endpoint must be an http:// or https:// URL ending in /v1, got {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self.root = self.endpoint[:-3] if self.endpoint.endswith("/v1") else self.endpoint
        self.model = model
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
        self._http = httpx.AsyncClient(headers=headers, verify=verify, timeout=httpx.Timeout(timeout_s),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def resolve_model(self) -> str:
        """The model to name in requests: --model, else the first the server lists."""
        if self.model is None:
            r = await self._http.get(self.endpoint + "/models")
            _raise_for(r)
            models = r.json().get("data") or []
            if not models:
                raise BenchError(f"{self.endpoint}/models lists no model: pass --model")
            self.model = models[0]["id"]
        return self.model

    def _body(self, token_ids: list[int], max_tokens: int) -> dict:
        return {"model": self.model, "prompt": token_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def complete(self, token_ids: list[int], max_tokens: int, **_) -> None:
        """One request to its end (the warm-up)."""
        body = self._body(token_ids, max_tokens)
        async with self._http.stream("POST", self.endpoint + "/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                _raise_for(r)
            async for _ in r.aiter_lines():
                pass

    async def send(self, r: RequestResult, ids: list[int], start: float, done: Callable[[], None]) -> None:
        """Send one request at once; fill `r` with what the client saw, timed from its scheduled arrival
        (the HTTP counterpart of cluster.bench.serve._one)."""
        loop = asyncio.get_running_loop()
        scheduled = start + r.arrival_s
        r.send_lag_s = loop.time() - scheduled
        first = last = None
        num_chunks, usage = 0, None
        try:
            async with self._http.stream("POST", self.endpoint + "/completions",
                                         json=self._body(ids, r.output_tokens)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise BenchError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = loop.time()
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise BenchError(f"error event: {str(event['error'])[:200]}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        if choice.get("text") or choice.get("finish_reason") is None:
                            last = now
                            first = first if first is not None else now
                            num_chunks += 1
                        if choice.get("finish_reason") is not None:
                            r.finish_reason = choice["finish_reason"]
            r.n_out = usage["completion_tokens"] if usage else num_chunks
            if first is None or r.finish_reason not in ("length", "stop"):
                r.status, r.error = FAILED, f"finish_reason={r.finish_reason!r}, {r.n_out} tokens"
            else:
                r.status, r.ttft_s, r.e2e_s = OK, first - scheduled, last - scheduled
        except asyncio.CancelledError:
            r.status = CANCELLED
            raise
        except (BenchError, httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as e:
            r.status, r.error = FAILED, f"{type(e).__name__}: {e}"[:300]
        finally:
            done()

    async def wait_idle(self, timeout_s: float = 120.0) -> bool:
        """Until the server's metrics show no request running or waiting (bounded); a server without
        such metrics gets IDLE_PAUSE_S. False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = await self._busy()
            if busy is None:
                await asyncio.sleep(IDLE_PAUSE_S)
                return True
            if busy == 0:
                return True
            await asyncio.sleep(0.2)
        return False

    async def _busy(self) -> float | None:
        try:
            r = await self._http.get(self.root + "/metrics")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines()
                  if line.startswith(BUSY_SERIES) and not line.startswith("#")]
        return sum(values) if values else None

    async def close(self) -> None:
        await self._http.aclose()


def _raise_for(r: httpx.Response) -> None:
    if r.status_code != 200:
        raise BenchError(f"{r.request.method} {r.request.url}: HTTP {r.status_code}: {r.text[:300]}")
