"""The continuous-batching Scheduler, stepped by hand.

Every test runs the worker loop itself: `plan = schedule(now)`, a fake execute
that makes a StepResult with chosen token ids, `update(plan, result)`; and
every test ends by driving the scheduler to completion and checking that no
block leaked.
"""
from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.block_manager import BlockManager, blocks_needed
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, SeqState, SeqStatus, SeqWork, StepKind, StepPlan, StepResult

EOS = 2
ENGINE = Path(__file__).resolve().parents[2] / "engine"


# -- helpers ----------------------------------------------------------------------

def make(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
         max_num_batched_tokens: int = 64, max_model_len: int = 256) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), frozenset({EOS}))


def seq(req_id: str, prompt_len: int, first_token: int = 10, **sampling) -> SeqState:
    sampling.setdefault("max_tokens", 4)
    return SeqState(req_id, list(range(first_token, first_token + prompt_len)),
                    SamplingParams(**sampling))


def position_token(work: SeqWork) -> int:
    """A token that depends only on where it lands: recompute must reproduce it."""
    return 100 + work.context_len


def execute(plan: StepPlan, token: Callable[[SeqWork], int] = position_token) -> StepResult:
    return StepResult(tuple(token(w) for w in plan.seqs))


def check_state(s: Scheduler) -> None:
    """Blocks held by running sequences are exactly the used blocks."""
    held = [b for q in s.running for b in q.block_ids]
    assert len(held) == len(set(held)), "a block is held by two sequences"
    assert s.blocks.num_used_blocks == len(held)
    assert all(not q.block_ids for q in s.waiting)
    assert all(q.status is SeqStatus.RUNNING for q in s.running)
    assert all(q.status is SeqStatus.WAITING for q in s.waiting)


def check_plan(s: Scheduler, plan: StepPlan) -> None:
    bs = s.blocks.block_size
    assert len({w.req_id for w in plan.seqs}) == len(plan.seqs)
    for w in plan.seqs:
        q = s.get(w.req_id)
        assert q is not None and q.status is SeqStatus.RUNNING
        assert w.block_ids == tuple(q.block_ids)
        assert len(w.block_ids) * bs >= w.context_len      # room for every token of the step
        assert w.context_len == q.num_tokens                 # the sampled token's position (seeds)
        if plan.is_prefill:
            assert w.start_pos == 0 and w.token_ids == tuple(q.all_token_ids)
        else:
            assert w.token_ids == (q.last_token_id,) and w.start_pos == q.num_tokens - 1


def step(s: Scheduler, now: float = 0.0, token=position_token) -> tuple[StepPlan | None, list[SeqState]]:
    plan = s.schedule(now)
    check_state(s)
    if plan is None:
        return None, []
    check_plan(s, plan)
    finished = s.update(plan, execute(plan, token))
    check_state(s)
    return plan, finished


def run_to_completion(s: Scheduler, token=position_token, max_steps: int = 500,
                      trace: list | None = None) -> list[SeqState]:
    """Drive the loop until nothing is left; fail on a stall, a runaway or a leaked block."""
    finished: list[SeqState] = []
    for i in range(max_steps):
        if not s.has_unfinished():
            break
        plan, done = step(s, float(i), token)
        assert plan is not None, f"stalled with waiting={list(s.waiting)} running={s.running}"
        if trace is not None:
            trace.append(plan)
        finished.extend(done)
    else:
        pytest.fail(f"not finished after {max_steps} steps")
    assert not s.waiting and not s.running
    assert s.schedule(float(max_steps)) is None
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
    assert all(q.block_ids == [] and q.is_finished for q in finished)
    return finished


# -- purity ------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["scheduler.py", "block_manager.py", "sequence.py"])
def test_pure_modules_import_no_torch_threads_or_clocks(module):
    tree = ast.parse((ENGINE / module).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & {"torch", "ray", "grpc", "threading", "time", "asyncio", "numpy"}


def test_step_records_are_frozen():
    w = SeqWork("a", (1,), 0, (0,), SamplingParams())
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.start_pos = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        StepPlan(StepKind.PREFILL, (w,)).kind = StepKind.DECODE
    with pytest.raises(dataclasses.FrozenInstanceError):
        StepResult((1,)).token_ids = (2,)
    assert StepPlan(StepKind.PREFILL, (w, w)).num_tokens == 2


# -- admission ------------------------------------------------------------------------

def test_empty_scheduler_has_nothing_to_do():
    s = make()
    assert not s.has_unfinished()
    assert s.schedule(0.0) is None
    run_to_completion(s)


def test_duplicate_request_id_rejected():
    s = make()
    s.add(seq("a", 3))
    with pytest.raises(ValueError):
        s.add(seq("a", 5))
    run_to_completion(s)


def test_prefill_batches_waiting_prompts_up_to_token_budget():
    s = make(max_num_batched_tokens=20)
    for r in "abc":
        s.add(seq(r, 8))
    plan, _ = step(s, 1.0)
    assert plan.is_prefill
    assert [w.req_id for w in plan.seqs] == ["a", "b"]       # 16 tokens; +8 would be 24 > 20
    assert plan.num_tokens == 16
    assert [q.req_id for q in s.waiting] == ["c"]
    assert s.get("a").first_scheduled_time == 1.0
    plan, _ = step(s, 2.0)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["c"]
    plan, _ = step(s, 3.0)
    assert not plan.is_prefill and [w.req_id for w in plan.seqs] == ["a", "b", "c"]
    run_to_completion(s)


def test_prefill_fills_the_budget_exactly():
    s = make(max_num_batched_tokens=16)
    for r in "abc":
        s.add(seq(r, 8))
    plan, _ = step(s)
    assert [w.req_id for w in plan.seqs] == ["a", "b"]       # 16 == budget is allowed
    run_to_completion(s)


def test_prefill_respects_max_num_seqs():
    s = make(max_num_seqs=2, max_num_batched_tokens=1000)
    for r in "abcd":
        s.add(seq(r, 3, max_tokens=3))
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["a", "b"]
    # Two running: nothing more is admitted, they decode.
    plan, _ = step(s)
    assert not plan.is_prefill and [w.req_id for w in plan.seqs] == ["a", "b"]
    plan, finished = step(s)
    assert [q.req_id for q in finished] == ["a", "b"]        # 3 tokens each
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["c", "d"]
    trace: list[StepPlan] = []
    run_to_completion(s, trace=trace)
    assert all(len(p.seqs) <= 2 for p in trace)


def test_max_num_seqs_counts_running_sequences():
    s = make(max_num_seqs=3, max_num_batched_tokens=1000)
    s.add(seq("a", 3, max_tokens=10))
    s.add(seq("b", 3, max_tokens=10))
    step(s)                                                   # both prefilled
    for r in "cde":
        s.add(seq(r, 3, max_tokens=10))
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["c"]   # 2 running + 1
    assert [q.req_id for q in s.waiting] == ["d", "e"]
    run_to_completion(s)


def test_prompt_over_budget_runs_alone():
    s = make(max_num_batched_tokens=8)
    s.add(seq("big", 20))
    s.add(seq("small", 4))
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["big"]
    assert plan.num_tokens == 20
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["small"]
    run_to_completion(s)


def test_prompt_over_budget_waits_for_its_own_step():
    s = make(max_num_batched_tokens=8)
    s.add(seq("small", 4))
    s.add(seq("big", 20))
    plan, _ = step(s)
    assert [w.req_id for w in plan.seqs] == ["small"]
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["big"]
    run_to_completion(s)


def test_prefill_first_new_arrival_before_decode():
    s = make()
    s.add(seq("a", 5, max_tokens=10))
    plan, _ = step(s)
    assert plan.is_prefill
    plan, _ = step(s)
    assert not plan.is_prefill and [w.req_id for w in plan.seqs] == ["a"]
    s.add(seq("b", 6, max_tokens=10))
    outputs_a = list(s.get("a").output_token_ids)
    plan, _ = step(s)
    assert plan.is_prefill and [w.req_id for w in plan.seqs] == ["b"]
    assert s.get("a").output_token_ids == outputs_a           # a did not advance
    plan, _ = step(s)
    assert not plan.is_prefill and [w.req_id for w in plan.seqs] == ["a", "b"]
    run_to_completion(s)


def test_waiting_prompt_that_does_not_fit_lets_running_decode():
    s = make(num_blocks=4, block_size=4)
    s.add(seq("a", 8, max_tokens=2))                         # 2 blocks
    step(s)
    s.add(seq("b", 12, max_tokens=2))                        # needs 3 blocks, 2 free
    plan, _ = step(s)
    assert not plan.is_prefill and [w.req_id for w in plan.seqs] == ["a"]
    assert [q.req_id for q in s.waiting] == ["b"]
    run_to_completion(s)


# -- plans ----------------------------------------------------------------------------

def test_prefill_and_decode_plans_carry_tokens_positions_and_block_tables():
    s = make(block_size=4)
    prompt = [7, 8, 9]
    s.add(SeqState("a", prompt, SamplingParams(max_tokens=8, temperature=0.0)))
    tokens = iter(range(50, 100))
    plan, _ = step(s, token=lambda w: next(tokens))
    (w,) = plan.seqs
    assert plan.is_prefill
    assert w.token_ids == (7, 8, 9) and w.start_pos == 0 and w.context_len == 3
    assert len(w.block_ids) == 1
    assert w.sampling == SamplingParams(max_tokens=8, temperature=0.0)
    table = w.block_ids
    for i in range(7):
        plan, finished = step(s, token=lambda w: next(tokens))
        (w,) = plan.seqs
        num_tokens = 3 + 1 + i                                  # prompt + outputs before this step
        assert not plan.is_prefill
        assert w.token_ids == (50 + i,)                         # the last sampled token
        assert w.start_pos == num_tokens - 1
        assert w.context_len == num_tokens
        assert len(w.block_ids) == blocks_needed(num_tokens, 4)
        assert w.block_ids[:len(table)] == table                # the table only grows
        table = w.block_ids
    # 4 tokens -> 1 block, 5 -> 2, 9 -> 3.
    assert len(table) == 3
    assert finished and finished[0].output_token_ids == list(range(50, 58))
    assert finished[0].finish_reason is FinishReason.LENGTH
    run_to_completion(s)


def test_decode_block_table_grows_at_boundary_of_16():
    s = make(num_blocks=8, block_size=16)
    s.add(seq("a", 15, max_tokens=4))
    plan, _ = step(s)
    assert len(plan.seqs[0].block_ids) == 1                     # 15 tokens
    plan, _ = step(s)
    assert plan.seqs[0].start_pos == 15 and len(plan.seqs[0].block_ids) == 1   # 16 tokens
    plan, _ = step(s)
    assert plan.seqs[0].start_pos == 16 and len(plan.seqs[0].block_ids) == 2   # 17 tokens
    assert s.blocks.num_used_blocks == 2
    run_to_completion(s)


# -- finishing --------------------------------------------------------------------------

def test_eos_finishes():
    s = make()
    s.add(seq("a", 3, max_tokens=10))
    s.add(seq("b", 3, max_tokens=10))
    step(s)                                                      # prefill: tokens 103
    plan, finished = step(s, token=lambda w: EOS if w.req_id == "a" else 7)
    assert [q.req_id for q in finished] == ["a"]
    a = finished[0]
    assert a.finish_reason is FinishReason.EOS and a.status is SeqStatus.FINISHED
    assert a.output_token_ids == [103, EOS]
    assert a.block_ids == [] and s.get("a") is None
    assert [q.req_id for q in s.running] == ["b"]
    run_to_completion(s)


def test_eos_from_prefill_finishes_at_once():
    s = make()
    s.add(seq("a", 3, max_tokens=10))
    plan, finished = step(s, token=lambda w: EOS)
    assert plan.is_prefill and [q.finish_reason for q in finished] == [FinishReason.EOS]
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
    run_to_completion(s)


def test_ignore_eos_keeps_going_to_max_tokens():
    s = make()
    s.add(seq("a", 3, max_tokens=5, ignore_eos=True))
    finished = run_to_completion(s, token=lambda w: EOS)
    (a,) = finished
    assert a.output_token_ids == [EOS] * 5
    assert a.finish_reason is FinishReason.LENGTH


def test_max_tokens_finishes_with_length():
    s = make()
    s.add(seq("one", 3, max_tokens=1))
    s.add(seq("five", 3, max_tokens=5))
    plan, finished = step(s)
    assert [q.req_id for q in finished] == ["one"]
    assert finished[0].finish_reason is FinishReason.LENGTH
    assert len(finished[0].output_token_ids) == 1
    rest = run_to_completion(s)
    assert [(q.req_id, len(q.output_token_ids), q.finish_reason) for q in rest] == [
        ("five", 5, FinishReason.LENGTH)]


def test_max_model_len_finishes_with_context():
    s = make(max_model_len=10)
    s.add(seq("a", 7, max_tokens=100))
    (a,) = run_to_completion(s)
    assert a.finish_reason is FinishReason.CONTEXT
    assert a.num_tokens == 10 and len(a.output_token_ids) == 3


def test_eos_takes_precedence_over_length():
    s = make()
    s.add(seq("a", 3, max_tokens=1))
    plan, finished = step(s, token=lambda w: EOS)
    assert finished[0].finish_reason is FinishReason.EOS
    run_to_completion(s)


def test_finish_from_outside_with_stop_reason():
    s = make()
    s.add(seq("a", 3, max_tokens=10))
    step(s)
    used = s.blocks.num_used_blocks
    assert used > 0
    a = s.finish("a", FinishReason.STOP)
    assert a.finish_reason is FinishReason.STOP and a.is_finished
    assert s.blocks.num_used_blocks == 0
    assert s.finish("a", FinishReason.STOP) is None             # already gone
    run_to_completion(s)


# -- abort ------------------------------------------------------------------------------

def test_abort_waiting_request():
    s = make(max_num_seqs=1)
    s.add(seq("a", 3, max_tokens=10))
    s.add(seq("b", 3, max_tokens=10))
    step(s)                                                      # a runs, b waits
    free_before = s.blocks.num_free_blocks
    b = s.abort("b")
    assert b.req_id == "b" and b.finish_reason is FinishReason.ABORT and b.is_finished
    assert not s.waiting and s.get("b") is None
    assert s.blocks.num_free_blocks == free_before               # it held nothing
    assert s.abort("b") is None and s.abort("nope") is None
    (a,) = run_to_completion(s)
    assert a.req_id == "a"


def test_abort_running_request_frees_its_blocks():
    s = make(block_size=4)
    s.add(seq("a", 9, max_tokens=10))                            # 3 blocks
    s.add(seq("b", 4, max_tokens=10))                            # 1 block
    step(s)
    step(s)                                                      # decode: a 10 tokens, b 5 (2 blocks)
    a_blocks = list(s.get("a").block_ids)
    assert len(a_blocks) == 3
    used = s.blocks.num_used_blocks
    a = s.abort("a")
    assert a.finish_reason is FinishReason.ABORT and a.block_ids == []
    assert s.blocks.num_used_blocks == used - 3
    assert all(s.blocks.ref_count(b) == 0 for b in a_blocks)
    assert [q.req_id for q in s.running] == ["b"]
    (b,) = run_to_completion(s)
    assert b.req_id == "b" and b.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_abort_between_schedule_and_update_is_tolerated(phase):
    s = make()
    s.add(seq("a", 3, max_tokens=10))
    s.add(seq("b", 3, max_tokens=10))
    if phase == "decode":
        step(s)
    plan = s.schedule(0.0)
    assert plan.is_prefill == (phase == "prefill")
    b_outputs = len(s.get("b").output_token_ids)
    a = s.abort("a")                                             # the client went away mid-step
    finished = s.update(plan, execute(plan))
    check_state(s)
    assert finished == []
    assert a.finish_reason is FinishReason.ABORT
    assert len(a.output_token_ids) == (0 if phase == "prefill" else 1)   # nothing appended after abort
    assert len(s.get("b").output_token_ids) == b_outputs + 1
    (b,) = run_to_completion(s)
    assert b.req_id == "b" and len(b.output_token_ids) == 10


def test_request_id_reused_between_schedule_and_update_gets_no_stale_token():
    s = make()
    s.add(seq("a", 3, max_tokens=10))
    plan = s.schedule(0.0)
    s.abort("a")
    s.add(seq("a", 5, first_token=40, max_tokens=2))            # a retry under the same id
    assert s.update(plan, execute(plan)) == []
    fresh = s.get("a")
    assert fresh.output_token_ids == [] and fresh.status is SeqStatus.WAITING
    (done,) = run_to_completion(s)
    assert done is fresh and done.output_token_ids == [105, 106]


def test_abort_of_every_sequence_in_a_plan():
    s = make()
    s.add(seq("a", 3))
    plan = s.schedule(0.0)
    s.abort("a")
    assert s.update(plan, execute(plan)) == []
    run_to_completion(s)


# -- preemption -------------------------------------------------------------------------

def test_preemption_by_recompute_when_cache_is_too_small():
    # 4 blocks of 4 tokens; three 4-token prompts that all keep growing.
    s = make(num_blocks=4, block_size=4, max_model_len=16)
    prompts = {}
    for r, first in [("a", 10), ("b", 30), ("c", 50)]:
        q = seq(r, 4, first_token=first, max_tokens=100, ignore_eos=True)
        prompts[r] = list(q.prompt_token_ids)
        s.add(q)
    preempted_outputs: dict[str, list[int]] = {}
    recompute_works: list[SeqWork] = []
    preemptions = 0
    for i in range(200):
        if not s.has_unfinished():
            break
        running_before = [q.req_id for q in s.running]
        counts_before = {r: s.get(r).num_preemptions for r in running_before}
        outputs_before = {r: list(s.get(r).output_token_ids) for r in running_before}
        plan = s.schedule(float(i))
        assert plan is not None, "stalled"
        check_state(s)
        check_plan(s, plan)
        victims = [r for r in running_before if s.get(r).num_preemptions > counts_before[r]]
        if victims:
            preemptions += len(victims)
            assert not plan.is_prefill
            # The newest running sequences go, newest first; the older ones keep decoding.
            assert victims == running_before[len(running_before) - len(victims):]
            assert [w.req_id for w in plan.seqs] == running_before[:len(running_before) - len(victims)]
            assert [q.req_id for q in list(s.waiting)[:len(victims)]] == victims
            for r in victims:
                v = s.get(r)
                assert v.status is SeqStatus.WAITING and v.block_ids == []
                assert v.output_token_ids == outputs_before[r]   # outputs are kept
                preempted_outputs[r] = list(v.output_token_ids)
        if plan.is_prefill:
            for w in plan.seqs:
                if w.req_id in preempted_outputs:
                    recompute_works.append(w)
                    out = preempted_outputs.pop(w.req_id)
                    assert w.token_ids == tuple(prompts[w.req_id] + out)
                    assert w.context_len == len(prompts[w.req_id]) + len(out) and w.start_pos == 0
                    assert len(w.block_ids) == blocks_needed(len(w.token_ids), 4)
        s.update(plan, execute(plan))
        check_state(s)
    else:
        pytest.fail("did not finish")
    assert preemptions >= 2 and len(recompute_works) == preemptions
    assert not preempted_outputs                                 # every victim resumed
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
    run_to_completion(s)


def test_preempted_sequence_resumes_with_same_outputs_as_without_preemption():
    def finish_all(num_blocks: int) -> tuple[dict, int]:
        s = make(num_blocks=num_blocks, block_size=4, max_model_len=16)
        for r, first in [("a", 10), ("b", 30), ("c", 50)]:
            s.add(seq(r, 4, first_token=first, max_tokens=100, ignore_eos=True))
        seqs = [s.get(r) for r in "abc"]
        run_to_completion(s)
        return ({q.req_id: (q.output_token_ids, q.finish_reason) for q in seqs},
                sum(q.num_preemptions for q in seqs))

    roomy, roomy_preemptions = finish_all(64)
    tight, tight_preemptions = finish_all(4)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy
    # Positions 4..15 of each sequence: no token lost or duplicated by recompute.
    assert roomy["a"] == (list(range(104, 116)), FinishReason.CONTEXT)


def test_preemption_picks_the_newest_running_sequence():
    # 3 blocks of 4: a (4 tokens) needs a 2nd block right after prefill, none is free;
    # the victim is c, the newest, not b that is still queued before it.
    s = make(num_blocks=3, block_size=4)
    s.add(seq("a", 4, max_tokens=3))
    s.add(seq("b", 3, max_tokens=3))
    s.add(seq("c", 3, max_tokens=3))
    plan, _ = step(s)
    assert [w.req_id for w in plan.seqs] == ["a", "b", "c"] and s.blocks.num_free_blocks == 0
    plan, _ = step(s)
    assert not plan.is_prefill and [w.req_id for w in plan.seqs] == ["a", "b"]
    assert s.get("c").num_preemptions == 1 and s.get("b").num_preemptions == 0
    assert [q.req_id for q in s.waiting] == ["c"]
    done = run_to_completion(s)
    assert sorted(q.req_id for q in done) == ["a", "b", "c"]
    assert all(len(q.output_token_ids) == 3 for q in done)


def test_preempted_sequence_goes_to_front_of_waiting():
    s = make(num_blocks=4, block_size=4, max_num_seqs=2, max_model_len=16)
    s.add(seq("a", 4, max_tokens=100))
    s.add(seq("b", 4, max_tokens=100))
    s.add(seq("c", 4, max_tokens=100))                           # held back by max_num_seqs
    plan, _ = step(s)
    assert [w.req_id for w in plan.seqs] == ["a", "b"]
    for _ in range(20):
        plan, _ = step(s)
        if s.get("b").num_preemptions:
            break
    else:
        pytest.fail("b was never preempted")
    assert [q.req_id for q in s.waiting] == ["b", "c"]          # ahead of the older arrival c
    assert [w.req_id for w in plan.seqs] == ["a"]
    run_to_completion(s)


def test_preemption_of_a_lone_sequence_that_cannot_grow_frees_it():
    # max_model_len above the cache (callers such as LLM reject such requests): the only
    # running sequence preempts itself rather than crash, and holds no block afterwards.
    s = make(num_blocks=2, block_size=4, max_model_len=100)
    s.add(seq("a", 4, max_tokens=100))
    s.add(seq("b", 4, max_tokens=100))
    step(s)                                                      # both prefilled, 2 blocks
    plan, _ = step(s)                                            # a needs a 2nd block: b preempted
    assert [w.req_id for w in plan.seqs] == ["a"]
    assert s.get("b").status is SeqStatus.WAITING
    for _ in range(3):
        plan, _ = step(s)
    assert [w.req_id for w in plan.seqs] == ["a"]               # a at 8 tokens, 2 blocks
    s.schedule(0.0)                                              # a needs a 3rd: nothing to evict
    assert s.get("a").status is SeqStatus.WAITING and s.get("a").block_ids == []
    assert s.blocks.num_free_blocks == 2
    s.abort("a")
    s.abort("b")
    run_to_completion(s)
