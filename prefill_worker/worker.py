"""The prefill worker: runs prompts, samples each first token, offers the KV to decode.

Lifecycle of a request here:
  1. `submit` (router -> PrefillWork): validated, queued in WAITING (FCFS).
  2. `step` -> scheduler.schedule: while the token budget and free blocks
     allow, waiting prompts are allocated blocks and run together in one
     packed prefill step; each gets its first token.
  3. The first token ends the request (EOS, max_tokens = 1, context full):
     its blocks are freed at once and PrefillDone carries the finish reason.
  4. Otherwise its blocks go under a transfer lease (`sender.offer`) and
     PrefillDone carries the offer; the router forwards it to a decode worker.
  5. The lease ends (the decode side acknowledged, failed, aborted, or the
     lease expired): `sender.poll` reports it and the blocks are freed.
  6. `abort` at any point: WAITING -> dropped; LEASED -> lease aborted, freed.
  7. This process dies (a crash, or a test's fault point): nothing is handed
     back; the router learns it from Ray, tells the decode instances
     (`peer_lost`: their pulls from here fail at once, under
     `transfer.on_failure`) and runs the request again elsewhere.

With `stream_layers` the lease of step 4 starts before the forward pass
(`offer(stream=True)`): `on_offer(req_id, offer_bytes)` hands the offer out at
once, so a decode worker can pull while the prompt runs, and the model's
per-layer hook sends each layer's KV as soon as it is stored. PrefillDone
carries the same offer; a first token that ends the request aborts it.

A `WorkerShell` (outbox, timing, snapshot, close, fault points): the step
loop and the sockets live in `cluster.worker_host`, the Ray actor in
`cluster.actors`; tests step it in-process.
"""
from __future__ import annotations

import pickle
import time
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.errors import EngineError
from engine.runner import Runner
from engine.scheduler import cache_computed
from engine.sequence import FinishReason, SeqState, StepPlan, StepResult
from kv_transfer.base import KVSender
from prefill_worker.scheduler import PrefillScheduler, PrefillSchedulerConfig
from protos import worker_pb2 as wpb
from worker_shell.base import Handler, WorkerShell
from worker_shell.faults import FaultPoints


class PrefillWorker(WorkerShell):
    role = "prefill"

    def __init__(self, name: str, runner: Runner, blocks: BlockManager, sender: KVSender, *, vocab_size: int,
                 eos_token_ids: frozenset[int], max_model_len: int,
                 config: PrefillSchedulerConfig = PrefillSchedulerConfig(),
                 on_close: Callable[[], None] | None = None, stream_layers: bool = False,
                 on_offer: Callable[[str, bytes], None] | None = None, faults: FaultPoints | None = None) -> None:
        if stream_layers and not sender.supports_streaming:
            raise EngineError(f"stream_layers: the {type(sender).__name__} cannot stream layers "
                              f"(transfer backend zmq, or shm zero copy)")
        super().__init__(name, runner, blocks, vocab_size=vocab_size, max_model_len=max_model_len,
                         on_close=on_close, faults=faults)
        self.stream_layers = stream_layers
        self.on_offer = on_offer   # the worker host sends early offers to the router at once
        self.sender = sender
        self.eos_token_ids = eos_token_ids
        self.scheduler = PrefillScheduler(config, blocks)
        self._leases: dict[str, str] = {}            # req_id -> transfer_id
        self._lease_blocks: dict[str, tuple[str, list[int]]] = {}  # transfer_id -> (req_id, blocks)
        self._offers: dict[str, bytes] = {}          # transfer_id -> the pickled offer
        self._arrival: dict[str, float] = {}

    # -- commands ---------------------------------------------------------------------
    def commands(self) -> dict[str, Handler]:
        return {"prefill": self.submit, "abort": lambda msg, now: self.abort(msg.req_id, now)}

    def submit(self, work: wpb.PrefillWork, now: float) -> None:
        checked = self._checked(work.req_id, work.prompt_token_ids, work.sampling)
        if checked is None:
            return
        ids, params = checked
        seq = SeqState(work.req_id, ids, params, arrival_time=now)
        self._arrival[work.req_id] = now
        self.scheduler.add(seq)
        self.faults.reach("prefill.queued")

    def abort(self, req_id: str, now: float) -> None:
        if self.scheduler.abort(req_id) is not None:
            self._arrival.pop(req_id, None)
            return
        tid = self._leases.get(req_id)
        if tid is not None:
            end = self.sender.abort(tid, now)
            if end is not None:
                self._free_lease(tid)

    # -- the step -----------------------------------------------------------------------
    def step(self, now: float) -> wpb.FromWorker | None:
        """Serve transfers, run one prefill batch if any; return what to tell the router."""
        for end in self.sender.poll(now):
            self._free_lease(end.transfer_id)
        scheduled = self.scheduler.schedule(now)
        if scheduled is not None:
            plan, seqs = scheduled
            try:
                result, elapsed = self._timed(lambda: self._execute(plan, seqs, time.monotonic()))
            except Exception as e:   # the batch fails, the worker and other requests go on
                for seq in seqs:
                    self._drop_batch_seq(seq, now)
                    self._step_failed(seq.req_id, e)
                return self._flush(True)
            done = time.monotonic()
            for seq, work, token in zip(seqs, plan.seqs, result.token_ids, strict=True):
                cache_computed(self.blocks, seq, work)   # before its blocks are leased or freed
                self._hand_off(seq, token, elapsed, done)
        return self._flush(scheduled is not None)

    def _execute(self, plan: StepPlan, seqs: list[SeqState], now: float) -> StepResult:
        if not self.stream_layers:
            if not self.runner.runs_layer_hook:
                self.faults.reach("prefill.forward")
                return self.runner.execute(plan)
            # Earlier requests' pulls are answered between layers, not after the batch:
            # a long prompt would otherwise hold the previous request's KV for seconds.
            serve = self._in_forward(lambda i: self.sender.serve(time.monotonic()))
            return self.runner.execute(plan, on_layer=serve)
        tids = []
        for seq in seqs:   # offered before the forward: layers go out as they are computed
            offer = self._offer(seq, now, stream=True)
            tids.append(offer.transfer_id)
            if self.on_offer is not None:
                self.on_offer(seq.req_id, pickle.dumps(offer))
        push = self._in_forward(lambda i: self.sender.layers_ready(tids, i + 1, time.monotonic()))
        result = self.runner.execute(plan, on_layer=push)
        self.sender.layers_ready(tids, None, time.monotonic())   # all of them, whatever the runner called
        return result

    def _in_forward(self, hook: Callable[[int], None]) -> Callable[[int], None]:
        """The per-layer hook, with fault point `prefill.forward` after the first layer (once a forward)."""
        if self.faults.die_at != "prefill.forward":
            return hook

        def on_layer(i: int) -> None:
            if i == 0:
                self.faults.reach("prefill.forward")
            hook(i)
        return on_layer

    def _offer(self, seq: SeqState, now: float, stream: bool = False):
        # The KV of the prompt is what decode needs; the first token's KV is made there.
        offer = self.sender.offer(seq.req_id, seq.block_ids, len(seq.prompt_token_ids), now, stream=stream)
        self._leases[seq.req_id] = offer.transfer_id
        self._lease_blocks[offer.transfer_id] = (seq.req_id, seq.block_ids)
        self._offers[offer.transfer_id] = pickle.dumps(offer)
        return offer

    def _drop_batch_seq(self, seq: SeqState, now: float) -> None:
        """A sequence of a failed batch: its lease (streaming) or its blocks go."""
        tid = self._leases.get(seq.req_id)
        if tid is not None:
            self.sender.abort(tid, now)
            self._free_lease(tid)
        else:
            self.blocks.free(seq.block_ids)
        seq.block_ids = []
        self._arrival.pop(seq.req_id, None)

    def _hand_off(self, seq: SeqState, token: int, elapsed: float, now: float) -> None:
        seq.output_token_ids.append(token)
        queue_s = seq.first_scheduled_time - self._arrival.pop(seq.req_id, seq.first_scheduled_time)
        done = wpb.PrefillDone(req_id=seq.req_id, first_token_id=token, queue_s=queue_s, prefill_s=elapsed)
        reason = self._first_token_ends(seq, token)
        streamed = self._leases.get(seq.req_id)
        if reason is not None:
            if streamed is not None:   # an early receiver learns it at once (ERROR)
                self.sender.abort(streamed, now)
                self._free_lease(streamed)
            else:
                self.blocks.free(seq.block_ids)
            done.finish_reason = reason.value
        else:
            tid = streamed if streamed is not None else self._offer(seq, now).transfer_id
            done.offer = self._offers[tid]
            self.faults.reach("prefill.leased", after_send=True)   # the KV waits for a pull that may never come
        seq.block_ids = []
        self._out.prefilled.append(done)

    def _first_token_ends(self, seq: SeqState, token: int) -> FinishReason | None:
        if token in self.eos_token_ids and not seq.sampling.ignore_eos:
            return FinishReason.EOS
        if seq.sampling.max_tokens <= 1:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_model_len:
            return FinishReason.CONTEXT
        return None

    def _free_lease(self, tid: str) -> None:
        entry = self._lease_blocks.pop(tid, None)
        self._offers.pop(tid, None)
        if entry is not None:
            req_id, block_ids = entry
            self.blocks.free(block_ids)
            if self._leases.get(req_id) == tid:
                del self._leases[req_id]

    # -- state ------------------------------------------------------------------------------
    def _queue_load(self) -> dict[str, int]:
        return dict(num_waiting=len(self.scheduler.waiting), num_running=0,
                    queued_prompt_tokens=self.scheduler.queued_prompt_tokens, num_leases=len(self._lease_blocks))

    @property
    def transfer_endpoint(self) -> str:
        return self.sender.endpoint

    def is_idle(self) -> bool:
        return not self.scheduler.waiting and not self._lease_blocks

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until the step loop must run again with no command (None: only on a command)."""
        if self.scheduler.waiting:
            return 0.0
        if not self._lease_blocks:
            return None
        # with sockets to sleep on (wait_sockets) the host wakes on a PULL or ACK; this only
        # bounds the wait, for lease expiry
        return 0.005 if self.wait_sockets() is not None else 0.0005

    def wait_sockets(self) -> list | None:
        """zmq sockets whose messages are work for this worker (the host's poller sleeps on
        them too); None: it must not sleep past next_wakeup."""
        return self.sender.wait_sockets()

    def _close_parts(self) -> None:
        self.sender.close()
