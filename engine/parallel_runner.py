"""Running one instance over tp_size x pp_size ranks (processes in one torch.distributed group).

    rank = pp_rank * tp_size + tp_rank          rank 0 = first stage, tensor rank 0

Rank 0 owns the instance: the worker object (scheduler, block manager, step
loop) sees a `ParallelRunner` where a one-rank instance has a `ModelRunner`.
Each step:
  1. rank 0 broadcasts the command (plain data: `("step", StepPlan)`) on a gloo
     control group; the other ranks wait for it in `RankServer.serve`;
  2. every rank runs its shard (`ShardRunner`): its layers (pipeline stage),
     and within them its heads and MLP columns (tensor rank); row-parallel
     layers all-reduce inside the model (`ParallelContext.all_reduce`);
  3. pipeline stages run one after another: a stage receives the hidden
     states [tokens, hidden] from the same tensor rank of the stage before and
     sends its own on (no micro-batching: one stage works at a time; simple and
     correct, not the throughput-optimal schedule);
  4. the last stage samples (every tensor rank of it the same tokens) and its
     tensor rank 0 sends them to rank 0, which returns them as the StepResult.

KV of an instance. Every rank's cache holds its share (layers x KV heads) in
the same blocks: rank 0's block manager names blocks for all of them. Transfer
to and from other instances goes through a canonical full-model cache on rank
0 (`ParallelRunner.kv_cache`, what the transfer layer sees): `gather_blocks`
copies the ranks' shares of some blocks into it before they are offered,
`scatter_blocks` copies landed blocks out to the ranks. See cluster.parallel_kv.

Data (hidden states, all-reduce, KV blocks) goes over the default group:
gloo on CPU, NCCL on GPU (the same code, `backend=`); commands always over gloo.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import ConfigError
from engine.kv_cache import KVCache
from engine.model_config import ModelConfig, load_model_config
from engine.device import dist_backend
from engine.device import resolve as resolve_device
from engine.model_runner import ModelRunner, kv_allocator, parse_dtype
from engine.parallel import ParallelContext
from engine.sequence import SeqWork, StepPlan, StepResult

log = logging.getLogger(__name__)
# Followers wait on the control group for as long as rank 0 is idle: that wait must not time out.
CONTROL_TIMEOUT = datetime.timedelta(days=30)
DATA_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class RankSpec:
    """Where one rank sits and how it finds the others (a TCPStore on master_addr:master_port)."""

    rank: int
    tp_size: int
    pp_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"
    host: str = ""           # this rank's own address (its node's): gloo listens there; "" = gloo's default

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ConfigError(f"tp_size and pp_size must be >= 1, got {self.tp_size} x {self.pp_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank


@dataclass(frozen=True)
class EngineArgs:
    """What every rank of an instance builds from; all ranks get the same."""

    model_path: str
    dtype: str = "bfloat16"
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0      # the instance's KV capacity, counted for the whole model
    max_model_len: int | None = None
    num_threads: int | None = None
    seed: int = 0
    device: str = "cpu"                  # every rank's (engine/device.py); CUDA ranks talk over NCCL


def join_group(spec: RankSpec) -> tuple[ParallelContext, object]:
    """Join the instance's process group; returns this rank's ParallelContext and the control group.

    Every rank creates every subgroup in the same order (torch.distributed requires it). Rank 0's
    TCPStore listens on master_addr only (not every interface); gloo on the rank's own `host`."""
    if spec.host:
        _gloo_on(spec.host)
    listen = {}
    if spec.rank == 0:   # TCPStore alone would listen on every interface: hand it a bound socket
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.master_addr, spec.master_port))
        sock.listen(64)
        listen = {"master_listen_fd": sock.detach()}   # the store closes it
    store = dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size, is_master=spec.rank == 0,
                          timeout=DATA_TIMEOUT, **listen)
    dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size,
                            timeout=DATA_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    tp_group = None
    for pp in range(spec.pp_size):
        ranks = [spec.global_rank(pp, t) for t in range(spec.tp_size)]
        group = dist.new_group(ranks) if spec.tp_size > 1 else None
        if pp == spec.pp_rank:
            tp_group = group
    par = ParallelContext(spec.tp_rank, spec.tp_size, spec.pp_rank, spec.pp_size, tp_group)
    return par, control


def _gloo_on(host: str) -> None:
    """Make gloo listen on `host`: by default it binds what the machine's host name resolves to
    (often 127.0.0.1, which the ranks on other nodes cannot reach). Its knob is an interface
    name, GLOO_SOCKET_IFNAME; a process runs one instance, so setting it here is safe."""
    iface = interface_of(host)
    if iface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = iface
    else:
        log.warning("no network interface holds %s: gloo listens on its default address", host)


def interface_of(address: str) -> str | None:
    """The name of the interface whose (primary IPv4) address is `address`, or None."""
    if address.startswith("127."):
        return "lo"
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:   # no IPv4 address on it
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def instance_num_blocks(cfg: ModelConfig, args: EngineArgs) -> int:
    """Blocks per rank: the budget counted for the whole model, the same number on every rank."""
    return KVCache.num_blocks_for_budget(int(args.kv_cache_memory_gb * 2**30), cfg.num_layers, args.block_size,
                                         cfg.num_kv_heads, cfg.head_dim, parse_dtype(args.dtype))


class _PipelineStage:
    """The stage's CausalLM, taking hidden states from the stage before and passing its own on."""

    def __init__(self, model, spec: RankSpec) -> None:
        self.model, self.spec = model, spec
        par = model.par
        self._prev = None if par.is_first_stage else spec.global_rank(par.pp_rank - 1, par.tp_rank)
        self._next = None if par.is_last_stage else spec.global_rank(par.pp_rank + 1, par.tp_rank)

    def __call__(self, input_ids, positions, kv_caches, meta, hidden=None, **kwargs):
        if self._prev is not None:
            # hidden: [tokens, hidden] of every token of the step (the trim is the last stage's)
            hidden = torch.empty(positions.shape[0], self.model.cfg.hidden_size, dtype=self.model.dtype,
                                 device=positions.device)
            dist.recv(hidden, src=self._prev)
        h = self.model(input_ids, positions, kv_caches, meta, hidden=hidden, **kwargs)
        if self._next is not None:
            dist.send(h.contiguous(), dst=self._next)
        return h

    def __getattr__(self, name):
        return getattr(self.model, name)


class ShardRunner(ModelRunner):
    """A ModelRunner for one rank: its stage of the model, its heads; the sampled tokens reach rank 0."""

    def __init__(self, cfg: ModelConfig, args: EngineArgs, spec: RankSpec, par: ParallelContext,
                 max_model_len: int) -> None:
        super().__init__(cfg, parse_dtype(args.dtype), args.block_size, instance_num_blocks(cfg, args),
                         max_model_len, par=par, seed=args.seed, device=args.device)
        self.spec = spec
        self.model = _PipelineStage(self.model, spec)
        self.kv_heads = par.kv_heads(cfg.num_kv_heads)
        self.layers = par.layer_range(cfg.num_layers)
        self._sampler_rank = spec.global_rank(spec.pp_size - 1, 0)

    def _sample(self, hidden: torch.Tensor, seqs: Sequence[SeqWork]) -> StepResult:
        rank = self.spec.rank
        if self.par.is_last_stage:
            result = super()._sample(hidden, seqs)
            if rank == self._sampler_rank and rank != 0:
                dist.send(torch.tensor(result.token_ids, dtype=torch.int64, device=self.device), dst=0)
            return result
        if rank == 0:
            tokens = torch.empty(len(seqs), dtype=torch.int64, device=self.device)   # NCCL: on the GPU
            dist.recv(tokens, src=self._sampler_rank)
            return StepResult(tuple(tokens.tolist()))
        return StepResult(())

    # -- KV blocks to and from rank 0's canonical cache -----------------------------------------
    def send_blocks(self, ids: torch.Tensor) -> None:
        dist.send(self.kv_cache.data.index_select(2, ids.to(self.device)), dst=0)

    def recv_blocks(self, ids: torch.Tensor) -> None:
        data, ids = self.kv_cache.data, ids.to(self.device)
        part = torch.empty(data.shape[:2] + (len(ids),) + data.shape[3:], dtype=data.dtype, device=data.device)
        dist.recv(part, src=0)
        data.index_copy_(2, ids, part)


class RankServer:
    """A rank other than 0: runs whatever rank 0 broadcasts until told to stop."""

    def __init__(self, shard: ShardRunner, control) -> None:
        self.shard, self.control = shard, control

    def serve(self) -> None:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            kind, arg = box[0]
            if kind == "stop":
                return
            if kind == "step":
                self.shard.execute(arg)
            elif kind == "gather":
                self.shard.send_blocks(torch.tensor(arg, dtype=torch.int64))
            elif kind == "scatter":
                self.shard.recv_blocks(torch.tensor(arg, dtype=torch.int64))
            else:
                raise RuntimeError(f"rank {self.shard.spec.rank}: unknown command {kind!r}")


class ParallelRunner:
    """Rank 0's runner: what a worker object steps (engine.runner.Runner)."""

    runs_layer_hook = False   # the KV of a prefill is gathered on rank 0 after the whole forward

    def __init__(self, shard: ShardRunner, control, allocate_kv=torch.zeros) -> None:
        self.shard, self.control = shard, control
        cfg = shard.cfg
        self.cfg, self.dtype, self.block_size, self.par = cfg, shard.dtype, shard.block_size, shard.par
        self.spec = shard.spec
        # The canonical cache the transfer layer reads and writes: every layer and KV head.
        self.kv_cache = KVCache(cfg.num_layers, shard.kv_cache.num_blocks, shard.block_size, cfg.num_kv_heads,
                                cfg.head_dim, shard.dtype, kv_allocator(allocate_kv, shard.device))
        self._closed = False

    def _command(self, kind: str, arg=None) -> None:
        dist.broadcast_object_list([(kind, arg)], src=0, group=self.control)

    def execute(self, plan: StepPlan, on_layer=None) -> StepResult:
        if on_layer is not None:
            raise NotImplementedError("a multi-rank instance does not stream layers (on_layer)")
        self._command("step", plan)
        return self.shard.execute(plan)

    def gather_blocks(self, block_ids: Sequence[int]) -> None:
        """Copy every rank's share of these blocks into the canonical cache (before they are offered)."""
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        self._command("gather", ids.tolist())
        ids = ids.to(self.shard.device)
        for rank in range(self.spec.world_size):
            view = self._share_of(rank)
            if rank == 0:
                part = self.shard.kv_cache.data.index_select(2, ids)
            else:
                part = torch.empty(view.shape[:2] + (len(ids),) + view.shape[3:], dtype=view.dtype, device=view.device)
                dist.recv(part, src=rank)
            view.index_copy_(2, ids, part)

    def scatter_blocks(self, block_ids: Sequence[int]) -> None:
        """Copy these blocks of the canonical cache out to every rank's share (after they landed)."""
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        self._command("scatter", ids.tolist())
        ids = ids.to(self.shard.device)
        for rank in range(self.spec.world_size):
            part = self._share_of(rank).index_select(2, ids)
            if rank == 0:
                self.shard.kv_cache.data.index_copy_(2, ids, part)
            else:
                dist.send(part.contiguous(), dst=rank)

    def _share_of(self, rank: int) -> torch.Tensor:
        """Rank `rank`'s layers x KV heads of the canonical cache, as a view."""
        # [num_layers, 2, blocks, block_size, num_kv_heads, head_dim] -> [its layers, ..., its heads, head_dim]
        pp, tp = divmod(rank, self.spec.tp_size)
        par = ParallelContext(tp, self.spec.tp_size, pp, self.spec.pp_size)
        layers, heads = par.layer_range(self.cfg.num_layers), par.kv_heads(self.cfg.num_kv_heads)
        return self.kv_cache.data[layers.start:layers.stop, :, :, :, heads.start:heads.stop]

    def close(self) -> None:
        """Release the other ranks from their loops (they then leave the group)."""
        if not self._closed:
            self._closed = True
            self._command("stop")


def build_rank(spec: RankSpec, args: EngineArgs, allocate_kv=torch.zeros):
    """Join the group and build this rank: a ParallelRunner on rank 0, a RankServer elsewhere."""
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    if not os.path.isdir(args.model_path):
        raise ConfigError(f"model directory {args.model_path!r} does not exist")
    cfg = load_model_config(args.model_path)
    max_len = min(args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    device = resolve_device(args.device)
    if device.type == "cuda":   # NCCL for the data (all-reduce, hidden states, KV blocks); commands stay on gloo
        if device.index is None:   # each rank its own GPU (under Ray, the one it was given: cuda:0)
            device = torch.device("cuda", spec.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        spec = dataclasses.replace(spec, backend=dist_backend(device))
        args = dataclasses.replace(args, device=str(device))
    par, control = join_group(spec)
    shard = ShardRunner(cfg, args, spec, par, max_len)
    if spec.rank == 0:
        return ParallelRunner(shard, control, allocate_kv), max_len
    return RankServer(shard, control), max_len

