"""One request as the router tracks it: where it runs, what it has streamed, its timings."""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from protos import pdcluster_pb2 as pb
from router.detokenizer import Detokenizer


class Event(enum.Enum):
    """What reaches a request's stream (`RequestState.events`), with its message."""

    PREFILLED = "prefilled"   # wpb.PrefillDone: the first token (and the KV offer, disaggregated)
    OFFERED = "offered"       # wpb.EarlyOffer: stream_layers, before the prefill's forward pass
    TOKENS = "tokens"         # wpb.Tokens: decoded tokens
    FAILED = "failed"         # wpb.Failed
    ABORT = "abort"           # None: the client's Abort


@dataclass
class RequestState:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    arrival: float
    events: asyncio.Queue[tuple[Event, object]] = field(default_factory=asyncio.Queue)
    prefill: str = ""
    decode: str = ""
    prefill_done: bool = False
    finished: bool = False
    decode_blocks: int = 0          # blocks counted against the decode instance
    first_token_at: float | None = None
    first_decode_at: float | None = None
    last_token_at: float | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0

    @property
    def num_output_tokens(self) -> int:
        return len(self.detok.token_ids)

    def chunk(self, token_ids, now: float, final: bool = False) -> pb.GenerateResponse:
        """Record tokens that arrived at `now`; the response that streams them."""
        text = self.detok.add(token_ids, final=final)
        if self.first_token_at is None:
            self.first_token_at = now
        elif self.first_decode_at is None:
            self.first_decode_at = now
        self.last_token_at = now
        return pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=list(token_ids), text=text))

    def final(self, reason: str, now: float) -> pb.GenerateResponse:
        n = self.num_output_tokens
        first = self.first_token_at if self.first_token_at is not None else now
        last = self.last_token_at if self.last_token_at is not None else now
        timings = pb.Timings(
            queue_s=self.queue_s, prefill_s=self.prefill_s, transfer_s=self.transfer_s,
            decode_s=(last - self.first_decode_at) if self.first_decode_at is not None else 0.0,
            ttft_s=first - self.arrival, mean_tpot_s=(last - first) / (n - 1) if n > 1 else 0.0,
            e2e_s=now - self.arrival)
        return pb.GenerateResponse(final=pb.FinalResult(
            finish_reason=reason, prompt_tokens=len(self.prompt_ids), completion_tokens=n, timings=timings,
            prefill_instance=self.prefill, decode_instance=self.decode, request_id=self.req_id))
