"""OpenAI's completions and chat completions wire format: request bodies in, response bodies out.

Pure (no server, no clock of its own): the HTTP front (http_server.py) reads
a JSON body, `parse_request` turns it into plain values or raises
`ProtocolError` naming the parameter, the shared admission path
(admission.py) decides the rest, and `ResponseWriter` writes what streams
back. What maps cleanly is accepted: `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `stream`, `stream_options.include_usage`,
`n` = 1, and vLLM's extensions `top_k`, `ignore_eos` and `return_token_ids`.
A parameter we cannot honour (`logprobs`, `echo`, `best_of` > 1, penalties,
tools, ...) is refused rather than silently ignored; unknown keys are
ignored, as vLLM does.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

# our finish reasons (FinalResult.finish_reason) -> OpenAI's
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "abort": "abort"}
COMPLETIONS_MAX_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the rest of the context

# parameters we do not implement, with the value that means "off" (a request may send that)
_OFF = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
        "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
        "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"})}


class ProtocolError(InvalidRequestError):
    """A body that is not a valid request; `param` names the offending parameter (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    chat: bool
    model: str | None = None
    prompt: str | None = None                  # completions: text ...
    token_ids: list[int] | None = None         # ... or token ids
    messages: list[dict] | None = None         # chat: [{role, content}], content flattened to text
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """`default_max_tokens`: what a request that sets no limit may generate (Admission's:
        the rest of the context, capped by router.max_tokens_limit)."""
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens if self.chat else min(COMPLETIONS_MAX_TOKENS, default_max_tokens)
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos)


def parse_body(raw: bytes, chat: bool) -> OpenAIRequest:
    """A request body as bytes (JSON in UTF-8, -16 or -32)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ProtocolError("the JSON body nests too deeply") from None
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ProtocolError(f"the body is not valid JSON: {e}") from None
    return parse_request(body, chat)


def parse_request(body: object, chat: bool) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise ProtocolError(f"the body must be a JSON object, got {_type(body)}")
    for name, off in _OFF.items():
        if body.get(name) not in off:
            raise ProtocolError(f"{name} is not supported by this server", name)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ProtocolError(f"n must be 1 (one choice per request), got {n!r}", "n")
    fields: dict = {"chat": chat}
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(f"model must be a string, got {_type(model)}", "model")
    fields["model"] = model
    if chat:
        fields["messages"] = _messages(body.get("messages"))
    else:
        fields.update(_prompt(body.get("prompt")))
    fields["max_tokens"] = _max_tokens(body, chat)
    for name, default in (("temperature", 1.0), ("top_p", 1.0)):
        fields[name] = _number(body.get(name), name, default)
    fields["top_k"] = _int(body.get("top_k"), "top_k", 0)
    fields["seed"] = _int(body.get("seed"), "seed", None)
    fields["stop"] = _stop(body.get("stop"))
    for name in ("ignore_eos", "stream", "return_token_ids"):
        fields[name] = _bool(body.get(name), name)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ProtocolError(f"stream_options must be an object, got {_type(options)}", "stream_options")
        if not fields["stream"]:
            raise ProtocolError("stream_options is only allowed with stream: true", "stream_options")
        fields["include_usage"] = _bool(options.get("include_usage"), "stream_options.include_usage")
    return OpenAIRequest(**fields)


def _prompt(prompt: object) -> dict:
    """A string, a list of token ids, or a list holding one of those (one prompt per request)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ProtocolError(f"one prompt per request, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ProtocolError("prompt is empty", "prompt")
        return {"prompt": prompt}
    if isinstance(prompt, list):
        if not prompt:
            raise ProtocolError("prompt is empty", "prompt")
        bad = next((t for t in prompt if not _is_int(t)), _NONE)
        if bad is not _NONE:
            raise ProtocolError(f"a token-id prompt must hold integers only, got {_type(bad)}", "prompt")
        return {"token_ids": prompt}
    if prompt is None:
        raise ProtocolError("prompt is required", "prompt")
    raise ProtocolError(f"prompt must be a string or a list of token ids, got {_type(prompt)}", "prompt")


def _messages(messages: object) -> list[dict]:
    if messages is None:
        raise ProtocolError("messages is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ProtocolError(f"{where} must be an object, got {_type(m)}", where)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ProtocolError(f"{where}.role must be a non-empty string", f"{where}.role")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(content: object, where: str) -> str:
    """A string, null (an assistant turn without text), or a list of text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    f"supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise ProtocolError(f"{where} must be a string or a list of text parts, got {_type(content)}", where)


def _max_tokens(body: dict, chat: bool) -> int | None:
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for name in names:
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise ProtocolError(f"{name} must be an integer >= 1, got {value!r}", name)
            return value
    return None


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ProtocolError("stop must be a string or a list of strings", "stop")
    if any(not s for s in stop):
        raise ProtocolError("stop strings must not be empty", "stop")
    return tuple(stop)


def _number(value: object, name: str, default: float) -> float:
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _int(value: object, name: str, default):
    if value is None:
        return default
    if not _is_int(value):
        raise ProtocolError(f"{name} must be an integer, got {value!r}", name)
    return value


def _bool(value: object, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, got {value!r}", name)
    return value


_NONE = object()


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _type(x: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number")


# -- responses --------------------------------------------------------------------------------
def finish_reason(ours: str) -> str:
    return FINISH_REASONS.get(ours, ours)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ResponseWriter:
    """The bodies of one request's answer: chunks while it streams, or one response at the end."""

    def __init__(self, request_id: str, model: str, created: int, chat: bool, return_token_ids: bool = False,
                 include_usage: bool = False) -> None:
        self.id, self.model, self.created, self.chat = request_id, model, created, chat
        self.return_token_ids, self.include_usage = return_token_ids, include_usage
        self._role_sent = False

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str, token_ids: Sequence[int], reason: str | None, delta: bool) -> dict:
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        elif delta:
            if not self._role_sent:   # the first delta names the role (OpenAI's clients expect it)
                d, self._role_sent = {"role": "assistant", "content": text}, True
            else:
                d = {"content": text} if text or reason is None else {}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def chunk(self, text: str, token_ids: Sequence[int], reason: str | None = None) -> dict:
        """One streamed chunk; `reason` (ours) on the last one."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._head(obj) | {"choices": [self._choice(text, token_ids, _map(reason), delta=True)]}
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """stream_options.include_usage: the last chunk, with no choices."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, text: str, token_ids: Sequence[int], reason: str, prompt_tokens: int) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [self._choice(text, token_ids, finish_reason(reason), delta=False)],
                                  "usage": usage(prompt_tokens, len(token_ids))}


def _map(reason: str | None) -> str | None:
    return None if reason is None else finish_reason(reason)


def sse(body: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or the literal `[DONE]`)."""
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
