"""The engine on a CUDA GPU: placement, greedy outputs against transformers on the same GPU, the
Triton kernels compiled for the GPU against their references, a tp=2 instance over NCCL.

Run by `make gpu-check` (TRITON_INTERPRET=0: the kernels compile for the GPU). Without a CUDA
device every test here is skipped; tests/unit/test_device.py covers what a CPU can check."""
from __future__ import annotations

import os

import pytest
import torch

import pdkernels
from engine import LLM, SamplingParams
from engine.default_model import default_model_path
from tests.parallel_ranks import reference, run_instance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run `make gpu-check` on a machine with one")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "The history of the printing press begins in the fifteenth century. " * 12 + "In short,"]


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def llm32():
    return LLM(device="cuda", dtype="float32", kv_cache_memory_gb=0.25)


def test_weights_cache_and_sampler_are_on_the_gpu(llm32):
    runner = llm32.runner
    assert runner.device.type == "cuda"
    assert all(p.is_cuda for p in runner.model.parameters()) and all(b.is_cuda for b in runner.model.buffers())
    assert runner.kv_cache.data.is_cuda and runner.generator.device.type == "cuda"
    assert not runner.model.gemm_plan.packed and runner.prefill_plan.kernel(512) == "sdpa"


def test_greedy_fp32_matches_transformers_on_the_same_gpu(llm32):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(llm32.model_config.path, dtype=torch.float32).cuda().eval()
    outs = llm32.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _hf_greedy(hf, llm32.tokenizer.encode(prompt), 16)[:len(out.token_ids)]
    assert outs[0].text.strip().startswith("Paris")


def test_bf16_and_seeded_sampling_on_the_gpu():
    llm = LLM(device="cuda", dtype="bfloat16", kv_cache_memory_gb=0.25)
    assert "Paris" in llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0))[0].text
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    first = llm.generate(PROMPTS, params)
    again = llm.generate(list(reversed(PROMPTS)), params)
    assert [o.token_ids for o in first] == [o.token_ids for o in reversed(again)]


def test_chunked_prefill_on_the_gpu(llm32):
    chunked = LLM(device="cuda", dtype="float32", kv_cache_memory_gb=0.25, enable_chunked_prefill=True,
                  max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in chunked.generate(PROMPTS, params)] == \
        [o.token_ids for o in llm32.generate(PROMPTS, params)]


def test_triton_kernels_compiled_for_the_gpu_match_their_references():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET=0 (make gpu-check)"
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    k_cache = torch.zeros(32, 16, 3, 64, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(40, 3, 64, device=dev, generator=g).to(dt)
    value = torch.randn(40, 3, 64, device=dev, generator=g).to(dt)
    slots = torch.randperm(32 * 16, device=dev, generator=g)[:40]
    slots[3] = -1
    pdkernels.store_kv(key, value, k_cache, v_cache, slots)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    pdkernels.store_kv_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

    k_cache.normal_(generator=g)
    v_cache.normal_(generator=g)
    tables = torch.randperm(32, device=dev, generator=g)[:24].view(4, 6).to(torch.int32)
    lens = torch.tensor([1, 17, 60, 96], device=dev, dtype=torch.int32)
    q = torch.randn(4, 9, 64, device=dev, generator=g).to(dt)
    got = pdkernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    want = pdkernels.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)

    slabs = torch.randn(6, 32, 128, device=dev, generator=g)
    ids = torch.tensor([5, 0, 31, 7], device=dev)
    assert torch.equal(pdkernels.gather_blocks(slabs, ids), pdkernels.gather_blocks_ref(slabs, ids))
    other = torch.zeros_like(slabs)
    pdkernels.scatter_blocks(pdkernels.gather_blocks(slabs, ids), other, ids)
    assert torch.equal(other[:, ids], slabs[:, ids])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per rank, NCCL between them)")
def test_tp2_over_nccl_matches_one_rank():
    prompts = [[1, 504, 3, 77, 9000, 12], [1] + list(range(100, 140))]
    ref_tokens, (ref_trip, ref_kv) = reference(default_model_path(), prompts, 8, device="cuda")
    tokens, (trip, kv) = run_instance(default_model_path(), 2, 1, prompts, 8, device="cuda")
    assert tokens == ref_tokens and trip == ref_trip
    torch.testing.assert_close(kv, ref_kv, rtol=1e-4, atol=1e-4)
