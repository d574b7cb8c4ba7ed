"""engine/device.py and the engine's device placement, checked on a machine without a GPU:
names and availability (a clear ConfigError, at start), placement on the `meta` device, and the
code paths a CUDA device takes (Triton kernels, default plans, no C kernels) run on CPU tensors
under TRITON_INTERPRET=1, token-identical to transformers. What needs a real GPU is in tests/gpu/."""
from __future__ import annotations

import pytest
import torch

import pdkernels
from cluster.config import ModelSection, load_config
from engine import LLM, ConfigError, SamplingParams
from engine import device as engine_device
from engine.model_config import load_model_config
from engine.model_runner import ModelRunner, kv_allocator
from pdkernels import cpu_fused
from tests.helpers import hf_greedy, save_tiny_model

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:7"])
def test_device_names(name):
    engine_device.check_name(name, "model.device")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cpu:0", "cuda:x", "", None, 0])
def test_bad_device_names_name_the_key(name):
    with pytest.raises(ConfigError, match="model.device"):
        engine_device.check_name(name, "model.device")


@no_cuda
def test_cuda_without_a_gpu_is_a_config_error_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.device.*no CUDA device"):
        ModelSection(device="cuda").check("model")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  device: cuda:1\n")
    with pytest.raises(ConfigError, match="model.device"):
        load_config(str(config))
    with pytest.raises(ConfigError, match="no CUDA device"):
        LLM(device="cuda")                      # before any weight is loaded
    ModelSection(device="cpu").check("model")   # the default needs nothing


def test_a_device_index_past_the_machines_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    engine_device.check_available("cuda:0", "model.device")
    with pytest.raises(ConfigError, match=r"model\.device.*1 CUDA device"):
        engine_device.check_available("cuda:1", "model.device")


def test_nccl_for_cuda_gloo_elsewhere():
    assert engine_device.dist_backend(torch.device("cuda", 1)) == "nccl"
    assert engine_device.dist_backend(torch.device("cpu")) == "gloo"


def test_kv_allocator_places_the_cache_and_refuses_shared_memory_off_the_cpu():
    def shared(shape, dtype):
        return torch.zeros(shape, dtype=dtype)
    assert kv_allocator(shared, torch.device("cpu")) is shared
    assert kv_allocator(torch.zeros, torch.device("meta"))((2, 3), dtype=torch.bfloat16).device.type == "meta"
    with pytest.raises(ConfigError, match="model.device"):
        kv_allocator(shared, torch.device("cuda"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-device")
    save_tiny_model(str(path), arch="llama", seed=5)
    return str(path)


def test_weights_cache_and_buffers_are_made_on_the_device(tiny_dir):
    # `meta`: placement without memory or data; what a CUDA device gets, short of the GPU itself
    runner = ModelRunner(load_model_config(tiny_dir), torch.float32, 4, 16, 128, device="meta")
    assert runner.device == torch.device("meta")
    assert {p.device.type for p in runner.model.parameters()} == {"meta"}
    assert {b.device.type for b in runner.model.buffers()} == {"meta"}
    assert runner.kv_cache.data.device.type == "meta"
    # off the CPU: F.linear and SDPA, not the CPU's measured plans or packed weights
    assert not runner.model.gemm_plan.packed and runner.model.gemm_plan.path(8) == "linear"
    assert runner.prefill_plan.kernel(512) == "sdpa"


@pytest.fixture
def gpu_code_paths(monkeypatch):
    """The kernel choices a CUDA device gets, on CPU tensors: Triton for the KV store, decode attention
    and block copies (interpreted), no C kernels, the default GEMM and prefill plans."""
    assert pdkernels.HAS_TRITON, "Triton is needed to run its kernels under TRITON_INTERPRET=1"
    monkeypatch.setattr(pdkernels, "_on_triton", lambda t: True)
    monkeypatch.setattr(cpu_fused, "ENABLED", False)
    monkeypatch.setenv("PDCLUSTER_AUTOTUNE", "0")


def test_the_gpu_code_paths_match_transformers_on_cpu(tiny_dir, gpu_code_paths):
    from transformers import AutoModelForCausalLM
    llm = LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=0.01, block_size=4)
    assert pdkernels.decode_attention_fn(torch.zeros(1, 4, 16), torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16),
                                         None, None) is pdkernels.paged_decode_attention_triton
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = [[5, 17, 99, 3, 250, 31], [7] * 11, list(range(40, 73))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12)


def test_chunked_prefill_on_the_gpu_code_paths(tiny_dir, gpu_code_paths):
    whole = LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=0.01, block_size=4)
    chunked = LLM(model=tiny_dir, dtype="float32", kv_cache_memory_gb=0.01, block_size=4,
                  enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = [list(range(3, 50)), [9, 8, 7]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == \
        [o.token_ids for o in whole.generate(prompts, params)]
