"""Conditional disaggregation: prefill each request where it meets the SLOs best. Pure.

Two ways to prefill a request (router.disaggregation: conditional):

  * remote: on the prefill instance with the least work, then its KV moves to
    a decode instance. TTFT = the prefill queue ahead of it + its own prefill.
  * local: on the decode instance that will decode it, in chunks of at most
    `chunk_tokens` riding on that instance's decode steps (Sarathi-Serve), so
    no step stalls its running decodes by more than one chunk. TTFT = the
    local prefill queue ahead of it + its own tokens, a chunk per step; the
    price is that every step of that instance, until the prompt is done,
    carries a chunk: its running requests' TPOT rises to the step time with a
    chunk.

The choice weighs the predicted TTFT of each path against the TPOT the local
path imposes on the instance's decodes. Local wins when those decodes can
absorb it and either remote would miss the TTFT SLO and local would not, or
local's TTFT is no worse than remote's (with conditional.remote_fits > 0: and
remote's would take more than that share of the SLO; below it a remote
prefill meets the TTFT SLO with room and costs the decodes nothing). The
decodes can absorb it when the time the chunks add to their steps (the stall)
fits the TPOT headroom of every request decoding there and of every request
coming there (still being prefilled: it will start decoding under the
chunks): what each may still lose and end within the TPOT SLO averaged over
its tokens (`stall_budget_s`, from the router's view of each request: tokens
so far, time since its first token, tokens left). Without that view, each
step with a chunk must stay within the TPOT SLO. Prompt tokens an instance
already holds in its prefix cache (`overlap_tokens`) are not prefilled again,
on either path.

Times come from a latency profile of the machine (router/planner/profile.py:
prefill(tokens, sum l^2), decode(batch, context)), corrected per phase by what
the workers report: measured prefill seconds over predicted (an EWMA) and each
decode instance's measured step time over predicted.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # an annotation only: router.planner's simulator builds on this module
    from router.planner.profile import PlanLatency

EWMA = 0.2
FACTOR_RANGE = (0.25, 8.0)


def stall_budget(running: Iterable[tuple[int, int, float]], step_s: float, tpot_slo_s: float) -> float:
    """The least TPOT headroom among the requests decoding on one instance, each given as (tokens
    it will have in all, tokens so far, seconds since its first token): the time each may still
    lose and end within the TPOT SLO averaged over its tokens (as clients measure TPOT), decoding
    the rest at `step_s` (inf: none running)."""
    budget = math.inf
    for total, done, decoding_s in running:
        budget = min(budget, tpot_slo_s * max(1, total - 1) - decoding_s - max(0, total - done) * step_s)
    return max(0.0, budget)


@dataclass(frozen=True)
class DecodeSide:
    name: str
    batch: int                 # requests decoding there now
    context_tokens: int        # their KV tokens in all
    queued_local_tokens: int   # prompt tokens of local prefills not done yet there
    overlap_tokens: int = 0    # of this prompt, already in its prefix cache
    step_factor: float = 1.0   # its measured decode step over the profile's
    # the most its running requests' decodes may be stalled, each still meeting the TPOT SLO on
    # average (inf: none running); None: unknown, judge each step against the TPOT SLO instead
    stall_budget_s: float | None = None


@dataclass(frozen=True)
class PrefillSide:
    name: str
    queued_tokens: int         # prompt tokens sent there, not prefilled yet
    overlap_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    local: bool
    instance: str              # the decode instance (local), or the prefill instance (remote)
    ttft_local_s: float
    ttft_remote_s: float
    tpot_local_s: float        # the chosen decode instance's step time while it prefills
    reason: str


@dataclass
class ConditionalPolicy:
    latency: PlanLatency
    ttft_slo_s: float
    tpot_slo_s: float
    chunk_tokens: int = 256
    prefill_factor: float = 1.0           # measured / predicted prefill time, smoothed
    remote_fits: float = 0.0              # a remote prefill predicted within this share of the TTFT SLO is kept

    # -- the model ----------------------------------------------------------------------------
    def prefill_s(self, tokens: int) -> float:
        """One prompt of `tokens` alone (sum of squares: one sequence)."""
        return max(0.0, self.latency.prefill(tokens, tokens * tokens)) * self.prefill_factor

    def decode_step_s(self, d: DecodeSide, extra_tokens: int = 0) -> float:
        """A step of `d`'s batch, plus `extra_tokens` of a prefill chunk riding on it."""
        base = self.latency.decode(max(1, d.batch), d.context_tokens) if d.batch else 0.0
        chunk = self.prefill_s(extra_tokens) if extra_tokens else 0.0
        return base * d.step_factor + chunk

    def ttft_remote(self, p: PrefillSide, prompt_tokens: int) -> float:
        own = max(1, prompt_tokens - p.overlap_tokens)
        return self.prefill_s(p.queued_tokens + own) if p.queued_tokens else self.prefill_s(own)

    def ttft_local(self, d: DecodeSide, prompt_tokens: int) -> tuple[float, float]:
        """(TTFT, step time while prefilling) of a local prefill on `d`."""
        own = max(1, prompt_tokens - d.overlap_tokens)
        todo = d.queued_local_tokens + own
        chunk = min(self.chunk_tokens, todo)
        steps = -(-todo // self.chunk_tokens)
        step = self.decode_step_s(d, chunk)
        return steps * step, step

    def local_stall_s(self, d: DecodeSide, prompt_tokens: int) -> float:
        """What a local prefill on `d` adds to its running requests' decode time: the chunks
        of the prompts queued there and this one's, each riding on a step."""
        todo = d.queued_local_tokens + max(1, prompt_tokens - d.overlap_tokens)
        full, rest = divmod(todo, self.chunk_tokens)
        return full * self.prefill_s(self.chunk_tokens) + (self.prefill_s(rest) if rest else 0.0)

    def tpot_kept(self, d: DecodeSide, prompt_tokens: int, step: float) -> bool:
        """Its running requests still meet the TPOT SLO with a local prefill on `d`."""
        if d.stall_budget_s is None:
            return step <= self.tpot_slo_s
        return self.local_stall_s(d, prompt_tokens) <= d.stall_budget_s

    # -- the choice ----------------------------------------------------------------------------
    def choose(self, prompt_tokens: int, decodes: list[DecodeSide], prefills: list[PrefillSide]) -> Choice | None:
        """None when there is nowhere to go. With no prefill instance, local wherever best."""
        remote = min(prefills, key=lambda p: self.ttft_remote(p, prompt_tokens), default=None)
        t_remote = self.ttft_remote(remote, prompt_tokens) if remote is not None else float("inf")
        best = None
        for d in decodes:
            t_local, step = self.ttft_local(d, prompt_tokens)
            if best is None or (t_local, step) < (best[1], best[2]):
                best = (d, t_local, step)
        if best is None:
            return None if remote is None else Choice(False, remote.name, float("inf"), t_remote, 0.0,
                                                      "no decode instance can take a local prefill")
        d, t_local, step = best
        tpot_ok = self.tpot_kept(d, prompt_tokens, step)
        faster = t_local <= t_remote and t_remote > self.remote_fits * self.ttft_slo_s
        rescues = t_remote > self.ttft_slo_s >= t_local
        if remote is None or (tpot_ok and (faster or rescues)):
            why = "no prefill instance" if remote is None else (
                f"local TTFT {t_local:.3f}s <= remote {t_remote:.3f}s" if faster else
                f"remote TTFT {t_remote:.3f}s misses the SLO, local {t_local:.3f}s meets it")
            return Choice(True, d.name, t_local, t_remote, step, why)
        why = (f"a local prefill would push {d.name}'s running requests past the TPOT SLO {self.tpot_slo_s}s"
               if not tpot_ok else f"remote TTFT {t_remote:.3f}s < local {t_local:.3f}s" if t_remote < t_local
               else f"remote TTFT {t_remote:.3f}s is within {self.remote_fits:g} of the SLO")
        return Choice(False, remote.name, t_local, t_remote, step, why)

    # -- live correction -------------------------------------------------------------------------
    def observed_prefill(self, tokens: int, seconds: float) -> None:
        """A remote prefill of `tokens` (alone or batched) took `seconds`: nudge the factor."""
        predicted = self.prefill_s(tokens) / self.prefill_factor
        if predicted <= 0 or seconds <= 0:
            return
        ratio = min(max(seconds / predicted, FACTOR_RANGE[0]), FACTOR_RANGE[1])
        self.prefill_factor = (1 - EWMA) * self.prefill_factor + EWMA * ratio

    def step_factor(self, batch: int, context_tokens: int, measured_step_s: float) -> float:
        """A decode instance's measured step over the profile's prediction for its batch."""
        predicted = self.latency.decode(max(1, batch), context_tokens) if batch else 0.0
        if predicted <= 0 or measured_step_s <= 0:
            return 1.0
        return min(max(measured_step_s / predicted, FACTOR_RANGE[0]), FACTOR_RANGE[1])
