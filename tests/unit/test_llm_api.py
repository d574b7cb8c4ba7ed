"""The in-process LLM API: stopping, seeding, preemption, bad input, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine import LLM, ConfigError, InvalidRequestError, ModelLoadError, SamplingParams
from tests.helpers import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(str(path), arch="llama", seed=3)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=0.01, block_size=4)


def _all_free(llm: LLM) -> bool:
    return llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def test_max_tokens_and_length_finish(tiny):
    outs = tiny.generate(_prompts(3), SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [7, 7, 7]
    assert {o.finish_reason for o in outs} == {"length"}
    assert _all_free(tiny)


def test_seeded_sampling_is_reproducible_across_batches(tiny):
    prompts = _prompts(4, seed=1)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = tiny.generate([prompts[2]], params)[0].token_ids
    batched = tiny.generate(prompts, params)[2].token_ids
    assert alone == batched
    other = tiny.generate([prompts[2]], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9,
                                                       seed=99, ignore_eos=True))[0].token_ids
    assert other != alone
    assert _all_free(tiny)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_seeded_request_resumed_from_its_tokens_samples_the_same_continuation(tiny_dir, tiny, chunked):
    """How the router moves a request off a dead instance: a prefill of its prompt plus the k
    tokens already streamed. Seeded draws are keyed by the sampled token's position, so the
    resumed request samples token k+1 on from the same stream as the undisturbed run, alone
    or batched with others, whole or chunked."""
    llm = tiny if not chunked else LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=0.01, block_size=4,
                                       enable_chunked_prefill=True, max_num_batched_tokens=8,
                                       max_num_seqs=4)
    prompt, *others = _prompts(3, seed=5)
    params = SamplingParams(max_tokens=14, temperature=1.0, top_p=0.95, seed=4321, ignore_eos=True)
    full = llm.generate([prompt], params)[0].token_ids
    for k in (1, 5, 13):
        rest = SamplingParams(max_tokens=14 - k, temperature=1.0, top_p=0.95, seed=4321, ignore_eos=True)
        assert llm.generate([prompt + full[:k]], rest)[0].token_ids == full[k:], k
        batched = llm.generate([others[0], prompt + full[:k], others[1]], rest)
        assert batched[1].token_ids == full[k:], k
    # the continuation is the seed's doing, not a near-greedy model's: another seed differs
    other = SamplingParams(max_tokens=14, temperature=1.0, top_p=0.95, seed=4322, ignore_eos=True)
    assert llm.generate([prompt], other)[0].token_ids != full
    assert _all_free(llm)


def test_preemption_under_a_tiny_cache_keeps_greedy_output(tiny_dir, tiny):
    """A cache far too small for the batch forces preemption (recompute); tokens are unchanged."""
    small = LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=40 * tiny.runner.kv_cache.nbytes
                / tiny.block_manager.num_blocks / 2**30, block_size=4)
    assert small.block_manager.num_blocks == 40
    prompts = _prompts(8, seed=2)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in tiny.generate(prompts, params)]
    outs = small.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert _all_free(small)


@pytest.mark.parametrize("prompt,params,message", [
    ([], SamplingParams(), "prompt is empty"),
    ([5, 600], SamplingParams(), "outside the vocabulary"),
    ([5] * 1024, SamplingParams(), "context"),
    ([5, 6], SamplingParams(max_tokens=1023), "exceeds the context"),
])
def test_bad_requests_raise_and_leave_the_engine_working(tiny, prompt, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny.generate([[7, 8, 9], prompt], params)
    assert _all_free(tiny) and not tiny.scheduler.has_unfinished()
    assert len(tiny.generate([[7, 8, 9]], SamplingParams(max_tokens=2, temperature=0))[0].token_ids) >= 1


def test_text_prompt_without_tokenizer_is_a_clear_error(tiny):
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        tiny.generate(["hello"])


def test_bad_model_directories(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="not supported"):
        LLM(model=str(tmp_path))
    with pytest.raises(ConfigError, match="dtype"):
        LLM(model=tiny_dir, dtype="int3")


@pytest.mark.slow
def test_default_model_stop_strings_and_chat():
    llm = LLM(kv_cache_memory_gb=0.1)
    prompt = "The capital of France is"
    full = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert full.text.strip().startswith("Paris")
    # stop at a piece of the greedy continuation: the text ends right before it
    stop = full.text[len(full.text) // 2:][:3]
    cut = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert stop not in cut.text
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in answer.text
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate([""])
    assert _all_free(llm)


@pytest.mark.slow
def test_cli_generate_prints_a_completion():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--local", "--raw", "--max-tokens", "4",
                           "--threads", "1", "The capital of France is"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_cli_reports_bad_input_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--local", "--raw", "--max-tokens", "0", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "max_tokens must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_temperature_is_greedy_and_stop_needs_a_tokenizer(tiny):
    prompt = [[5, 9, 13]]
    greedy = tiny.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    tiny_t = tiny.generate(prompt, SamplingParams(max_tokens=6, temperature=1e-45, ignore_eos=True))[0]
    assert tiny_t.token_ids == greedy.token_ids
    with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):
        tiny.generate(prompt, SamplingParams(stop=["x"]))
    assert _all_free(tiny)


def test_a_batch_of_very_different_lengths_decodes_like_transformers(tiny_dir):
    """Decode attention runs such a batch in several passes grouped by length
    (pdkernels/paged_attention.length_groups); every sequence still gets transformers' tokens."""
    from transformers import AutoModelForCausalLM

    from pdkernels.paged_attention import length_groups
    from tests.helpers import hf_greedy
    lens = [5, 300, 20, 700, 12, 460]
    assert len(length_groups([n + 1 for n in lens], 4)) > 1
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lens]
    llm = LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=0.05, block_size=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for ids, out in zip(prompts, outs):
        want = hf_greedy(hf, ids, 8)
        assert out.token_ids[:len(want)] == want   # transformers stops at the tiny model's EOS
