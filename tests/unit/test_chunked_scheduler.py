"""The chunked-prefill scheduler (Sarathi-Serve), stepped by hand.

The loop is the worker's: `plan = schedule(now)`, a fake execute (a sampled
row gets a token that depends only on its position, so recompute after a
preemption reproduces it; a chunk short of its prompt's end gets NO_TOKEN),
`update(plan, result)`. After every step: the budget holds, every request
that was decoding got its token, blocks held == blocks used; every test ends
with no block leaked.
"""
from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from engine.block_manager import BlockManager, blocks_needed
from engine.chunked_scheduler import NO_TOKEN, ChunkedScheduler, MixedStepPlan
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig
from engine.sequence import FinishReason, SeqStatus, SeqState, StepPlan, StepResult

EOS = 2
ENGINE = Path(__file__).resolve().parents[2] / "engine"


def make(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 16,
         max_model_len: int = 512) -> ChunkedScheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    return ChunkedScheduler(cfg, BlockManager(num_blocks, block_size), frozenset({EOS}))


def seq(req_id: str, prompt_len: int, max_tokens: int = 4, first_token: int = 10) -> SeqState:
    return SeqState(req_id, [first_token + i % 50 for i in range(prompt_len)],
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def samples(plan) -> tuple[bool, ...]:
    return plan.samples if isinstance(plan, MixedStepPlan) else (True,) * len(plan.seqs)


def execute(plan) -> StepResult:
    return StepResult(tuple(100 + w.context_len if ok else NO_TOKEN for w, ok in zip(plan.seqs, samples(plan))))


def check_state(s: ChunkedScheduler) -> None:
    held = [b for q in s.running for b in q.block_ids]
    assert len(held) == len(set(held)), "a block is held by two sequences"
    assert s.blocks.num_used_blocks == len(held)
    assert all(not q.block_ids and q.status is SeqStatus.WAITING for q in s.waiting)
    for q in s.running:   # blocks for every token, the one being decoded included
        assert len(q.block_ids) >= blocks_needed(q.num_tokens - 1, s.blocks.block_size)


def step(s: ChunkedScheduler, now: float = 0.0):
    decoding = {q.req_id for q in s.running if q.num_tokens - s.num_computed_tokens(q.req_id) == 1}
    plan = s.schedule(now)
    check_state(s)
    if plan is None:
        assert not decoding
        return None, []
    assert plan.num_tokens <= s.config.max_num_batched_tokens, "over the token budget"
    ids = [w.req_id for w in plan.seqs]
    assert len(set(ids)) == len(ids)
    # decodes never starve: whoever was decoding is in the step (or was preempted for blocks)
    assert {r for r in decoding if s.get(r) is not None and s.get(r).status is SeqStatus.RUNNING} <= set(ids)
    for w, ok in zip(plan.seqs, samples(plan)):
        q = s.get(w.req_id)
        assert w.start_pos == s.num_computed_tokens(w.req_id)
        assert w.token_ids == tuple(q.all_token_ids[w.start_pos:w.context_len])
        assert ok == (w.context_len == q.num_tokens)
        assert len(w.block_ids) * s.blocks.block_size >= w.context_len
    finished = s.update(plan, execute(plan))
    check_state(s)
    return plan, finished


def run_to_completion(s: ChunkedScheduler, max_steps: int = 2000, trace: list | None = None) -> list[SeqState]:
    finished: list[SeqState] = []
    for i in range(max_steps):
        if not s.has_unfinished():
            break
        plan, done = step(s, float(i))
        assert plan is not None, f"stalled: waiting={list(s.waiting)} running={s.running}"
        if trace is not None:
            trace.append(plan)
        finished.extend(done)
    else:
        pytest.fail(f"not finished after {max_steps} steps")
    assert s.schedule(float(max_steps)) is None
    assert s.blocks.num_free_blocks == s.blocks.num_blocks, "a block leaked"
    return finished


def expected_tokens(prompt_len: int, max_tokens: int) -> list[int]:
    """What the position-keyed fake model yields, chunked or not, preempted or not."""
    return [100 + prompt_len + i for i in range(max_tokens)]


# -- tests ------------------------------------------------------------------------------------
def test_pure_module_imports_no_torch_threads_or_clocks():
    tree = ast.parse((ENGINE / "chunked_scheduler.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & {"torch", "ray", "grpc", "threading", "time", "asyncio", "numpy"}


def test_budget_below_the_sequence_limit_is_refused():
    with pytest.raises(ValueError, match="max_num_batched_tokens .4. must be >= max_num_seqs .8."):
        make(budget=4, max_num_seqs=8)


def test_a_long_prompt_runs_in_budget_sized_chunks_and_samples_once():
    s = make(budget=16)
    s.add(seq("a", 50, max_tokens=3))
    plans = []
    for _ in range(4):
        plan, _ = step(s)
        plans.append(plan)
    chunks = [(p.seqs[0].start_pos, len(p.seqs[0].token_ids)) for p in plans]
    assert chunks == [(0, 16), (16, 16), (32, 16), (48, 2)]
    assert [samples(p) for p in plans] == [(False,), (False,), (False,), (True,)]
    assert all(isinstance(p, MixedStepPlan) for p in plans)
    a = s.get("a")
    assert a.output_token_ids == [150] and len(a.block_ids) == blocks_needed(50, 4)
    assert a.first_scheduled_time == 0.0
    plan, _ = step(s)
    assert isinstance(plan, StepPlan) and not plan.is_prefill   # decodes only: the plain decode step
    done = run_to_completion(s)
    assert done[0].output_token_ids == expected_tokens(50, 3)


def test_whole_prompts_within_the_budget_are_a_plain_prefill():
    s = make(budget=32)
    s.add(seq("a", 10))
    s.add(seq("b", 12))
    plan, _ = step(s)
    assert isinstance(plan, StepPlan) and plan.is_prefill and [w.req_id for w in plan.seqs] == ["a", "b"]
    run_to_completion(s)


def test_decodes_ride_with_a_chunk_that_fills_the_rest_of_the_budget():
    s = make(budget=16)
    for r in ("a", "b", "c"):
        s.add(seq(r, 3, max_tokens=20))
    step(s)                              # the three short prompts together
    s.add(seq("long", 60, max_tokens=2))
    for _ in range(4):
        plan, _ = step(s)
        assert isinstance(plan, MixedStepPlan)
        assert [w.req_id for w in plan.seqs] == ["a", "b", "c", "long"]   # decode rows first
        assert plan.num_tokens == 16 and len(plan.seqs[3].token_ids) == 13
    assert s.num_computed_tokens("long") == 52
    assert s.queued_prompt_tokens == 8
    finished = {q.req_id: q.output_token_ids for q in run_to_completion(s)}
    assert finished["long"] == expected_tokens(60, 2)
    assert finished["a"] == expected_tokens(3, 20)


def test_several_prompts_share_the_budget_oldest_first_and_admission_waits_for_the_limit():
    s = make(budget=16, max_num_seqs=2)
    for r, n in (("a", 20), ("b", 20), ("c", 5)):
        s.add(seq(r, n, max_tokens=2))
    plan, _ = step(s)
    assert [(w.req_id, len(w.token_ids)) for w in plan.seqs] == [("a", 16)]
    plan, _ = step(s)
    assert [(w.req_id, len(w.token_ids)) for w in plan.seqs] == [("a", 4), ("b", 12)]
    assert [q.req_id for q in s.waiting] == ["c"]    # two running: the sequence limit
    run_to_completion(s)


def test_abort_while_prefilling_and_while_a_step_runs_leaks_nothing():
    s = make(budget=8)
    s.add(seq("a", 30))
    s.add(seq("b", 30))
    step(s)
    assert s.abort("a") is not None and s.num_computed_tokens("a") == 0
    plan = s.schedule(1.0)
    s.abort("b")                                   # aborted while the step runs
    assert s.update(plan, execute(plan)) == []
    assert not s.has_unfinished() and s.blocks.num_free_blocks == s.blocks.num_blocks


def test_preemption_under_a_small_cache_recomputes_and_leaks_no_block():
    s = make(num_blocks=24, block_size=4, budget=16, max_num_seqs=4)
    lens = [10, 14, 18, 6]
    for i, n in enumerate(lens):
        s.add(seq(f"r{i}", n, max_tokens=30))
    done = run_to_completion(s)
    assert sum(q.num_preemptions for q in done) > 0, "the cache was meant to run short"
    by_id = {q.req_id: q for q in done}
    for i, n in enumerate(lens):
        assert by_id[f"r{i}"].output_token_ids == expected_tokens(n, 30)
        assert by_id[f"r{i}"].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_arrivals_keep_every_invariant(seed):
    rng = random.Random(seed)
    s = make(num_blocks=40, block_size=4, budget=rng.choice([8, 16, 24]), max_num_seqs=8)
    want, done = {}, []
    for i in range(300):
        if i < 60 and rng.random() < 0.4:
            n, m = rng.randint(1, 70), rng.randint(1, 12)
            want[f"q{i}"] = expected_tokens(n, m)
            s.add(seq(f"q{i}", n, max_tokens=m))
        if not s.has_unfinished():
            continue
        plan, finished = step(s, float(i))
        assert plan is not None
        done.extend(finished)
    done.extend(run_to_completion(s))
    assert len(want) > 10
    assert {q.req_id: q.output_token_ids for q in done} == want
