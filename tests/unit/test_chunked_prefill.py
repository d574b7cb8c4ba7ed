"""Chunked prefill in the engine: greedy tokens identical to whole-prompt prefill and to transformers (fp32).

Small budgets (13 to 32 tokens) split every longer prompt into several chunks
over a cached prefix, and later prompts' chunks share steps with the decodes
of the earlier ones (mixed steps), which the tests check did happen.
"""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.chunked_scheduler import MixedStepPlan
from engine.sequence import SeqState
from tests.helpers import hf_greedy, save_tiny_model
from tests.unit.test_engine_vs_transformers import MAX_NEW, _prompts

pytestmark = pytest.mark.slow


def _run_by_hand(llm: LLM, prompts: list[list[int]], max_tokens: int,
                 ignore_eos: bool = True) -> tuple[list[list[int]], list]:
    """The engine's step loop, keeping each plan: schedule -> runner.execute -> update."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    seqs = [SeqState(f"r{i}", p, sp) for i, p in enumerate(prompts)]
    for s in seqs:
        llm.scheduler.add(s)
    plans = []
    for i in range(5000):
        if not llm.scheduler.has_unfinished():
            break
        plan = llm.scheduler.schedule(float(i))
        plans.append(plan)
        llm.scheduler.update(plan, llm.runner.execute(plan))
    assert not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    return [s.output_token_ids for s in seqs], plans


def _has_mixed_steps(plans) -> bool:
    """A step with a decode row and a chunk that continues a cached prefix."""
    return any(isinstance(p, MixedStepPlan)
               and any(len(w.token_ids) == 1 and w.start_pos > 0 for w in p.seqs)
               and any(len(w.token_ids) > 1 and w.start_pos > 0 for w in p.seqs) for p in plans)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_model_chunks_mixed_with_decodes_match_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    save_tiny_model(str(tmp_path), arch=arch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 5, 9, 17, 40, 123, 300)]
    chunked = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, block_size=8,
                  enable_chunked_prefill=True, max_num_batched_tokens=13, max_num_seqs=8)
    got, plans = _run_by_hand(chunked, prompts, MAX_NEW)
    assert _has_mixed_steps(plans)
    assert all(p.num_tokens <= 13 for p in plans)
    whole = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, block_size=8)
    unchunked = [o.token_ids for o in whole.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                                             ignore_eos=True))]
    for ids, ours, theirs in zip(prompts, got, unchunked):
        assert ours == theirs, f"{arch}: prompt of {len(ids)} tokens diverged from whole-prompt prefill"
        want = hf_greedy(hf, ids, MAX_NEW)   # transformers stops at the tiny model's EOS (2); we ignore it
        assert ours[:len(want)] == want and (len(want) == MAX_NEW or want[-1] == 2), \
            f"{arch}: prompt of {len(ids)} tokens diverged from transformers"


def test_default_model_chunked_matches_unchunked_and_transformers():
    from transformers import AutoModelForCausalLM

    llm = LLM(dtype="float32", kv_cache_memory_gb=0.25, enable_chunked_prefill=True,
              max_num_batched_tokens=32, max_num_seqs=8)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_config.path, dtype=torch.float32).eval()
    prompts = [llm.tokenizer.encode(p) for p in _prompts()]
    assert max(len(p) for p in prompts) > 500          # ~17 chunks of 32 tokens
    got, plans = _run_by_hand(llm, prompts, MAX_NEW, ignore_eos=False)
    assert _has_mixed_steps(plans)
    for ids, ours in zip(prompts, got):
        assert ours == hf_greedy(hf, ids, MAX_NEW), f"prompt of {len(ids)} tokens diverged"
    del hf
    whole = LLM(dtype="float32", kv_cache_memory_gb=0.25)
    outs = whole.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    assert got == [o.token_ids for o in outs]
    # the LLM API with chunked prefill: the same tokens, stop at EOS, first token timed
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.token_ids == got[0][:len(out.token_ids)] and out.text.strip().startswith("Paris")
    assert out.metrics["ttft_s"] > 0


def test_chunked_budget_below_the_sequence_limit_is_a_config_error(tmp_path):
    from engine.errors import ConfigError

    save_tiny_model(str(tmp_path), arch="llama")
    with pytest.raises(ConfigError, match="max_num_batched_tokens .4. must be >= max_num_seqs .8."):
        LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, enable_chunked_prefill=True,
            max_num_batched_tokens=4, max_num_seqs=8)
