"""The one shell every worker kind is written in: prefill, decode and colocated.

What the three share lives here, once: the outbox of news for the router
(`_out`, `_fail`, `_flush`), step timing (`_timed`, `num_steps`,
`mean_step_s`), the load snapshot, command dispatch, close, the test-only
fault points (`worker_shell.faults`) and the defaults of the host's
questions (`is_idle`, `next_wakeup`, `wait_sockets`). A worker kind writes
only what differs: its `step`, the commands it takes (`commands`), its queue
figures for the snapshot (`_queue_load`) and its transfer side (`_close_parts`).

The step loop, the sockets and the heartbeats live in `cluster.worker_host`,
the Ray actor in `cluster.actors`; tests step a worker in-process.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from engine.block_manager import BlockManager
from engine.errors import EngineError
from engine.runner import Runner
from engine.sampling_params import SamplingParams
from engine.sequence import StepResult
from engine.validation import validate_request
from protos import worker_pb2 as wpb
from worker_shell.faults import FaultPoints

log = logging.getLogger(__name__)

Handler = Callable[[Any, float], None]   # (the command's message, now)


class WorkerShell(ABC):
    role = "worker"
    stream_layers = False   # a prefill worker that hands out early offers through `on_offer`

    def __init__(self, name: str, runner: Runner, blocks: BlockManager, *, vocab_size: int, max_model_len: int,
                 on_close: Callable[[], None] | None = None, faults: FaultPoints | None = None) -> None:
        self.name = name
        self.runner, self.blocks = runner, blocks
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.faults = faults or FaultPoints()
        self._on_close = on_close
        self._out = wpb.FromWorker(instance=name)
        self.num_steps, self._step_time = 0, 0.0
        self._handlers = self.commands()

    # -- commands ---------------------------------------------------------------------
    @abstractmethod
    def commands(self) -> dict[str, Handler]:
        """The ToWorker kinds this worker takes, each with its handler."""

    def handle(self, msg: wpb.ToWorker, now: float) -> None:
        kind = msg.WhichOneof("kind")
        handler = self._handlers.get(kind) if kind else None
        if handler is not None:
            handler(getattr(msg, kind), now)
            return
        # a request's command is answered (the router frees it); anything else is only logged
        req_id = getattr(getattr(msg, kind), "req_id", None) if kind else ""
        if req_id is None:
            log.warning("%s ignored a %r command: a %s worker does not take it", self.name, kind, self.role)
            return
        self._fail(req_id, f"a {self.role} worker cannot take {kind!r}")

    def _checked(self, req_id: str, prompt_token_ids, sampling) -> tuple[list[int], SamplingParams] | None:
        """A work message's prompt and sampling, checked as the router checks them (a worker
        never trusts its socket); None, with the request failed, when they do not pass."""
        try:
            params = SamplingParams.from_message(sampling)
            ids = list(prompt_token_ids)
            validate_request(ids, params, self.vocab_size, self.max_model_len, self.blocks.num_blocks,
                             self.blocks.block_size)
        except EngineError as e:
            self._fail(req_id, str(e))
            return None
        return ids, params

    # -- the step ------------------------------------------------------------------------
    @abstractmethod
    def step(self, now: float) -> wpb.FromWorker | None:
        """Do what is due; return what to tell the router (None: nothing new)."""

    def _timed(self, run: Callable[[], StepResult]) -> tuple[StepResult, float]:
        """Run one model step and count it: (its result, its seconds). A step that raises is
        not counted (the caller fails its requests)."""
        start = time.monotonic()
        self.faults.delay_step()   # inside the timing: a slow instance looks slow to the router
        result = run()
        elapsed = time.monotonic() - start
        self.num_steps += 1
        self._step_time += elapsed
        return result, elapsed

    @property
    def mean_step_s(self) -> float:
        return self._step_time / self.num_steps if self.num_steps else 0.0

    # -- the outbox ------------------------------------------------------------------------
    def _fail(self, req_id: str, error: str, retry: bool = False) -> None:
        """`retry`: the request is sound, only this attempt failed here; the router runs it again."""
        self._out.failed.append(wpb.Failed(req_id=req_id, error=error, retry=retry))

    def _step_failed(self, req_id: str, error: Exception) -> None:
        """A step that raised: the fault is this instance's (a broken rank, a bug), not the
        request's, so the router runs it again elsewhere and counts it against this instance."""
        self._out.failed.append(wpb.Failed(req_id=req_id, retry=True, instance_fault=True,
                                           error=f"{self.role} step failed: {type(error).__name__}: {error}"))

    def _stream(self, tokens: wpb.Tokens) -> None:
        """Tokens of a running request for the router (fault point `<role>.stream` once sent)."""
        self._out.tokens.append(tokens)
        self.faults.reach(f"{self.role}.stream", after_send=True)

    def _flush(self, stepped: bool) -> wpb.FromWorker | None:
        """The news since the last flush with a fresh snapshot; None when there is none and
        no step ran (the host's heartbeat then carries the snapshot)."""
        out = self._out
        if not (stepped or out.prefilled or out.tokens or out.failed):
            return None
        out.load.CopyFrom(self.load())
        self._out = wpb.FromWorker(instance=self.name)
        return out

    # -- state -----------------------------------------------------------------------------
    def load(self) -> wpb.Load:
        return wpb.Load(num_free_blocks=self.blocks.num_free_blocks, num_blocks=self.blocks.num_blocks,
                        num_steps=self.num_steps, mean_step_s=self.mean_step_s, **self._queue_load())

    def _queue_load(self) -> dict[str, int]:
        """This kind's queue figures of the snapshot (num_waiting, num_running, ...)."""
        return {}

    @property
    def transfer_endpoint(self) -> str:
        """Where decode workers pull this worker's KV from (what its offers name); "" if it sends none."""
        return ""

    def stats(self) -> dict:
        """What the actor reports to the cluster (tests, drills): plain data."""
        b = self.blocks
        return {"role": self.role, "num_free_blocks": b.num_free_blocks, "num_blocks": b.num_blocks,
                "idle": self.is_idle(), "num_steps": self.num_steps,
                # prefix caching: prompt tokens looked up, found (not computed again), cache churn
                "prompt_tokens": b.num_queried_tokens, "prefix_hit_tokens": b.num_hit_tokens,
                "num_cached_blocks": b.num_cached_blocks, "num_evictions": b.num_evictions}

    @abstractmethod
    def is_idle(self) -> bool:
        """Nothing queued, running, leased or in flight."""

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until the step loop must run again with no command (None: only on a command)."""
        return None if self.is_idle() else 0.0

    def wait_sockets(self) -> list | None:
        """zmq sockets whose messages are work for this worker (the host's poller sleeps on
        them too); None: it must not sleep past next_wakeup. Default: only commands bring work."""
        return []

    # -- faults (tests only) -----------------------------------------------------------------
    def die_due(self) -> bool:
        """An after-send fault point was reached: the host sends what it flushed, then calls `die`."""
        return self.faults.due

    def die(self) -> None:
        self.faults.die()

    # -- the end ---------------------------------------------------------------------------------
    def _close_parts(self) -> None:
        """Close this kind's own parts (its transfer side) before `on_close` releases the cache."""

    def close(self) -> None:
        try:
            self._close_parts()
        finally:
            if self._on_close is not None:
                self._on_close()
