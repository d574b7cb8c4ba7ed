"""OpenAI request bodies to plain values and back (router/openai_protocol.py), and the shared
admission path's limits (router/admission.py). No server, no model."""
from __future__ import annotations

import json

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from router.admission import Admission, ModelInfo, RequestLimits, sampling_message
from router.openai_protocol import COMPLETIONS_MAX_TOKENS, ProtocolError, ResponseWriter, parse_body, parse_request

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def test_completion_body_maps_every_supported_parameter():
    req = parse_request({"model": "m", "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                         "seed": 3, "stop": ["\n", "."], "n": 1, "stream": True,
                         "stream_options": {"include_usage": True}, "top_k": 5, "ignore_eos": True,
                         "user": "someone", "an_unknown_key": 1}, chat=False)
    assert (req.prompt, req.token_ids, req.model, req.stream, req.include_usage) == ("Hello", None, "m", True, True)
    p = req.sampling(default_max_tokens=999)
    assert p == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop=("\n", "."),
                               ignore_eos=True)
    msg = sampling_message(p)
    assert (msg.max_tokens, msg.top_k, msg.seed, list(msg.stop), msg.ignore_eos) == (7, 5, 3, ["\n", "."], True)
    assert SamplingParams.from_message(msg).max_tokens == 7


def test_prompt_forms_and_defaults():
    assert parse_request({"prompt": [1, 2, 3]}, chat=False).token_ids == [1, 2, 3]
    assert parse_request({"prompt": [[4, 5]]}, chat=False).token_ids == [4, 5]
    assert parse_request({"prompt": ["one"]}, chat=False).prompt == "one"
    # completions default to OpenAI's 16 tokens, chat to the rest of the context
    assert parse_request({"prompt": "x"}, chat=False).sampling(500).max_tokens == COMPLETIONS_MAX_TOKENS
    assert parse_request(CHAT, chat=True).sampling(500).max_tokens == 500
    # chat: max_completion_tokens first, then the older max_tokens
    assert parse_request(CHAT | {"max_tokens": 9, "max_completion_tokens": 4}, chat=True).max_tokens == 4
    assert parse_request(CHAT | {"max_tokens": 9}, chat=True).max_tokens == 9
    assert parse_request({"prompt": "x", "temperature": 0}, chat=False).sampling(1).greedy


def test_chat_content_parts_are_joined_and_null_is_empty():
    req = parse_request({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "Hi", "name": "me"}]}, chat=True)
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": ""},
                            {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": float("inf")}, "top_p"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": []}, "stream_options"),
    ({"prompt": "x", "model": 5}, "model"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, 2.5]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
])
def test_bad_completion_bodies_name_the_parameter(body, param):
    with pytest.raises(ProtocolError) as e:
        parse_request(body, chat=False)
    assert e.value.param == param
    assert isinstance(e.value, InvalidRequestError)   # the HTTP front's 400


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content"),
    (CHAT | {"tools": [{"type": "function"}]}, "tools"),
    (CHAT | {"logprobs": True}, "logprobs"),
    (CHAT | {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT | {"max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_bad_chat_bodies_name_the_parameter(body, param):
    with pytest.raises(ProtocolError) as e:
        parse_request(body, chat=True)
    assert e.value.param == param


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"text"', b"null", b"\xff\xfe\x00", b"[" * 50_000,
                                 b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"])
def test_bodies_that_are_not_a_json_object(raw):
    with pytest.raises(ProtocolError):
        parse_body(raw, chat=False)


def test_off_values_of_unsupported_parameters_are_accepted():
    body = {"prompt": "x", "logprobs": None, "echo": False, "best_of": 1, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "tools": [], "response_format": {"type": "text"}}
    assert parse_request(body, chat=False).prompt == "x"


# -- responses --------------------------------------------------------------------------------
def test_non_streamed_bodies_map_finish_reasons_and_count_usage():
    w = ResponseWriter("cmpl-1", "m", 123, chat=False, return_token_ids=True)
    body = w.response("Paris.", [5, 6], "eos", prompt_tokens=4)
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 123, "model": "m",
                    "choices": [{"index": 0, "text": "Paris.", "logprobs": None, "finish_reason": "stop",
                                 "token_ids": [5, 6]}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    chat = ResponseWriter("chatcmpl-1", "m", 1, chat=True).response("Hi", [1], "context", 3)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["finish_reason"] == "length"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    for ours, theirs in (("stop", "stop"), ("length", "length"), ("abort", "abort")):
        assert w.response("", [], ours, 1)["choices"][0]["finish_reason"] == theirs


def test_chat_chunks_name_the_role_once_and_end_with_an_empty_delta():
    w = ResponseWriter("chatcmpl-2", "m", 1, chat=True, include_usage=True)
    first, second, last = w.chunk("Hel", [1]), w.chunk("lo", [2]), w.chunk("", [], "length")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert second["choices"][0]["delta"] == {"content": "lo"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert first["usage"] is None and first["object"] == "chat.completion.chunk"
    usage = w.usage_chunk(3, 2)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                         "total_tokens": 5}
    json.dumps([first, second, last, usage])


# -- the shared admission path's limits ---------------------------------------------------------
def _admission(**limits) -> Admission:
    return Admission(ModelInfo("m", vocab_size=100, max_model_len=64, num_blocks=100, block_size=16), None,
                     RequestLimits(**limits))


@pytest.mark.parametrize("limits,ids,params,message", [
    ({"max_prompt_tokens": 4}, [1] * 5, SamplingParams(max_tokens=1), r"5 tokens; the limit is 4 \(router\.max_prompt"),
    ({"max_tokens": 8}, [1], SamplingParams(max_tokens=9), r"max_tokens 9 exceeds the limit of 8"),
    ({"max_stop_strings": 2}, [1], SamplingParams(stop=("a", "b", "c")), r"3 stop strings; the limit is 2"),
    ({"max_stop_string_len": 3}, [1], SamplingParams(stop=("abcd",)), r"stop\[0\] has 4 characters"),
    ({}, [1], SamplingParams(stop=("\ud800",)), r"stop\[0\] is not valid Unicode"),
    ({}, [1], SamplingParams(temperature=1e39), r"temperature must be a finite 32-bit float"),
    ({}, [1], SamplingParams(temperature=float("inf")), r"temperature"),
    ({}, [1], SamplingParams(top_p=1e-50), r"top_p .* rounds to 0"),
    ({}, [1], SamplingParams(top_k=2**31), r"top_k must be in"),
    ({}, [1], SamplingParams(seed=2**63), r"seed must fit in 64 bits"),
    ({}, [100], SamplingParams(), r"outside the vocabulary"),
    ({}, [1] * 60, SamplingParams(max_tokens=5), r"exceeds the context of 64"),
])
def test_admission_refuses_what_the_limits_and_the_wire_cannot_take(limits, ids, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        _admission(**limits).check(ids, params)


def test_limits_come_from_the_router_config_and_cap_the_default_max_tokens():
    from cluster.config import load_config
    cfg = load_config(None, {"router": {"max_prompt_tokens": 10, "max_tokens_limit": 20, "max_stop_strings": 2,
                                        "max_stop_string_len": 5}})
    assert RequestLimits.from_settings(cfg.router) == RequestLimits(10, 20, 2, 5)
    adm = _admission(max_tokens=20)
    assert adm.default_max_tokens(10) == 20 and adm.default_max_tokens(60) == 4 and adm.default_max_tokens(64) == 1
    adm.check([1, 2], SamplingParams(max_tokens=20, stop=("ab", "cd")))
