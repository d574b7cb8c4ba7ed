"""sample(): greedy, temperature, top-k, top-p and per-request seeds, on CPU tensors.

Draws are batched (one row per draw) so that thousands of them stay fast.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import sample, step_seed
from engine.sampling_params import SamplingParams

VOCAB = 32


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, first_step: int = 0,
          generator: torch.Generator | None = None) -> list[int]:
    """n samples for one row: n copies of it, each with its own step."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return sample(logits, [params] * n, list(range(first_step, first_step + n)), generator)


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


# -- step_seed ------------------------------------------------------------------

def test_step_seed_is_deterministic_and_mixes_seed_and_step():
    assert step_seed(7, 3) == step_seed(7, 3)
    values = {step_seed(seed, step) for seed in range(20) for step in range(50)}
    assert len(values) == 20 * 50
    for seed in (0, 1, -5, 2**62, 2**70):
        for step in (0, 1, 10**6):
            v = step_seed(seed, step)
            assert 0 <= v < 2**63                    # a valid manual_seed value
            torch.Generator().manual_seed(v)


# -- greedy -----------------------------------------------------------------------

def test_greedy_rows_are_argmax():
    logits = random_logits(16)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 16, [0] * 16)
    assert out == logits.argmax(dim=-1).tolist()


def test_greedy_rows_are_argmax_when_mixed_with_sampled_rows():
    logits = random_logits(12, vocab=64, seed=1) * 0.1       # flat: sampled rows rarely hit argmax
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0, seed=i)
              for i in range(12)]
    original = logits.clone()
    out = sample(logits, params, list(range(12)))
    argmax = logits.argmax(dim=-1).tolist()
    assert [out[i] for i in range(0, 12, 2)] == [argmax[i] for i in range(0, 12, 2)]
    assert [out[i] for i in range(1, 12, 2)] != [argmax[i] for i in range(1, 12, 2)]  # they did sample
    assert torch.equal(logits, original)                      # the input is not modified
    assert all(isinstance(t, int) and 0 <= t < 64 for t in out)


# -- seeds ----------------------------------------------------------------------------

def test_seeded_sampling_reproducible_for_same_seed_and_step():
    logits = random_logits(1, vocab=1000, seed=2)[0] * 0.1
    p = SamplingParams(temperature=1.0, seed=1234)
    first = draws(logits, p, 50)
    again = draws(logits, p, 50)
    assert first == again
    # The same (seed, step) gives the same token whatever row or batch it is in,
    # and whatever generator is passed for unseeded rows.
    other = SamplingParams(temperature=1.0)
    batch = torch.stack([random_logits(1, 1000, seed=9)[0], logits, logits])
    out = sample(batch, [other, p, p], [0, 17, 30], torch.Generator().manual_seed(99))
    assert out[1:] == [first[17], first[30]]


def test_seeded_sampling_differs_across_steps_and_seeds():
    logits = torch.zeros(1000)                                # uniform over 1000 tokens
    p = SamplingParams(temperature=1.0, seed=42)
    by_step = draws(logits, p, 100)
    assert len(set(by_step)) > 50                            # not one token repeated
    q = SamplingParams(temperature=1.0, seed=43)
    assert draws(logits, q, 100) != by_step
    # A later stretch of steps continues the stream rather than repeating it.
    assert draws(logits, p, 100, first_step=100) != by_step


def test_unseeded_rows_use_the_given_generator():
    logits = torch.zeros(200, 1000)
    p = [SamplingParams(temperature=1.0)] * 200
    a = sample(logits, p, [0] * 200, torch.Generator().manual_seed(5))
    b = sample(logits, p, [0] * 200, torch.Generator().manual_seed(5))
    c = sample(logits, p, [0] * 200, torch.Generator().manual_seed(6))
    assert a == b and a != c


# -- top-k ------------------------------------------------------------------------------

def test_top_k_1_equals_greedy():
    logits = random_logits(64, seed=3) * 0.2
    out = sample(logits, [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(64)],
                 list(range(64)))
    assert out == logits.argmax(dim=-1).tolist()


def test_top_k_only_returns_the_k_largest():
    k = 5
    logits = random_logits(1, vocab=50, seed=4)[0] * 0.3     # fairly flat: outside tokens are likely
    top = set(torch.topk(logits, k).indices.tolist())
    out = draws(logits, SamplingParams(temperature=1.0, top_k=k, seed=11), 3000)
    assert set(out) == top                                    # all k appear, nothing else
    # The restriction is real: without top_k many more tokens come up.
    assert len(set(draws(logits, SamplingParams(temperature=1.0, seed=11), 3000))) > 2 * k


@pytest.mark.parametrize("top_k", [0, -1, VOCAB, VOCAB + 10])
def test_top_k_disabled_or_not_smaller_than_vocab_keeps_all_tokens(top_k):
    logits = torch.zeros(VOCAB)
    out = draws(logits, SamplingParams(temperature=1.0, top_k=top_k, seed=3), 2000)
    assert set(out) == set(range(VOCAB))


# -- top-p -------------------------------------------------------------------------------

def test_small_top_p_returns_only_the_top_token():
    logits = random_logits(1, vocab=100, seed=5)[0] * 0.1
    out = draws(logits, SamplingParams(temperature=1.0, top_p=0.01, seed=2), 1000)
    assert set(out) == {int(logits.argmax())}


@pytest.mark.parametrize("top_p, kept", [(0.3, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = log_probs(probs)
    n = 4000
    out = draws(logits, SamplingParams(temperature=1.0, top_p=top_p, seed=8), n)
    assert set(out) == kept
    # Within the kept set the probabilities are renormalised.
    mass = sum(probs[t] for t in kept)
    for t in kept:
        expected = probs[t] / mass
        assert abs(out.count(t) / n - expected) < 5 * math.sqrt(expected * (1 - expected) / n) + 1e-9


def test_top_p_order_does_not_depend_on_token_index():
    probs = [0.05, 0.15, 0.3, 0.5]                           # the best token is last
    out = draws(log_probs(probs), SamplingParams(temperature=1.0, top_p=0.7, seed=1), 2000)
    assert set(out) == {2, 3}


def test_top_p_and_top_k_rows_do_not_leak_into_each_other():
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 1000
    logits = log_probs(probs).unsqueeze(0).expand(3 * n, -1).contiguous()
    kinds = [SamplingParams(temperature=1.0, top_p=0.7, seed=1),
             SamplingParams(temperature=1.0, seed=2),
             SamplingParams(temperature=1.0, top_k=1, seed=3)]
    params = [kinds[r % 3] for r in range(3 * n)]              # interleaved rows
    out = sample(logits, params, [r // 3 for r in range(3 * n)])
    seen = [set(out[i::3]) for i in range(3)]
    assert seen == [{0, 1}, {0, 1, 2, 3}, {0}]


# -- distribution ---------------------------------------------------------------------------

def _check_frequencies(out: list[int], expected: torch.Tensor) -> None:
    n = len(out)
    counts = torch.bincount(torch.tensor(out), minlength=len(expected)).double() / n
    for t, p in enumerate(expected.tolist()):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[t].item() - p) < 5 * sigma + 1e-3, (t, counts[t].item(), p)


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_1_matches_softmax(seeded):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -0.5, 0.2])
    p = SamplingParams(temperature=1.0, seed=21 if seeded else None)
    out = draws(logits, p, 4000, generator=torch.Generator().manual_seed(0))
    _check_frequencies(out, torch.softmax(logits, dim=-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_logits(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -0.5, 0.2])
    p = SamplingParams(temperature=temperature, seed=5)
    out = draws(logits, p, 4000)
    _check_frequencies(out, torch.softmax(logits / temperature, dim=-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_cuda_logits():
    logits = random_logits(4).cuda()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9, top_k=5, seed=1),
              SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, seed=2)]
    out = sample(logits, params, [0, 1, 2, 3], None)
    assert out[0] == int(logits[0].argmax())
    assert all(0 <= t < VOCAB for t in out)
