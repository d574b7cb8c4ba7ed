"""The colocated worker (the baselines): one instance runs both phases of its requests.

Lifecycle of a request here:
  1. `submit` (router -> PrefillWork, the same message a prefill worker takes):
     validated, queued in WAITING (FCFS) of the engine's continuous-batching
     scheduler.
  2. `step` -> scheduler.schedule. `colocated`: waiting prompts are admitted
     first whenever the budget and free blocks allow and run as one packed
     prefill step while the running batch waits (vLLM's default scheduler);
     otherwise every running request decodes one token. `colocated_chunked`
     (Sarathi-Serve): each step holds every running decode plus prefill
     chunks that fill the token budget, so decodes never stall behind a
     long prompt.
  3. The first token goes back as PrefillDone (its queue and prefill times,
     no KV offer: nothing moves) -> RUNNING; a first token that ends the
     request (EOS, max_tokens = 1, context full) carries its finish reason.
  4. RUNNING: one token per step, streamed back as Tokens; EOS, max_tokens or
     a full context end it and free its blocks. A request short of blocks
     preempts the newest one, which is recomputed later.
  5. `abort` at any point frees whatever the request holds.
  6. This process dies: the router resumes each request elsewhere from its
     prompt and the tokens already streamed (a prefill of both: the seeded
     sampler draws by position, so the tokens that follow are the same).

A `WorkerShell` (outbox, timing, snapshot, close, fault points): the step
loop and the sockets live in `cluster.worker_host`, the Ray actor in
`cluster.actors`; tests step it in-process. It lives apart from
`decode_worker`: it shares the engine's scheduler with it, not its transfer.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.chunked_scheduler import NO_TOKEN
from engine.runner import Runner
from engine.scheduler import Scheduler
from engine.sequence import SeqState
from protos import worker_pb2 as wpb
from worker_shell.base import Handler, WorkerShell
from worker_shell.faults import FaultPoints


class ColocatedWorker(WorkerShell):
    role = "colocated"

    stream_layers = False   # no KV leaves this instance

    def __init__(self, name: str, runner: Runner, blocks: BlockManager, scheduler: Scheduler, *,
                 vocab_size: int, max_model_len: int, on_close: Callable[[], None] | None = None,
                 faults: FaultPoints | None = None) -> None:
        """`scheduler`: an `engine.scheduler.Scheduler` or its chunked variant over `blocks`."""
        super().__init__(name, runner, blocks, vocab_size=vocab_size, max_model_len=max_model_len,
                         on_close=on_close, faults=faults)
        self.scheduler = scheduler
        self._prefill_s: dict[str, float] = {}     # req_id -> time spent in its prefill steps

    # -- commands ---------------------------------------------------------------------
    def commands(self) -> dict[str, Handler]:
        return {"prefill": self.submit, "abort": lambda msg, now: self.abort(msg.req_id)}

    def submit(self, work: wpb.PrefillWork, now: float) -> None:
        if self.scheduler.get(work.req_id) is not None:
            self._fail(work.req_id, f"request id {work.req_id!r} is already running here")
            return
        checked = self._checked(work.req_id, work.prompt_token_ids, work.sampling)
        if checked is None:
            return
        ids, params = checked
        self.scheduler.add(SeqState(work.req_id, ids, params, arrival_time=now))

    def abort(self, req_id: str) -> None:
        self._prefill_s.pop(req_id, None)
        self.scheduler.abort(req_id)

    # -- the step -----------------------------------------------------------------------
    def step(self, now: float) -> wpb.FromWorker | None:
        """Run one scheduled step (prefill, decode or mixed); return the router's news."""
        plan = self.scheduler.schedule(now) if self.scheduler.has_unfinished() else None
        if plan is None:
            return self._flush(False)
        try:
            result, elapsed = self._timed(lambda: self.runner.execute(plan))
        except Exception as e:   # the batch fails, the worker and later requests go on
            for work in plan.seqs:
                self.abort(work.req_id)
                self._step_failed(work.req_id, e)
            return self._flush(True)
        done = time.monotonic()
        finished = {s.req_id: s for s in self.scheduler.update(plan, result)}
        for work, token in zip(plan.seqs, result.token_ids, strict=True):
            seq = finished.get(work.req_id) or self.scheduler.get(work.req_id)
            if seq is None:
                continue   # aborted while the step ran
            if seq.first_token_time is None:
                # a prefill (or one of its chunks): its time counts towards the prefill phase
                self._prefill_s[seq.req_id] = self._prefill_s.get(seq.req_id, 0.0) + elapsed
            if token != NO_TOKEN:   # a prefill chunk short of its prompt's end samples nothing
                self._report(seq, token, work.req_id in finished, done)
        return self._flush(True)

    def _report(self, seq: SeqState, token: int, finished: bool, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            first = seq.first_scheduled_time if seq.first_scheduled_time is not None else now
            msg = wpb.PrefillDone(req_id=seq.req_id, first_token_id=token,
                                  queue_s=first - seq.arrival_time,
                                  prefill_s=self._prefill_s.pop(seq.req_id, 0.0))
            if finished:
                msg.finish_reason = seq.finish_reason.value
            self._out.prefilled.append(msg)
            return
        tokens = wpb.Tokens(req_id=seq.req_id, token_ids=[token])
        if finished:
            tokens.finish_reason = seq.finish_reason.value
        self._stream(tokens)

    # -- state ------------------------------------------------------------------------------
    def _queue_load(self) -> dict[str, int]:
        s = self.scheduler
        return dict(num_waiting=len(s.waiting), num_running=len(s.running),
                    queued_prompt_tokens=s.queued_prompt_tokens)

    def is_idle(self) -> bool:
        return not self.scheduler.has_unfinished()
