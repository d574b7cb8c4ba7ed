"""Turning what a client sent into prompt token ids and sampling parameters, or a clear refusal.

One path for every front door (gRPC, HTTP): a front parses its own wire format
into plain values, then `Admission.prompt_ids` and `Admission.check` decide.
Every refusal is an `InvalidRequestError` whose message names the problem.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.validation import validate_request

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


class Admission:
    def __init__(self, model: ModelInfo, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.model, self.tokenizer = model, tokenizer

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
            return self.tokenizer.encode(prompt)
        return self._chat_ids(messages)

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
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check(self, ids: Sequence[int], params: SamplingParams) -> None:
        m = self.model
        validate_request(ids, params, m.vocab_size, m.max_model_len, m.num_blocks, m.block_size)
