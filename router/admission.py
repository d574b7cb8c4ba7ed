"""Turning what a client sent into prompt token ids and sampling parameters, or a clear refusal.

One path for every front door (gRPC, HTTP): a front parses its own wire format
into plain values, then `Admission.prompt_ids` and `Admission.check` decide,
and `sampling_message` writes the checked parameters as the workers' message.
Every refusal is an `InvalidRequestError` whose message names the problem.
The operator's per-request limits (`RequestLimits`, from router.* keys) are
checked here too, so no front door can skip them.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.validation import validate_request
from protos import pdcluster_pb2 as pb
from router.front_settings import FrontDoorSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_model_len: int
    num_blocks: int            # the smallest KV cache of any instance: a request must fit in it
    block_size: int
    transfer_backend: str = ""


# what the wire messages can carry (pdcluster.proto: int32 token ids, max_tokens and top_k, int64 seed)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    """The operator's caps per request (router.max_prompt_tokens, ...); None: the model's context."""
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None           # router.max_tokens_limit
    max_stop_strings: int = 16
    max_stop_string_len: int = 256          # characters

    @classmethod
    def from_settings(cls, settings: FrontDoorSettings) -> RequestLimits:
        return cls(settings.max_prompt_tokens, settings.max_tokens_limit, settings.max_stop_strings,
                   settings.max_stop_string_len)


class Admission:
    def __init__(self, model: ModelInfo, tokenizer: PreTrainedTokenizerBase | None,
                 limits: RequestLimits | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or RequestLimits()

    def prompt_ids(self, prompt: str | None = None, messages: Sequence[dict] | None = None,
                   token_ids: Sequence[int] | None = None) -> list[int]:
        """Exactly one of a text prompt, chat messages ({role, content}) or token ids."""
        given = [name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
                 if v is not None]
        if len(given) != 1:
            raise InvalidRequestError(f"set exactly one of prompt, messages or token_ids (got {given or 'none'})")
        if token_ids is not None:
            return list(token_ids)
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send token_ids")
        if prompt is not None:
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self._encode(prompt, "prompt")
        return self._chat_ids(messages)

    def _encode(self, text: str, what: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate (JSON lets "\ud800" through)
            raise InvalidRequestError(f"{what} is not valid Unicode: {e.reason} at character {e.start}") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _chat_ids(self, messages: Sequence[dict]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages is empty")
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template: send a prompt or token_ids")
        for i, m in enumerate(messages):
            if not m.get("role"):
                raise InvalidRequestError(f"messages[{i}].role is empty")
            if not isinstance(m.get("content", ""), str):
                raise InvalidRequestError(f"messages[{i}].content must be a string")
        convo = [{"role": m["role"], "content": m.get("content", "")} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        except Exception as e:   # the template rejects the conversation (jinja raises its own errors)
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from None
        return self._encode(text, "messages", add_special_tokens=False)

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """What a request that sets no max_tokens may generate: the rest of the context, capped by
        router.max_tokens_limit (at least 1: a prompt that fills the context is refused by check)."""
        room = self.model.max_model_len - num_prompt_tokens
        if self.limits.max_tokens is not None:
            room = min(room, self.limits.max_tokens)
        return max(1, room)

    def check(self, ids: Sequence[int], params: SamplingParams) -> None:
        """Every check a request must pass before it may run: the operator's limits, what the
        wire messages can carry, then the model's (vocabulary, context, KV cache)."""
        lim = self.limits
        if lim.max_prompt_tokens is not None and len(ids) > lim.max_prompt_tokens:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; the limit is {lim.max_prompt_tokens} "
                                      f"(router.max_prompt_tokens)")
        if lim.max_tokens is not None and params.max_tokens > lim.max_tokens:
            raise InvalidRequestError(f"max_tokens {params.max_tokens} exceeds the limit of {lim.max_tokens} "
                                      f"(router.max_tokens_limit)")
        if len(params.stop) > lim.max_stop_strings:
            raise InvalidRequestError(f"{len(params.stop)} stop strings; the limit is {lim.max_stop_strings} "
                                      f"(router.max_stop_strings)")
        for i, s in enumerate(params.stop):
            if len(s) > lim.max_stop_string_len:
                raise InvalidRequestError(f"stop[{i}] has {len(s)} characters; the limit is "
                                          f"{lim.max_stop_string_len} (router.max_stop_string_len)")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequestError(f"stop[{i}] is not valid Unicode: {e.reason}") from None
        # the workers get these as 32-bit floats: what the router accepts must survive the rounding
        # (a temperature that becomes inf turns the logits into NaN, a top_p that becomes 0 is invalid)
        if not math.isfinite(_float32(params.temperature)):
            raise InvalidRequestError(f"temperature must be a finite 32-bit float, got {params.temperature}")
        if not _float32(params.top_p) > 0:
            raise InvalidRequestError(f"top_p {params.top_p} rounds to 0 as a 32-bit float")
        if not -1 <= params.top_k <= INT32_MAX:
            raise InvalidRequestError(f"top_k must be in [-1, {INT32_MAX}], got {params.top_k}")
        if params.seed is not None and not INT64_MIN <= params.seed <= INT64_MAX:
            raise InvalidRequestError(f"seed must fit in 64 bits (signed), got {params.seed}")
        m = self.model
        validate_request(ids, params, m.vocab_size, m.max_model_len, m.num_blocks, m.block_size)


def _float32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:   # beyond float32's range
        return math.inf


def sampling_message(params: SamplingParams) -> pb.SamplingParams:
    """The checked parameters as the wire message the workers get (`Admission.check` first: it
    keeps every value within the message's field types)."""
    msg = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, stop=list(params.stop), ignore_eos=params.ignore_eos)
    if params.seed is not None:
        msg.seed = params.seed
    return msg
