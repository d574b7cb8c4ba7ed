"""One request as the router tracks it: where it runs, what it has streamed, its timings.

A request survives its workers: the router keeps its prompt and every token it
has streamed, so after an instance dies it can run the request again elsewhere
as a new *attempt* (prompt + streamed tokens as the prompt, the rest of
max_tokens) and the client's stream goes on without a gap or a repeat. Each
attempt has its own id on the workers (`worker_id`), so a late message of an
earlier attempt is never taken for the current one.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from engine.block_manager import prefix_hashes
from engine.sampling_params import SamplingParams
from protos import pdcluster_pb2 as pb
from router.detokenizer import Detokenizer


@dataclass(frozen=True)
class Lost:
    """The payload of Event.LOST."""

    why: str
    planned: bool = False           # the cluster moves it on purpose (scaling down)


class Event(enum.Enum):
    """What reaches a request's stream (`RequestState.post`), with the instance and a payload."""

    PREFILLED = "prefilled"   # wpb.PrefillDone: the first token (and the KV offer, disaggregated)
    OFFERED = "offered"       # wpb.EarlyOffer: stream_layers, before the prefill's forward pass
    TOKENS = "tokens"         # wpb.Tokens: decoded tokens
    FAILED = "failed"         # wpb.Failed: the instance could not serve it
    LOST = "lost"             # Lost: an instance it was on died or goes; run it again elsewhere
    READY = "ready"           # None: an instance came up for a request waiting for one
    ABORT = "abort"           # None: the client's Abort


@dataclass
class RequestState:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampling: pb.SamplingParams     # as the client sent it
    detok: Detokenizer
    arrival: float
    # (kind, instance, payload, attempt it is for: None for any)
    events: asyncio.Queue[tuple[Event, str, object, int | None]] = field(default_factory=asyncio.Queue)
    attempt: int = 0                # how many times it moved to another instance
    unplanned_moves: int = 0        # ... because an instance died or failed it (router.migration_limit)
    attempt_ids: list[int] = field(default_factory=list)   # what the current attempt prefills
    attempt_sampling: pb.SamplingParams | None = None      # ... and how it samples
    block_size: int = 16            # the KV blocks' size (what prefix hashes cover)
    _hashes: list[int] | None = field(default=None, repr=False)
    prefill: str = ""               # the current attempt's prefill instance
    decode: str = ""                # ... and its decode instance (colocated: the same one)
    prefill_done: bool = False
    local_prefill: bool = False     # the current attempt prefills on its decode instance
    placement: str = ""             # why it was prefilled where it was (conditional disaggregation)
    finished: bool = False
    finish_reason: str = ""         # set when it finished (not when it failed or was cancelled)
    waiting_for_instance: bool = False   # no instance could take it: it waits for one to come up
    pending_decode: object = None   # wpb.PrefillDone waiting for a decode instance to come up
    charged_tokens: int = 0         # prompt tokens counted against the prefill instance's queue
    prefill_active: bool = False    # counted as active on the prefill instance (disaggregated)
    decode_active: bool = False     # counted as active on the decode instance
    decode_blocks: int = 0          # blocks counted against the decode instance
    first_token_at: float | None = None
    first_decode_at: float | None = None
    last_token_at: float | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0

    def post(self, kind: Event, instance: str, payload: object, any_attempt: bool = False,
             planned: bool = False) -> None:
        """Queue news for the stream, stamped with the current attempt: news still queued when
        the request moves is dropped, whoever sent it. A LOST payload is its reason."""
        if kind is Event.LOST:
            payload = Lost(payload, planned)
        self.events.put_nowait((kind, instance, payload, None if any_attempt else self.attempt))

    @property
    def num_output_tokens(self) -> int:
        return len(self.detok.token_ids)

    @property
    def worker_id(self) -> str:
        """The id the workers know this attempt by."""
        return self.req_id if self.attempt == 0 else f"{self.req_id}#{self.attempt}"

    @property
    def attempt_hashes(self) -> list[int]:
        """The prefix hashes of the current attempt's prompt's full blocks (KV-aware routing)."""
        if self._hashes is None:
            self._hashes = prefix_hashes(self.attempt_ids, self.block_size)
        return self._hashes

    def start_attempt(self) -> None:
        """The next attempt prefills the prompt and every token already streamed, and samples
        with max_tokens cut by those tokens; a seeded request draws each token from its
        position, so the stream goes on as if nothing had happened."""
        self.attempt_ids = self.prompt_ids + self.detok.token_ids
        self._hashes = None
        if self.num_output_tokens == 0:
            self.attempt_sampling = self.sampling
            return
        self.attempt_sampling = pb.SamplingParams()
        self.attempt_sampling.CopyFrom(self.sampling)
        self.attempt_sampling.max_tokens = self.params.max_tokens - self.num_output_tokens

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
            prefill_instance=self.prefill, decode_instance=self.decode, request_id=self.req_id,
            migrations=self.attempt))
