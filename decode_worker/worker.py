"""The decode worker: pulls a request's KV from prefill, then decodes it in a continuous batch.

Lifecycle of a request here:
  1. `submit` (router -> DecodeWork, with the prefill side's KV offer) ->
     PENDING (FCFS): it waits until this worker has the blocks for its prompt
     plus the next token and a free batch slot.
  2. Admission allocates the blocks and starts `receiver.pull` -> PULLING.
  3. `receiver.poll` reports the pull:
       DONE   -> the KV is in our blocks; the request joins the running batch
                 (`Scheduler.add_running`) with its first token as the input.
       FAILED -> the blocks are freed; `on_failure` (transfer.on_failure)
                 decides: `recompute` the prompt here (`Scheduler.add`, as
                 after a preemption: slower, never lost), `reprefill` (Failed
                 with retry: the router prefills it again on another prefill
                 instance) or `fail` (Failed). A pull that cannot start at all
                 (a bad offer, a sender known dead) goes the same way. The
                 prefill side's lease ends at once whichever: the receiver
                 ACKs the failure or gives the offer back (a dead sender needs
                 nothing).
  4. RUNNING: one token per step (continuous batching; a request short of
     blocks preempts the newest and is recomputed later). Tokens go to the
     router after every step; EOS, max_tokens or a full context end it and
     free its blocks.
  5. `abort` at any point frees whatever the request holds (PULLING: the pull
     is aborted, which also ends the prefill side's lease).
  6. `peer_lost` (router: a prefill instance died): every pull from its sender
     ends FAILED at the next poll (not after the receiver's timeouts) and
     goes through step 3; PENDING requests whose KV it held go there at once.

Prefix caching (decode.enable_prefix_caching): a pull skips the prompt's
longest prefix whose KV this instance holds already (a conversation's earlier
turn that it decoded or pulled): those blocks are shared from the cache and
only the blocks past them move (`KVReceiver.pull(..., skip_tokens)`), for a
DecodeWork and an early (streamed) offer alike.

Local prefill (router.disaggregation conditional or never): `local_prefill`
(router -> PrefillWork, the message a prefill worker takes) puts a request in
WAITING here; with `local_chunk_tokens` the scheduler is the chunked one, so
its prompt runs in chunks riding on the decode steps (no step carries more
than that many prompt tokens) and its first token goes back as PrefillDone,
then it decodes here like any other. With prefix caching, KV that landed from
a transfer or was computed here is found again by a later prompt over the
same prefix (a conversation's next turn).

Layer-wise streaming: `prefetch(offer)` takes the early offer of a prefill that
is still running (before any DecodeWork) and starts pulling at once, into
blocks for the prompt plus the first token; each layer lands as it is sent.
The DecodeWork that follows joins that pull (step 2 without the wait), or finds
its KV already in place. A request that ends at its first token gets no
DecodeWork: whoever forwarded its early offer sends `abort` here (the KV may
have landed before prefill knew). An early pull that fails, or that nothing
claims or aborts within `early_ttl_s`, frees its blocks; a DecodeWork that
comes later takes the path above.

A `WorkerShell` (outbox, timing, snapshot, close, fault points): the step
loop and the sockets live in `cluster.worker_host`, the Ray actor in
`cluster.actors`; tests step it in-process.
"""
from __future__ import annotations

import io
import logging
import math
import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.block_manager import BlockManager, blocks_needed
from engine.errors import ConfigError, EngineError
from engine.runner import Runner
from engine.chunked_scheduler import NO_TOKEN, ChunkedScheduler
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import SeqState
from kv_transfer.backends import ON_FAILURE
from kv_transfer.base import KVReceiver, TransferOffer, TransferStatus
from protos import worker_pb2 as wpb
from worker_shell.base import Handler, WorkerShell
from worker_shell.faults import FaultPoints

log = logging.getLogger(__name__)


class _OfferUnpickler(pickle.Unpickler):
    """Offers cross a socket: only the two plain records an offer is made of may be loaded."""

    ALLOWED = {("kv_transfer.base", "TransferOffer"), ("kv_transfer.layout", "KVLayout")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"a KV offer may not contain {module}.{name}")
        return super().find_class(module, name)


def load_offer(data: bytes) -> TransferOffer:
    offer = _OfferUnpickler(io.BytesIO(data)).load()
    if not isinstance(offer, TransferOffer):
        raise pickle.UnpicklingError(f"a KV offer must be a TransferOffer, got {type(offer).__name__}")
    return offer


@dataclass
class _Pull:
    seq: SeqState
    offer: TransferOffer
    started: float


@dataclass
class _EarlyPull:
    """A pull started from an early (streamed) offer, before its DecodeWork came."""

    offer: TransferOffer
    block_ids: list[int]
    started: float
    done_at: float | None = None   # KV landed (monotonic), waiting for the DecodeWork
    cached_prompt: tuple[int, ...] = ()   # the prompt its first blocks were found cached for (none: ())


class DecodeWorker(WorkerShell):
    role = "decode"
    stream_layers = False   # a receiver: early offers come to it (prefetch), it makes none

    def __init__(self, name: str, runner: Runner, blocks: BlockManager, receiver: KVReceiver, *, vocab_size: int,
                 eos_token_ids: frozenset[int], max_model_len: int,
                 config: SchedulerConfig = SchedulerConfig(), on_close: Callable[[], None] | None = None,
                 early_ttl_s: float = 60.0, on_failure: str = "recompute", faults: FaultPoints | None = None,
                 local_chunk_tokens: int | None = None) -> None:
        """`local_chunk_tokens`: take local prefills, at most this many prompt tokens per step."""
        if on_failure not in ON_FAILURE:
            raise ConfigError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.local_chunk_tokens = local_chunk_tokens   # (before the shell asks for the commands)
        super().__init__(name, runner, blocks, vocab_size=vocab_size, max_model_len=max_model_len,
                         on_close=on_close, faults=faults)
        self.receiver = receiver
        self.on_failure = on_failure
        if local_chunk_tokens is None:
            self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                       max_model_len), blocks, eos_token_ids)
        else:   # every running request decodes in each step, a chunk of prefill rides along
            self.scheduler = ChunkedScheduler(SchedulerConfig(config.max_num_seqs,
                                                              config.max_num_seqs + local_chunk_tokens,
                                                              max_model_len), blocks, eos_token_ids)
        self._local_prefill_s: dict[str, float] = {}   # req_id -> seconds in its chunks, until its first token
        self.pending: deque[tuple[SeqState, TransferOffer]] = deque()
        self._pulls: dict[str, _Pull] = {}          # transfer_id -> pull
        self._pull_of: dict[str, str] = {}          # req_id -> transfer_id
        self._transfer_s: dict[str, float] = {}     # reported with the request's next tokens
        self._early: dict[str, _EarlyPull] = {}     # req_id -> a pull from an early offer
        self.early_ttl_s = early_ttl_s
        self.num_prefetched = 0                     # early offers taken (stream_layers)
        self.num_failed_pulls = 0                   # pulls that failed or could not start
        self.kv_bytes_received = 0                  # bytes of KV that crossed the wire to here
        self.kv_tokens_skipped = 0                  # prompt tokens whose KV a pull found here (not moved)
        self.kv_received: dict[str, list[int]] = {} # by way the bytes came (shm, zmq, ...): [pulls, bytes]

    # -- commands ---------------------------------------------------------------------
    def commands(self) -> dict[str, Handler]:
        local = {"prefill": self.local_prefill} if self.local_chunk_tokens is not None else {}
        return {**local, "decode": self.submit,
                "prefetch": lambda msg, now: self.prefetch(msg.offer, now, msg.prompt_token_ids),
                "abort": lambda msg, now: self.abort(msg.req_id),
                "peer_lost": lambda msg, now: self.peer_lost(msg.endpoint)}

    def local_prefill(self, work: wpb.PrefillWork, now: float) -> None:
        """Prefill a request here (no KV moves), then decode it."""
        if self._knows(work.req_id):
            self._fail(work.req_id, f"request id {work.req_id!r} is already here")
            return
        checked = self._checked(work.req_id, work.prompt_token_ids, work.sampling)
        if checked is None:
            return
        ids, params = checked
        self._local_prefill_s[work.req_id] = 0.0
        self.scheduler.add(SeqState(work.req_id, ids, params, arrival_time=now))

    def submit(self, work: wpb.DecodeWork, now: float) -> None:
        if self._knows(work.req_id):   # a resent work: the request here is healthy, keep it
            log.warning("%s ignored a second DecodeWork for request %r", self.name, work.req_id)
            return
        checked = self._checked(work.req_id, work.prompt_token_ids, work.sampling)
        if checked is None:
            return
        ids, params = checked
        try:
            if not 0 <= work.first_token_id < self.vocab_size:
                raise EngineError(f"first token id {work.first_token_id} is outside the vocabulary")
            offer = load_offer(work.offer)
            if offer.num_tokens != len(ids) or offer.req_id != work.req_id:
                raise EngineError(f"the KV offer (request {offer.req_id!r}, {offer.num_tokens} tokens) does not "
                                  f"match request {work.req_id!r} with a prompt of {len(ids)} tokens")
        except Exception as e:   # whatever the bytes were, this request fails and the worker goes on
            self._fail(work.req_id, f"bad decode work: {e}")
            return
        seq = SeqState(work.req_id, ids, params, arrival_time=now)
        seq.output_token_ids.append(work.first_token_id)
        early = self._early.pop(work.req_id, None)
        if early is not None and early.offer.transfer_id == offer.transfer_id \
                and early.cached_prompt in ((), tuple(ids)):   # (its cached blocks are this prompt's)
            self._claim(seq, early)
            return
        if early is not None:   # another transfer: that early pull is of no use
            self._drop_early(early)
        self.pending.append((seq, offer))

    def prefetch(self, offer: TransferOffer | bytes, now: float, prompt_token_ids=()) -> bool:
        """Start pulling a streamed offer before its DecodeWork; False when it is not taken
        (no room now, a bad offer, a request known here): the DecodeWork then pulls as usual.
        `prompt_token_ids` (the router sends them): what a prefix cache here is looked up by."""
        try:
            offer = load_offer(offer) if isinstance(offer, bytes) else offer
        except Exception as e:
            log.warning("%s ignored an early offer it cannot load: %s", self.name, e)
            return False
        if self._knows(offer.req_id) or offer.req_id in self._early:
            return False
        busy = len(self.scheduler.running) + len(self._pulls) + len(self._early)
        need = offer.num_tokens + 1   # the prompt's KV and the first token's slot
        prompt = list(prompt_token_ids) if len(prompt_token_ids) == offer.num_tokens else []
        if busy >= self.scheduler.config.max_num_seqs or need > self.max_model_len \
                or not self._room_for(need, prompt, offer):
            return False
        block_ids, skip = self._blocks_for(need, prompt, offer)
        try:
            self.receiver.pull(offer, block_ids, skip)
        except Exception as e:   # its DecodeWork will try again (and abort the offer if it fails too)
            log.warning("%s could not start an early pull of %r: %s", self.name, offer.req_id, e)
            self.blocks.free(block_ids)
            return False
        self._early[offer.req_id] = _EarlyPull(offer, block_ids, time.monotonic(),
                                               cached_prompt=tuple(prompt) if skip else ())
        self.kv_tokens_skipped += skip
        self.num_prefetched += 1
        self.faults.reach("decode.pull")
        return True

    def _claim(self, seq: SeqState, early: _EarlyPull) -> None:
        """The DecodeWork of an early pull: join it, or run at once if its KV is here."""
        seq.block_ids = early.block_ids
        if early.done_at is None:
            self._pulls[early.offer.transfer_id] = _Pull(seq, early.offer, early.started)
            self._pull_of[seq.req_id] = early.offer.transfer_id
            return
        self._transfer_s[seq.req_id] = early.done_at - early.started
        if self.blocks.enable_prefix_caching:   # a later prompt over this prefix finds it here
            self.blocks.set_hashes(seq.block_ids, seq.prompt_token_ids)
        self.scheduler.add_running(seq)

    def _drop_early(self, early: _EarlyPull) -> None:
        if early.done_at is None:
            self.receiver.abort(early.offer.transfer_id)
        self.blocks.free(early.block_ids)

    def _knows(self, req_id: str) -> bool:
        return (req_id in self._pull_of or self.scheduler.get(req_id) is not None
                or any(seq.req_id == req_id for seq, _ in self.pending))

    def abort(self, req_id: str) -> None:
        early = self._early.pop(req_id, None)
        if early is not None:
            self._drop_early(early)
        for entry in self.pending:
            if entry[0].req_id == req_id:
                self.pending.remove(entry)
                return
        tid = self._pull_of.pop(req_id, None)
        if tid is not None:
            pull = self._pulls.pop(tid)
            self.receiver.abort(tid)
            self.blocks.free(pull.seq.block_ids)
            return
        self._transfer_s.pop(req_id, None)
        self._local_prefill_s.pop(req_id, None)
        self.scheduler.abort(req_id)

    def peer_lost(self, endpoint: str) -> None:
        """A prefill instance died: its pulls fail at the next poll, at once (not after the
        receiver's timeouts), and requests still waiting here for its KV fail now."""
        why = f"the prefill instance of KV sender {endpoint} died"
        self.receiver.fail_endpoint(endpoint, why)
        for entry in [e for e in self.pending if e[1].endpoint == endpoint]:
            self.pending.remove(entry)
            self._pull_failed(entry[0], why)

    # -- the step -----------------------------------------------------------------------
    def step(self, now: float) -> wpb.FromWorker | None:
        """Admit what fits, land finished pulls, run one decode step; return the router's news."""
        self._admit(now)
        self._land_pulls(time.monotonic())   # durations are measured on the monotonic clock
        self._expire_early(time.monotonic())
        stepped = False
        if self.scheduler.has_unfinished():
            plan = self.scheduler.schedule(now)
            if plan is not None:
                try:
                    result, elapsed = self._timed(lambda: self.runner.execute(plan))
                except Exception as e:   # the batch fails, the worker and later requests go on
                    for work in plan.seqs:
                        self.scheduler.abort(work.req_id)
                        self._transfer_s.pop(work.req_id, None)
                        self._local_prefill_s.pop(work.req_id, None)
                        self._step_failed(work.req_id, e)
                    return self._flush(True)
                finished = {s.req_id: s for s in self.scheduler.update(plan, result)}
                for work, token in zip(plan.seqs, result.token_ids, strict=True):
                    if work.req_id in self._local_prefill_s:
                        self._local_prefill_s[work.req_id] += elapsed
                    if token != NO_TOKEN:   # (a prefill chunk short of its prompt's end samples nothing)
                        self._report(work.req_id, token, finished)
                stepped = True
        return self._flush(stepped)

    def _admit(self, now: float) -> None:
        while self.pending:
            seq, offer = self.pending[0]
            if len(self.scheduler.running) + len(self._pulls) + len(self._early) >= self.scheduler.config.max_num_seqs:
                return
            # blocks for the prompt's KV and the slot of the first token, fed in the first step
            if not self._room_for(seq.num_tokens, seq.prompt_token_ids, offer):
                return
            self.pending.popleft()
            # the prompt's KV lands in the first blocks (past a prefix cached here), the first
            # token's slot is reserved with them
            seq.block_ids, skip = self._blocks_for(seq.num_tokens, seq.prompt_token_ids, offer)
            try:
                self.receiver.pull(offer, seq.block_ids, skip)
            except Exception as e:   # a bad offer, a dead sender: on_failure, not a lost request
                self.receiver.abort_offer(offer)   # and a live prefill side frees its blocks now
                self._pull_failed(seq, f"pull could not start: {e}")
                continue
            self.kv_tokens_skipped += skip
            self._pulls[offer.transfer_id] = _Pull(seq, offer, time.monotonic())
            self._pull_of[seq.req_id] = offer.transfer_id
            self.faults.reach("decode.pull")

    def _room_for(self, num_tokens: int, prompt, offer: TransferOffer) -> bool:
        if not (self.blocks.enable_prefix_caching and prompt):
            return blocks_needed(num_tokens, self.blocks.block_size) <= self.blocks.num_free_blocks
        return self.blocks.can_allocate_cached(num_tokens, prompt, self._skip_unit(offer))

    def _blocks_for(self, num_tokens: int, prompt, offer: TransferOffer) -> tuple[list[int], int]:
        """Blocks for a pulled request's tokens: a prefix of its prompt cached here shared (whole
        blocks on both sides of the transfer), fresh ones for the rest; and the tokens to skip."""
        if not (self.blocks.enable_prefix_caching and prompt):
            return self.blocks.allocate(num_tokens), 0
        return self.blocks.allocate_cached(num_tokens, prompt, self._skip_unit(offer), to_compute=False)

    def _skip_unit(self, offer: TransferOffer) -> int:
        return math.lcm(self.blocks.block_size, offer.layout.block_size)

    def _land_pulls(self, now: float) -> None:
        early_of = {e.offer.transfer_id: e for e in self._early.values() if e.done_at is None}
        for result in self.receiver.poll():
            if result.status is TransferStatus.DONE:
                counts = self.kv_received.setdefault(result.via or "?", [0, 0])
                counts[0] += 1
                counts[1] += result.nbytes
                self.kv_bytes_received += result.nbytes
            early = early_of.get(result.transfer_id)
            if early is not None:
                self._landed_early(early, result, now)
                continue
            pull = self._pulls.pop(result.transfer_id, None)
            if pull is None:
                continue   # aborted meanwhile; its blocks are already free
            del self._pull_of[pull.seq.req_id]
            self._transfer_s[pull.seq.req_id] = now - pull.started
            if result.status is TransferStatus.DONE:
                if self.blocks.enable_prefix_caching:   # a later prompt over this prefix finds it here
                    self.blocks.set_hashes(pull.seq.block_ids, pull.seq.prompt_token_ids)
                self.scheduler.add_running(pull.seq)
            else:
                self._pull_failed(pull.seq, result.error or "transfer failed")

    def _landed_early(self, early: _EarlyPull, result, now: float) -> None:
        if result.status is TransferStatus.DONE:
            early.done_at = now
            return
        # failed (or the request ended at its first token): the DecodeWork, if any, pulls again
        log.info("%s dropped the early pull of %r: %s", self.name, early.offer.req_id, result.error)
        del self._early[early.offer.req_id]
        self.blocks.free(early.block_ids)

    def _expire_early(self, now: float) -> None:
        for req_id in [r for r, e in self._early.items() if e.done_at is not None
                       and now - e.done_at > self.early_ttl_s]:
            log.warning("%s freed the early KV of %r: no DecodeWork came", self.name, req_id)
            self.blocks.free(self._early.pop(req_id).block_ids)

    def _pull_failed(self, seq: SeqState, why: str) -> None:
        """A pull failed or could not start (its lease is already ended or given back)."""
        self.num_failed_pulls += 1
        if self.on_failure == "recompute":
            self._recompute(seq, why)
            return
        log.warning("%s gives request %r back (%s): %s", self.name, seq.req_id, self.on_failure, why)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        self._transfer_s.pop(seq.req_id, None)
        # reprefill: the request is sound, only its KV is lost: the router prefills it elsewhere
        self._fail(seq.req_id, f"KV transfer failed: {why}", retry=self.on_failure == "reprefill")

    def _recompute(self, seq: SeqState, why: str) -> None:
        log.warning("%s recomputes request %r locally: %s", self.name, seq.req_id, why)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_preemptions += 1
        self.scheduler.add(seq)   # WAITING: prefilled here over prompt + first token

    def _report(self, req_id: str, token: int, finished: dict[str, SeqState]) -> None:
        seq = finished.get(req_id) or self.scheduler.get(req_id)
        if seq is None:
            return   # aborted while the step ran
        prefill_s = self._local_prefill_s.pop(req_id, None)
        if prefill_s is not None:   # a local prefill's first token: as a prefill worker reports it
            start = seq.first_scheduled_time if seq.first_scheduled_time is not None else seq.arrival_time
            done = wpb.PrefillDone(req_id=req_id, first_token_id=token, queue_s=start - seq.arrival_time,
                                   prefill_s=prefill_s)
            if req_id in finished:
                done.finish_reason = seq.finish_reason.value
            self._out.prefilled.append(done)
            return
        tokens = wpb.Tokens(req_id=req_id, token_ids=[token])
        if req_id in finished:
            tokens.finish_reason = seq.finish_reason.value
        transfer_s = self._transfer_s.pop(req_id, None)
        if transfer_s is not None:
            tokens.transfer_s = transfer_s
        self._stream(tokens)

    # -- state ------------------------------------------------------------------------------
    def _queue_load(self) -> dict[str, int]:
        return dict(num_waiting=len(self.pending) + len(self.scheduler.waiting) + len(self._pulls),
                    num_running=len(self.scheduler.running))

    def stats(self) -> dict:
        return {**super().stats(), "num_prefetched": self.num_prefetched, "num_failed_pulls": self.num_failed_pulls,
                "kv_bytes_received": self.kv_bytes_received, "kv_tokens_skipped": self.kv_tokens_skipped,
                "kv_received": {via: list(c) for via, c in self.kv_received.items()}}

    def is_idle(self) -> bool:
        return not (self.pending or self._pulls or self._early or self.scheduler.has_unfinished())

    def next_wakeup(self, now: float) -> float | None:
        if self.scheduler.has_unfinished():
            return 0.0
        if self._pulls or any(e.done_at is None for e in self._early.values()):
            # with sockets to sleep on (wait_sockets) the host wakes on the sender's reply;
            # this only bounds the wait, for the receiver's timeouts
            return 0.005 if self.wait_sockets() is not None else 0.0002
        if self._early:
            return 1.0   # only to free unclaimed early KV in time
        return 0.005 if self.pending else None

    def wait_sockets(self) -> list | None:
        """zmq sockets whose messages are work for this worker (the host's poller sleeps on
        them too); None: it must not sleep past next_wakeup."""
        return self.receiver.wait_sockets()

    def _close_parts(self) -> None:
        self.receiver.close()
