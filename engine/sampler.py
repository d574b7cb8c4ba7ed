"""Turn the last position's logits into one token per sequence."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling_params import SamplingParams

_MASK = 2**63 - 1


def step_seed(seed: int, step: int) -> int:
    """A seed for one token of a seeded request, from its seed and the token's position in the
    sequence (prompt + outputs before it: `SeqWork.context_len`).

    Stateless on purpose: the prefill worker samples the first token and a
    decode worker the rest, and both must draw from the same stream. Keyed by
    position, not by how many tokens this run has generated: a request resumed
    elsewhere as a prefill of its prompt plus its first k tokens (the router's
    migration) draws token k+1 from the same stream as the undisturbed run.
    """
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) & _MASK


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
           generator: torch.Generator | None = None) -> list[int]:
    """logits: [rows, vocab] fp32; params/steps: one per row (`steps`: the position of the token
    each row samples). Returns one token id per row."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens.tolist()
    device = logits.device
    sub = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=device).unsqueeze(1)
    for j, i in enumerate(rows):
        k = params[i].top_k
        if 0 < k < sub.shape[1]:
            kth = torch.topk(sub[j], k).values[-1]
            sub[j].masked_fill_(sub[j] < kth, float("-inf"))
    top_p = torch.tensor([params[i].top_p for i in rows], device=device)
    if bool((top_p < 1.0).any()):
        sub = _apply_top_p(sub, top_p)
    probs = torch.softmax(sub, dim=-1)
    for j, i in enumerate(rows):
        seed = params[i].seed
        g = (torch.Generator(device).manual_seed(step_seed(seed, steps[i])) if seed is not None
             else generator)
        tokens[i] = torch.multinomial(probs[j], 1, generator=g)[0]
    return tokens.tolist()


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs          # mass of strictly better tokens
    sorted_logits.masked_fill_(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
