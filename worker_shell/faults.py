"""Test-only faults of a worker: it kills itself at a named point of a request's life, or steps slowly.

The cluster builds one `FaultPoints` per worker from the config's `faults`
section (`cluster.worker_factory`); a worker without faults gets the inert
default. The points (`POINTS`) are reached by the workers themselves:

  prefill.queued     a request was queued at a prefill worker
  prefill.forward    inside a prefill forward pass
  prefill.leased     the PrefillDone carrying a KV offer has been sent   (after send)
  decode.pull        a decode worker started a pull that has not landed
  decode.stream      a Tokens message has been sent                       (after send)
  colocated.stream   the same, for the colocated worker                   (after send)

A point "after send" cannot kill where it is reached: the message is still in
the worker's outbox. It marks the kill as due instead; the host
(`cluster.worker_host`) sends the flushed message, waits until it is out, and
then calls `die()`. Stepped in-process without a host, such a worker never dies.

SIGKILL, not an exception or exit: the point is to test what the rest of the
cluster does when a process vanishes without a word (no close, no ABORT, no
lease handed back).
"""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)
POINTS = ("prefill.queued", "prefill.forward", "prefill.leased", "decode.pull", "decode.stream", "colocated.stream")


class FaultPoints:
    def __init__(self, die_at: str | None = None, after: int = 1, step_delay_s: float = 0.0) -> None:
        if after < 1:
            raise ValueError(f"faults.after must be >= 1, got {after}")
        if not step_delay_s >= 0:
            raise ValueError(f"faults.step_delay_s must be >= 0, got {step_delay_s}")
        self.die_at, self.after, self.step_delay_s = die_at, after, step_delay_s
        self.num_reached = 0
        self.due = False   # an after-send point was reached: die once the message is out

    @property
    def active(self) -> bool:
        return self.die_at is not None or self.step_delay_s > 0

    def reach(self, point: str, after_send: bool = False) -> None:
        """This worker reached `point`; at the `after`-th time, it dies (now, or once its
        next message is sent)."""
        if point != self.die_at:
            return
        self.num_reached += 1
        if self.num_reached != self.after:
            return
        if after_send:
            self.due = True
        else:
            self.die()

    def delay_step(self) -> None:
        """Inside a timed step: a busy instance takes this much longer for each."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)

    def die(self) -> None:
        log.warning("fault %s (time %d): pid %d kills itself", self.die_at, self.num_reached, os.getpid())
        logging.shutdown()   # the line above is what a drill's log shows of the death
        os.kill(os.getpid(), signal.SIGKILL)
