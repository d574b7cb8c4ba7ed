"""Workloads: request arrivals and lengths, shared by the load generator and the simulator.

Pure and seeded (a `random.Random` is passed in or built from a seed), so the
benchmark against the real cluster and the planner's simulator replay exactly
the same requests. Lengths are in tokens. The named workloads are scaled to
this project's default model (context 8192) and to a CPU instance: the shapes
follow the public datasets, the magnitudes are smaller (see docs/workloads.md).
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass


class WorkloadError(ValueError):
    """A workload name, parameter or trace file that cannot be used."""


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float          # seconds after the start of the run
    prompt_tokens: int
    output_tokens: int
    conversation: int | None = None   # multi-turn: the prompt is the first prompt_tokens of this
                                      # conversation's token stream, so a turn extends the last


@dataclass(frozen=True)
class LengthDist:
    """A log-normal length (median, sigma of the log), clipped to [min_len, max_len]."""
    median: float
    sigma: float
    min_len: int
    max_len: int

    def sample(self, rng: random.Random) -> int:
        x = rng.lognormvariate(math.log(self.median), self.sigma) if self.sigma > 0 else self.median
        return max(self.min_len, min(self.max_len, int(round(x))))

    def mean(self) -> float:
        """The mean of the unclipped distribution (for docs and sanity checks)."""
        return self.median * math.exp(self.sigma ** 2 / 2)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthDist
    output: LengthDist
    like: str                 # the public dataset whose shape it follows


WORKLOADS: dict[str, Workload] = {
    # ShareGPT: short-to-medium prompts, medium outputs.
    "chatbot": Workload("chatbot", LengthDist(192, 0.8, 16, 1024), LengthDist(48, 0.6, 8, 192), "ShareGPT"),
    # HumanEval: short prompts, short outputs.
    "code": Workload("code", LengthDist(128, 0.4, 32, 384), LengthDist(32, 0.5, 8, 128), "HumanEval"),
    # LongBench: long prompts, short outputs. Halved from a 1024-token median: on one CPU core a
    # 1024-token prefill takes ~2 s, which would push every rate point of a sweep to minutes.
    "summarization": Workload("summarization", LengthDist(512, 0.35, 192, 1024),
                              LengthDist(24, 0.4, 8, 64), "LongBench"),
}


@dataclass(frozen=True)
class MultiTurn:
    """Chat conversations whose every turn extends the one before: turn k+1's prompt is turn k's
    prompt, its answer and a new user message (a client resending the history), arriving a think
    time after turn k's arrival. The request rate of a sweep counts turns."""
    name: str
    first: LengthDist          # system prompt + first user message
    answer: LengthDist         # each turn's output
    message: LengthDist        # each later user message
    turns: int
    think_s: float             # mean gap between a conversation's turns (exponential)
    like: str


MULTITURN = {
    "multiturn": MultiTurn("multiturn", LengthDist(256, 0.5, 64, 768), LengthDist(48, 0.5, 8, 128),
                           LengthDist(48, 0.6, 8, 160), turns=4, think_s=4.0, like="ShareGPT conversations"),
}


def multiturn_requests(wl: MultiTurn, rate: float, num_requests: int, seed: int = 0,
                       burstiness: float = 1.0, max_total_tokens: int | None = None) -> list[RequestSpec]:
    """`num_requests` turns: conversations start at rate / turns, their turns follow; sorted by
    arrival. A conversation stops early rather than outgrow `max_total_tokens`."""
    num_convs = -(-num_requests // wl.turns)
    starts = arrival_times(rate / wl.turns, num_convs, random.Random(seed), burstiness)
    rng = random.Random(seed + 1_000_003)
    out: list[RequestSpec] = []
    for c, t in enumerate(starts):
        prompt = wl.first.sample(rng)
        for _ in range(wl.turns):
            answer = wl.answer.sample(rng)
            if max_total_tokens is not None and prompt + answer > max_total_tokens:
                break
            out.append(RequestSpec(t, prompt, answer, conversation=c))
            t += rng.expovariate(1.0 / wl.think_s)
            prompt += answer + wl.message.sample(rng)
    return sorted(out, key=lambda r: r.arrival_s)[:num_requests]


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise WorkloadError(f"unknown workload {name!r}; known: {sorted([*WORKLOADS, *MULTITURN])}")
    return WORKLOADS[name]


def arrival_times(rate: float, num_requests: int, rng: random.Random, burstiness: float = 1.0) -> list[float]:
    """Open-loop arrivals: gamma inter-arrival gaps with mean 1/rate.

    burstiness is the squared coefficient of variation of the gaps: 1 is a
    Poisson process, above 1 burstier, below 1 more regular (shape = 1/burstiness).
    """
    if not (rate > 0 and math.isfinite(rate)):
        raise WorkloadError(f"rate must be a positive number of requests/s, got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise WorkloadError(f"burstiness must be > 0, got {burstiness}")
    if num_requests < 0:
        raise WorkloadError(f"num_requests must be >= 0, got {num_requests}")
    shape = 1.0 / burstiness
    scale = 1.0 / (rate * shape)
    t, out = 0.0, []
    for _ in range(num_requests):
        t += rng.gammavariate(shape, scale)
        out.append(t)
    return out


def sample_requests(workload: str | Workload, rate: float, num_requests: int, seed: int = 0,
                    burstiness: float = 1.0, max_total_tokens: int | None = None) -> list[RequestSpec]:
    """`num_requests` requests of a named workload arriving at `rate` per second.

    Lengths come from their own seeded stream, so the same seed gives the same
    lengths at every rate: a rate sweep changes only the arrival times.
    """
    if isinstance(workload, str) and workload in MULTITURN:
        return multiturn_requests(MULTITURN[workload], rate, num_requests, seed, burstiness, max_total_tokens)
    wl = get_workload(workload) if isinstance(workload, str) else workload
    times = arrival_times(rate, num_requests, random.Random(seed), burstiness)
    rng = random.Random(seed + 1_000_003)
    out = []
    for t in times:
        p, o = wl.prompt.sample(rng), wl.output.sample(rng)
        if max_total_tokens is not None and p + o > max_total_tokens:
            p = max(1, max_total_tokens - o)
        out.append(RequestSpec(t, p, o))
    return out


# BurstGPT's columns: Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type.
_TRACE_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def load_trace(path: str, max_requests: int | None = None, time_scale: float = 1.0,
               max_prompt_tokens: int | None = None, max_output_tokens: int | None = None) -> list[RequestSpec]:
    """Requests from a CSV in BurstGPT's column layout; arrivals start at 0.

    Rows with zero tokens (failed requests in BurstGPT) are skipped; lengths
    past the caps are clipped. time_scale < 1 compresses time (a higher rate).
    """
    try:
        f = open(path, newline="")
    except OSError as e:
        raise WorkloadError(f"cannot read trace {path!r}: {e}") from e
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in _TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise WorkloadError(f"trace {path!r} lacks columns {missing} (BurstGPT layout: {list(_TRACE_COLUMNS)})")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                t, p, o = float(row["Timestamp"]), int(row["Request tokens"]), int(row["Response tokens"])
            except (TypeError, ValueError) as e:
                raise WorkloadError(f"trace {path!r} line {line}: {e}") from e
            if p <= 0 or o <= 0:
                continue
            if max_prompt_tokens is not None:
                p = min(p, max_prompt_tokens)
            if max_output_tokens is not None:
                o = min(o, max_output_tokens)
            rows.append((t, p, o))
            if max_requests is not None and len(rows) >= max_requests:
                break
    if not rows:
        raise WorkloadError(f"trace {path!r} has no usable rows")
    rows.sort()
    t0 = rows[0][0]
    return [RequestSpec((t - t0) * time_scale, p, o) for t, p, o in rows]
