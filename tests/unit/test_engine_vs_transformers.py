"""Greedy output of our engine is token-identical to transformers' generate (fp32)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.helpers import hf_greedy, save_tiny_model

pytestmark = pytest.mark.slow

MAX_NEW = 20
_STORY = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based inks and a wooden press adapted "
          "from wine making. ")


def _prompts() -> list[str]:
    return [
        "The capital of France is",
        "Hi",
        "Write a haiku about the sea.",
        "def fibonacci(n):\n    ",
        "List three primary colors of light, please:",
        "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
        "Question: What is 12 times 12?\nAnswer:",
        _STORY * 16 + "In summary, the printing press",   # > 500 tokens
    ]


@pytest.fixture(scope="module")
def default_llm():
    return LLM(dtype="float32", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def default_hf(default_llm):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_llm.model_config.path, dtype=torch.float32).eval()


def test_default_model_batch_matches_transformers(default_llm, default_hf):
    prompts = _prompts()
    prompt_ids = [default_llm.tokenizer.encode(p) for p in prompts]
    lengths = sorted(len(p) for p in prompt_ids)
    assert lengths[-1] > 500 and len(set(lengths)) == len(lengths)
    outs = default_llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for ids, out in zip(prompt_ids, outs):
        assert out.prompt_token_ids == ids
        expected = hf_greedy(default_hf, ids, MAX_NEW)
        assert out.token_ids == expected, f"prompt of {len(ids)} tokens diverged"
    assert outs[0].text.strip().startswith("Paris")
    assert default_llm.block_manager.num_free_blocks == default_llm.block_manager.num_blocks


def test_default_model_eos_stops_and_is_kept(default_llm, default_hf):
    """A chat prompt ends in <|im_end|> (the EOS): we stop where transformers stops."""
    ids = default_llm.apply_chat_template([{"role": "user", "content": "Say just the word: yes"}])
    out = default_llm.generate([ids], SamplingParams(max_tokens=40, temperature=0.0))[0]
    expected = hf_greedy(default_hf, ids, 40)
    eos = default_llm.model_config.eos_token_ids
    expected = expected[:next(i for i, t in enumerate(expected) if t in eos) + 1]
    assert out.finish_reason == "eos"
    assert out.token_ids == expected
    assert "<|im_end|>" not in out.text


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_random_model_matches_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    save_tiny_model(str(tmp_path), arch=arch)
    llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, block_size=8)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [1, 5, 8, 9, 17, 40, 123, 600]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        hf_out = hf_greedy(hf, ids, MAX_NEW)
        assert out.token_ids == hf_out, f"{arch}: prompt of {len(ids)} tokens diverged"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
