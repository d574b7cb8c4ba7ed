"""Runs the model for a step plan: packed prefill or one batched decode step.

`prefill` and `decode_step` are separate because the two worker kinds call
them apart; `execute` picks one for a `StepPlan`. The KV of a sequence lives
in the blocks named by its block ids, so it can be exported and imported
block by block (see `KVCache.slabs` and `pdkernels.gather_blocks`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from engine.attention import AttentionMetadata
from engine.chunked_prefill import execute_mixed
from engine.chunked_scheduler import MixedStepPlan
from engine.cpu_tuning import keep_freed_memory, matmul_backend
from engine.dtypes import DTYPE_ALIASES, DTYPE_NAMES
from engine.errors import ConfigError
from engine.gemm import choose_plan as choose_gemm_plan
from engine.prefill_attention import DEFAULT as PREFILL_DEFAULT
from engine.prefill_attention import choose_plan as choose_prefill_plan
from engine.kv_cache import KVCache
from engine.model import CausalLM
from engine.model_config import ModelConfig
from engine.parallel import ParallelContext
from engine.sampler import sample
from engine.sequence import SeqWork, StepKind, StepPlan, StepResult
from engine.weights import load_weights


def kv_allocator(allocate_kv, device: torch.device):
    """`allocate_kv(shape, dtype=)` making its tensor on `device`. A custom allocator (a cache in shared
    memory, for zero-copy transfer) is CPU memory: on another device that is a ConfigError."""
    if device.type == "cpu":
        return allocate_kv
    if allocate_kv is not torch.zeros:
        raise ConfigError(f"a KV cache in shared memory (zero-copy transfer) needs model.device 'cpu', not "
                          f"{str(device)!r}: set transfer.backend to torch_dist (NCCL), or checksum: true")
    return functools.partial(torch.zeros, device=device)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A model dtype by name (engine.dtypes: bfloat16, float16, float32, or an alias such as bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} is not one of {sorted([*DTYPE_NAMES, *DTYPE_ALIASES])}")
    return getattr(torch, name)

class ModelRunner:
    runs_layer_hook = True   # execute(on_layer=) calls it after each layer of a prefill

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, block_size: int, num_blocks: int,
                 max_model_len: int, par: ParallelContext | None = None, seed: int = 0,
                 allocate_kv=torch.zeros, device: torch.device | str = "cpu") -> None:
        """`device` (engine/device.py): weights, KV cache, step inputs and sampling live there."""
        keep_freed_memory()
        self.cfg = cfg
        self.par = par or ParallelContext()
        self.dtype = dtype
        self.block_size = block_size
        self.device = torch.device(device)
        with self.device:   # parameters and buffers are made where they live: no CPU copy first
            self.model = CausalLM(cfg, self.par, dtype, max_positions=max_model_len)
        load_weights(self.model, cfg.path)
        self.model.eval()
        # measured CPU paths (packed weights, blocked attention); elsewhere the defaults
        self.model.use_gemm_plan(choose_gemm_plan(self.model.linear_weights(), dtype))
        attn = self.model.layers[0].self_attn if len(self.model.layers) else None
        self.prefill_plan = (choose_prefill_plan(attn.num_heads, attn.num_kv_heads, attn.head_dim, dtype,
                                                 self.device) if attn is not None else PREFILL_DEFAULT)
        local_kv_heads = self.par.split(cfg.num_kv_heads, "num_key_value_heads")
        self.kv_cache = KVCache(len(self.model.layer_range), num_blocks, block_size,
                                local_kv_heads, cfg.head_dim, dtype, kv_allocator(allocate_kv, self.device))
        self.kv_layers = self.kv_cache.layers()   # per layer (k, v) views of the cache
        # ("meta": a placement dry run, never sampled; torch has no generator there)
        self.generator = torch.Generator(self.device if self.device.type != "meta" else "cpu").manual_seed(seed)

    def release_kv_cache(self) -> None:
        """Drop every reference to the cache's memory (a shared segment can be unmapped then)."""
        self.kv_cache.data = None
        self.kv_layers = []

    def execute(self, plan: StepPlan, on_layer=None) -> StepResult:
        """`on_layer(i)`: called in a prefill once local layer i's KV is stored (streaming)."""
        if plan.kind is StepKind.MIXED:   # chunked prefill (engine/chunked_scheduler.py)
            return execute_mixed(self, plan)
        return self.prefill(plan.seqs, on_layer) if plan.kind is StepKind.PREFILL else self.decode_step(plan.seqs)

    @torch.inference_mode()
    def prefill(self, seqs: Sequence[SeqWork], on_layer=None) -> StepResult:
        """Run whole prompts packed together, store their KV, sample each first token. Prompts
        whose prefix is cached (start_pos > 0) run as the chunks of a mixed step, attending
        over that prefix in the cache (chunked_prefill.py)."""
        if any(s.start_pos for s in seqs):
            return execute_mixed(self, MixedStepPlan(tuple(seqs), (True,) * len(seqs)), on_layer)
        ids, pos, slots, bounds = [], [], [], []
        start = 0
        for s in seqs:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            positions = torch.arange(n)
            pos.append(positions)
            slots.append(self._slots(s.block_ids, positions))
            bounds.append((start, start + n))
            start += n
        dev = self.device   # inputs are built on the CPU, then moved (a no-op there)
        meta = AttentionMetadata(StepKind.PREFILL, torch.cat(slots).to(dev), bounds, None, None, self.prefill_plan)
        last_rows = [end - 1 for _, end in bounds]
        hidden = self.model(torch.tensor(ids).to(dev), torch.cat(pos).to(dev), self.kv_layers, meta,
                            last_rows=last_rows, on_layer=on_layer)   # [seqs, hidden]
        return self._sample(hidden, seqs)

    @torch.inference_mode()
    def decode_step(self, seqs: Sequence[SeqWork]) -> StepResult:
        """One new token per sequence over its cached context."""
        bs = self.block_size
        positions = torch.tensor([s.start_pos for s in seqs])
        max_blocks = max(len(s.block_ids) for s in seqs)
        tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        slots = tables.gather(1, (positions // bs).unsqueeze(1)).squeeze(1).long() * bs + positions % bs
        dev = self.device   # inputs are built on the CPU, then moved (a no-op there)
        meta = AttentionMetadata(StepKind.DECODE, slots.to(dev), [], tables.to(dev),
                                 torch.tensor([s.context_len for s in seqs], dtype=torch.int32).to(dev))
        ids, positions = torch.tensor([s.token_ids[0] for s in seqs]).to(dev), positions.to(dev)
        with matmul_backend(len(seqs), self.model.gemm_plan):
            hidden = self.model(ids, positions, self.kv_layers, meta)
            return self._sample(hidden, seqs)

    def _slots(self, block_ids: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(block_ids, dtype=torch.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _sample(self, hidden: torch.Tensor, seqs: Sequence[SeqWork]) -> StepResult:
        logits = self.model.compute_logits(hidden)
        # seeded draws are keyed by the sampled token's position, whatever the batch or the run
        tokens = sample(logits, [s.sampling for s in seqs], [s.context_len for s in seqs], self.generator)
        return StepResult(tuple(tokens))
