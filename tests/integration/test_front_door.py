"""The front door of a real cluster (1 prefill + 1 decode, Ray, 127.0.0.1), locked with TLS
(a CA made at test time) and a bearer token, driven by the official `openai` client, the SDK,
Prometheus' own parser and hypothesis.

One cluster for the module: the openai client against the gRPC path (greedy and seeded outputs
token for token), auth and plain text refused on both fronts, metrics scraped during a load,
and both fronts fuzzed (every case a 4xx / INVALID_ARGUMENT or a normal answer, never a 5xx /
INTERNAL / UNKNOWN, no worker hurt).
"""
from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cluster.client import Client, InvalidRequest, Unauthenticated, Unavailable
from cluster.local import Cluster
from protos import pdcluster_pb2 as pb
from tests.certs import make_certs
from tests.integration.conftest import all_blocks_free, cluster_config, stop_and_check_nothing_left, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "front-door-test-token"
MAX_TOKENS_LIMIT = 24          # keeps the fuzzers' valid requests short
FUZZ_EXAMPLES = 200            # per front
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the mountains, there lived an old clockmaker who"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def cluster(certs):
    cfg = cluster_config(router={"auth_token": TOKEN, "tls_cert": certs.server_cert, "tls_key": certs.server_key,
                                 "max_tokens_limit": MAX_TOKENS_LIMIT, "max_prompt_tokens": 512})
    c = Cluster(cfg, log=lambda *_: None).start()
    yield c
    stop_and_check_nothing_left(c)


@pytest.fixture(scope="module")
def base_url(cluster) -> str:
    return f"https://127.0.0.1:{cluster.router.http_port_bound}"


def _ssl(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


@pytest.fixture(scope="module")
def oai(base_url, certs):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=TOKEN, max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(verify=_ssl(certs.ca)))
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(oai) -> str:
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def sdk(cluster, certs):
    with Client(cluster.address, timeout_s=120, ca_cert=certs.ca, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def http(base_url, certs):   # (after the cluster: closed before it stops, or TLS shutdown waits on it)
    with httpx.Client(verify=_ssl(certs.ca), timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


# -- the openai client against the gRPC path -------------------------------------------------------
def test_completions_greedy_token_identical_to_grpc_streamed_and_not(oai, sdk, model):
    for prompt in PROMPTS:
        want = sdk.complete(prompt, max_tokens=16, temperature=0.0)
        got = oai.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"return_token_ids": True})
        c = got.choices[0]
        assert _ids(c) == want.token_ids and c.text == want.text, prompt
        assert c.finish_reason == FINISH[want.finish_reason] and got.model == model
        assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.created > 0
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
        assert got.usage.total_tokens == want.prompt_tokens + len(want.token_ids)

        chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"return_token_ids": True}))
        body, usage = chunks[:-1], chunks[-1]
        assert "".join(ch.choices[0].text for ch in body) == want.text
        assert [t for ch in body for t in _ids(ch.choices[0])] == want.token_ids
        assert [ch.choices[0].finish_reason for ch in body][-1] == FINISH[want.finish_reason]
        assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
        assert usage.choices == [] and usage.usage.completion_tokens == len(want.token_ids)
    paris = oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert "Paris" in paris.choices[0].text


def test_chat_streamed_and_not_matches_the_grpc_chat_path(oai, sdk, model):
    want = sdk.complete(messages=CHAT, max_tokens=MAX_TOKENS_LIMIT, temperature=0.0)
    got = oai.chat.completions.create(model=model, messages=CHAT, temperature=0, extra_body={"return_token_ids": True})
    c = got.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text and _ids(c) == want.token_ids
    assert "Paris" in c.message.content and c.finish_reason == FINISH[want.finish_reason]
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == want.prompt_tokens   # same template, same ids
    stream = oai.chat.completions.create(model=model, messages=CHAT, temperature=0, stream=True,
                                         max_completion_tokens=MAX_TOKENS_LIMIT)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == FINISH[want.finish_reason]


def test_seeded_sampling_and_stop_strings_agree_across_fronts(oai, sdk, model):
    want = sdk.complete(PROMPTS[2], max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    got = oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, temperature=0.9, top_p=0.95,
                                 seed=1234, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert _ids(got.choices[0]) == want.token_ids and len(want.token_ids) == 12
    want = sdk.complete(PROMPTS[2], max_tokens=MAX_TOKENS_LIMIT, temperature=0.0, stop=[","])
    got = oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=MAX_TOKENS_LIMIT, temperature=0,
                                 stop=[","])
    assert got.choices[0].text == want.text and "," not in want.text
    assert got.choices[0].finish_reason == "stop" == FINISH[want.finish_reason]


def test_token_id_prompts_and_bad_requests_through_the_openai_client(oai, sdk, model):
    ids = [504, 3458, 282, 4649, 314]
    want = sdk.complete(token_ids=ids, max_tokens=6, temperature=0.0)
    got = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)
    for kwargs, words in ((dict(n=2), "n must be 1"), (dict(temperature=-1), "temperature"),
                          (dict(max_tokens=MAX_TOKENS_LIMIT + 1), "router.max_tokens_limit"),
                          (dict(extra_body={"logprobs": 3}), "logprobs")):
        with pytest.raises(openai.BadRequestError, match=words):
            oai.completions.create(model=model, prompt="hi", **kwargs)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="hi")


# -- auth and TLS on a real cluster -------------------------------------------------------------------
def test_no_token_or_a_wrong_one_is_refused_on_both_fronts(base_url, cluster, certs, model):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=base_url + "/v1", api_key=key or "-", max_retries=0, timeout=30,
                            http_client=openai.DefaultHttpxClient(verify=_ssl(certs.ca)))
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=model, prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        bad.close()
    with httpx.Client(verify=_ssl(certs.ca), timeout=30) as anonymous:
        assert anonymous.post(base_url + "/v1/chat/completions", json={"messages": CHAT}).status_code == 401
        assert anonymous.get(base_url + "/metrics").status_code == 401
        assert anonymous.get(base_url + "/health").status_code == 200
    for token in (None, "wrong"):
        with Client(cluster.address, timeout_s=30, ca_cert=certs.ca, token=token) as c:
            with pytest.raises(Unauthenticated):
                c.complete("hi", max_tokens=2)
            with pytest.raises(Unauthenticated):
                c.state()


def test_plain_text_to_the_tls_ports_fails_cleanly_and_the_cluster_serves_on(base_url, cluster, sdk, oai, model):
    plain = openai.OpenAI(base_url=base_url.replace("https://", "http://") + "/v1", api_key=TOKEN, max_retries=0,
                          timeout=30)
    with pytest.raises(openai.APIConnectionError):
        plain.completions.create(model=model, prompt="hi", max_tokens=2)
    plain.close()
    with Client(cluster.address, timeout_s=30, token=TOKEN) as c:
        with pytest.raises(Unavailable):
            c.complete("hi", max_tokens=2)
    assert sdk.complete("hi", max_tokens=2).token_ids
    assert oai.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_client_that_leaves_a_stream_frees_its_request(http, base_url, cluster, model):
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS_LIMIT, "ignore_eos": True, "stream": True}
    with http.stream("POST", base_url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert wait_until(lambda: not cluster.router.requests, timeout_s=30)
    assert wait_until(lambda: all_blocks_free(cluster), timeout_s=30)


def test_bench_serve_drives_our_http_api_as_any_openai_server(base_url, certs, tmp_path, capsys):
    from cluster.cli import main
    out, trace = tmp_path / "endpoint", tmp_path / "trace.csv"   # short requests, within the cluster's limits
    trace.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + "".join(
        f"{i},m,{40 + 30 * i},{8 + 4 * i},0,x\n" for i in range(4)))
    rc = main(["bench", "serve", "--endpoint", base_url + "/v1", "--token", TOKEN, "--ca-cert", certs.ca,
               "--label", "ours-http", "--trace", str(trace), "--rates", "2", "--num-requests", "4",
               "--ttft-slo", "60", "--tpot-slo", "5", "--warmup", "1", "--time-limit", "120", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and "ours-http: goodput 2 req/s" in capsys.readouterr().out
    [mode] = json.loads((out / "serve.json").read_text())["modes"]
    [point] = mode["points"]
    assert point["counts"]["ok"] == 4 and point["idle_after"]
    for r in point["requests"]:
        assert r["n_out"] == r["output_tokens"] and r["finish_reason"] == "length"
        assert 0 < r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] is not None


# -- metrics during a load ----------------------------------------------------------------------------
def _scrape(http, base_url) -> dict[str, float]:
    """Every sample, by name and labels (the families parsed by prometheus_client's own parser)."""
    r = http.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return out


def _sum(samples: dict[str, float], name: str, **labels) -> float:
    total = 0.0
    for key, value in samples.items():
        sample, _, lab = key.partition("{")
        found = json.loads("{" + lab)
        if sample == name and all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


def test_metrics_scraped_during_a_load_agree_with_the_clients(http, base_url, cluster, oai, sdk, model):
    P = "pdcluster:"
    before = _scrape(http, base_url)
    jobs = [(i, f"Request {i}: tell me about the sea. " * (1 + i % 4), 4 + (i * 5) % 17) for i in range(12)]

    def run(job) -> tuple[int, int]:
        i, prompt, n = job
        if i % 3 == 0:
            r = sdk.complete(prompt, max_tokens=n, ignore_eos=True, temperature=0.0)
            return r.prompt_tokens, len(r.token_ids)
        if i % 3 == 1:
            u = oai.completions.create(model=model, prompt=prompt, max_tokens=n, extra_body={"ignore_eos": True}).usage
            return u.prompt_tokens, u.completion_tokens
        chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        return chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens

    scrapes, stop = [], threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            scrapes.append(_scrape(http, base_url))
            time.sleep(0.2)

    t = threading.Thread(target=scraper)
    t.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            counts = list(pool.map(run, jobs))
    finally:
        stop.set()
        t.join()
    assert len(scrapes) >= 2   # scraped (and parsed) while the load ran
    assert max(_sum(s, P + "router_requests") for s in scrapes) >= 1
    n, prompt_tokens, gen_tokens = len(jobs), sum(c[0] for c in counts), sum(c[1] for c in counts)

    def delta(name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    # the tokens counters move as tokens stream; the end-of-request series once each stream is closed
    after = _scrape(http, base_url)
    assert wait_until(lambda: _sum(_scrape(http, base_url), P + "e2e_request_latency_seconds_count")
                      - _sum(before, P + "e2e_request_latency_seconds_count") >= n, timeout_s=10)
    after = _scrape(http, base_url)
    assert delta(P + "time_to_first_token_seconds_count") == n
    assert delta(P + "prompt_tokens_total") == prompt_tokens
    assert delta(P + "generation_tokens_total") == gen_tokens
    assert delta(P + "inter_token_latency_seconds_count") == gen_tokens - n
    assert delta(P + "e2e_request_latency_seconds_count") == n
    assert delta(P + "request_success_total", finished_reason="length") == n
    assert delta(P + "requests_ended_total", reason="length") == n
    assert delta(P + "request_generation_tokens_sum") == gen_tokens
    # labelled with the cluster's transfer.backend (auto: shm zero copy here, one node)
    assert delta(P + "kv_transfer_time_seconds_count", backend=cluster.config.transfer.backend) == n
    for q in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(P + q + "_count") == n
    assert _sum(after, P + "time_to_first_token_seconds_bucket", le="+Inf") == _sum(
        after, P + "time_to_first_token_seconds_count")
    for role in ("prefill", "decode"):
        assert _sum(after, P + "instances", role=role, status="serving") == 1
        assert _sum(after, P + "instances", role=role, status="dead") == 0
        assert 0.0 <= _sum(after, P + "kv_cache_usage_perc", role=role) <= 1.0
    assert any(k.startswith(P + "num_requests_running{") for k in after)
    assert _sum(after, P + "request_migrations_total") == 0 and _sum(after, P + "instance_deaths_total") == 0


# -- fuzzing both fronts -------------------------------------------------------------------------------
MODEL_ID = "SmolLM2-135M-Instruct"   # the default model's directory name: the served id
PARAMS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "n", "stream", "stream_options", "ignore_eos", "logprobs", "echo", "user",
          "return_token_ids", "presence_penalty", "best_of", "response_format", "tools"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
# what a well-behaved client sends: a body of these is a valid request (kept short: a few tokens)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": st.text(max_size=60)})
SANE = {
    "model": st.just(MODEL_ID), "prompt": st.text(min_size=1, max_size=60) | st.lists(
        st.integers(0, 49151), min_size=1, max_size=40),
    "messages": st.lists(message, min_size=1, max_size=3), "max_tokens": st.integers(1, 4),
    "max_completion_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50), "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "n": st.just(1), "stream": st.booleans(),
    "ignore_eos": st.booleans(), "user": st.text(max_size=8), "return_token_ids": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "logprobs": st.none(),
    "echo": st.just(False), "presence_penalty": st.just(0), "best_of": st.just(1),
    "response_format": st.just({"type": "text"}), "tools": st.just([])}
# near misses: values of the right kind out of range, or of the wrong kind
NEAR = {"prompt": st.just("") | st.lists(st.integers(-5, 60000), max_size=40),
        "messages": st.lists(st.fixed_dictionaries({"role": st.text(max_size=4) | json_values,
                                                    "content": json_values}), max_size=3),
        "max_tokens": st.integers(-3, MAX_TOKENS_LIMIT + 3), "temperature": st.floats(-1, 3),
        "top_p": st.floats(-0.5, 1.5), "stop": st.lists(st.text(max_size=400), max_size=20),
        "seed": st.integers(-2**65, 2**65), "n": st.integers(0, 3)}


@st.composite
def http_cases(draw) -> tuple[str, bytes]:
    """A valid body, then 0-2 of its parameters turned wild; or bytes that may not be JSON at all."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.integers(0, 9)) == 0:
        return path, draw(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
    # a few tokens at most, so that 200 cases stay quick (the defaults are tested elsewhere)
    body = {"messages" if chat else "prompt": draw(SANE["messages" if chat else "prompt"]),
            "max_tokens": draw(st.integers(1, 4))}
    for key in draw(st.sets(st.sampled_from(sorted(SANE)), max_size=5)):
        body[key] = draw(SANE[key])
    for key in draw(st.sets(st.sampled_from(PARAMS), max_size=2)):
        body[key] = draw(NEAR.get(key, json_values) | json_values)
    raw = json.dumps(body).encode()   # NaN and Infinity written as such (Python's json reads them back)
    return path, raw[:draw(st.integers(1, len(raw)))] if draw(st.integers(0, 19)) == 0 else raw


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _report(capsys, front: str, outcomes: Counter) -> None:
    with capsys.disabled():
        print(f"\n[fuzz] {front}: {sum(outcomes.values())} cases: {dict(sorted(outcomes.items()))}")


def test_fuzz_http_front_never_answers_5xx(http, base_url, cluster, sdk, capsys):
    outcomes: Counter = Counter()

    @FUZZ
    @given(http_cases())
    def case(path_body):
        path, body = path_body
        r = http.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
        outcomes[r.status_code] += 1
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif "text/event-stream" in r.headers["content-type"]:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text

    case()
    _report(capsys, "HTTP", outcomes)
    assert sum(outcomes.values()) >= FUZZ_EXAMPLES and outcomes[400] > 0 and outcomes[200] > 0
    assert all(s["loop_error"] is None for s in cluster.worker_stats().values())
    assert sdk.complete("The capital of France is", max_tokens=4, temperature=0.0).text.strip().startswith("Paris")


int32 = st.integers(-2**31, 2**31 - 1)
SANE_SAMPLING = {"temperature": st.floats(0, 2, width=32),
                 "top_p": st.floats(0.125, 1, width=32), "top_k": st.integers(-1, 50),
                 "seed": st.integers(-2**63, 2**63 - 1),
                 "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "ignore_eos": st.booleans()}
WILD_SAMPLING = {"max_tokens": int32, "temperature": st.floats(width=32), "top_p": st.floats(width=32),
                 "top_k": int32, "seed": st.integers(-2**63, 2**63 - 1),
                 "stop": st.lists(st.text(max_size=300), max_size=20), "ignore_eos": st.booleans()}


@st.composite
def grpc_cases(draw) -> bytes:
    """A valid GenerateRequest with 0-2 fields turned wild, or bytes that may not parse at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=120))
    sampling = {k: draw(v) for k, v in SANE_SAMPLING.items() if draw(st.booleans())}
    sampling["max_tokens"] = draw(st.integers(1, 4))   # a few tokens at most: 200 cases stay quick
    req = pb.GenerateRequest(request_id=draw(st.just("") | st.text(max_size=12)))
    kind = draw(st.sampled_from(["prompt", "token_ids", "messages"]))
    wild = draw(st.sets(st.sampled_from([*WILD_SAMPLING, "input"]), max_size=2))
    for key in wild - {"input"}:
        sampling[key] = draw(WILD_SAMPLING[key])
    req.sampling.CopyFrom(pb.SamplingParams(**sampling))
    if "input" in wild:
        kind = draw(st.sampled_from(["raw_prompt", "wild_ids", "wild_messages", None]))
    if kind == "prompt":
        req.prompt = draw(st.text(min_size=1, max_size=80)).encode("utf-8", "replace")
    elif kind == "raw_prompt":
        req.prompt = draw(st.binary(max_size=80))
    elif kind in ("token_ids", "wild_ids"):
        ids = st.integers(0, 49151) if kind == "token_ids" else int32
        req.token_ids.ids.extend(draw(st.lists(ids, min_size=1 if kind == "token_ids" else 0, max_size=40)))
    elif kind in ("messages", "wild_messages"):
        role = st.sampled_from(["user", "system", "assistant"]) if kind == "messages" else st.text(max_size=10)
        for r, content in draw(st.lists(st.tuples(role, st.text(max_size=60)), min_size=1, max_size=3)):
            req.messages.messages.add(role=r, content=content)
    return req.SerializeToString()


def test_fuzz_grpc_front_never_answers_internal_or_unknown(cluster, certs, sdk, capsys):
    outcomes: Counter = Counter()
    creds = grpc.ssl_channel_credentials(root_certificates=open(certs.ca, "rb").read())
    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.secure_channel(cluster.address, creds) as ch:
        generate = ch.unary_stream("/pdcluster.v1.Generation/Generate", request_serializer=lambda b: b,
                                   response_deserializer=pb.GenerateResponse.FromString)

        @FUZZ
        @given(message=grpc_cases())
        def case(message):
            try:
                responses = list(generate(message, timeout=120, metadata=md))
                code = grpc.StatusCode.OK
                assert responses[-1].HasField("final")
            except grpc.RpcError as e:
                code = e.code()
            outcomes[code.name] += 1
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (message, code)

        case()
    _report(capsys, "gRPC", outcomes)
    assert sum(outcomes.values()) >= FUZZ_EXAMPLES and outcomes["INVALID_ARGUMENT"] > 0 and outcomes["OK"] > 0
    assert all(s["loop_error"] is None for s in cluster.worker_stats().values())
    with pytest.raises(InvalidRequest):
        sdk.complete("hi", max_tokens=0)
    assert sdk.complete("The capital of France is", max_tokens=4, temperature=0.0).text.strip().startswith("Paris")
