"""What one engine instance is made of, built the same way by LLM and by every worker kind."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.default_model import default_model_path
from engine.device import resolve as resolve_device
from engine.errors import ConfigError
from engine.kv_cache import KVCache
from engine.model_config import ModelConfig, load_model_config
from engine.model_runner import ModelRunner, parse_dtype
from engine.runner import Runner


@dataclass
class EngineParts:
    model_config: ModelConfig
    runner: Runner      # a ModelRunner, or rank 0's ParallelRunner (cluster.parallel_worker)
    blocks: BlockManager
    max_model_len: int


def build_engine(model: str | None = None, dtype: str | torch.dtype = "bfloat16", block_size: int = 16,
                 kv_cache_memory_gb: float = 1.0, max_model_len: int | None = None,
                 num_threads: int | None = None, seed: int = 0, allocate_kv=torch.zeros,
                 enable_prefix_caching: bool = False, device: str = "cpu") -> EngineParts:
    """Load the model (a local directory; None = the default model) onto `device` (cpu, cuda,
    cuda:N; engine/device.py) and size the KV cache."""
    torch_device = resolve_device(device)   # first: an unusable device fails before anything loads
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    path = model or default_model_path()
    if not os.path.isdir(path):
        raise ConfigError(f"model directory {path!r} does not exist")
    cfg = load_model_config(path)
    torch_dtype = parse_dtype(dtype)
    if block_size <= 0:
        raise ConfigError(f"block_size must be > 0, got {block_size}")
    max_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    num_blocks = KVCache.num_blocks_for_budget(int(kv_cache_memory_gb * 2**30), cfg.num_layers,
                                               block_size, cfg.num_kv_heads, cfg.head_dim, torch_dtype)
    runner = ModelRunner(cfg, torch_dtype, block_size, num_blocks, max_len, seed=seed, allocate_kv=allocate_kv,
                         device=torch_device)
    return EngineParts(cfg, runner, BlockManager(num_blocks, block_size, enable_prefix_caching), max_len)
