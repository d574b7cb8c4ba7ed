"""Where an engine runs: `cpu`, `cuda` or `cuda:N` (the config's `model.device`, `LLM(device=...)`).

On a CUDA device the weights, the KV cache, every step's inputs and the sampler live there;
decode attention, the KV store and block copies are the Triton kernels (pdkernels dispatches on
the tensors' device), prefill attention is SDPA, the linears F.linear (the CPU's measured plans,
C kernels and packed weights are CPU-only), multi-rank instances talk over NCCL, and KV moves
between instances over `torch_dist` (NCCL) or, through host memory, over the other backends.

The name is checked without torch (`check_name`, for the config), and against the machine
(`resolve`): `cuda` where torch sees no CUDA device is a ConfigError at start, not a crash
in a worker.
"""
from __future__ import annotations

import re

from engine.errors import ConfigError

_NAME = re.compile(r"^(cpu|cuda)(:(\d+))?$")


def check_name(name: object, key: str = "device") -> None:
    """`cpu`, `cuda` or `cuda:N`; anything else is a ConfigError naming `key`."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None or (m.group(1) == "cpu" and m.group(2)):
        raise ConfigError(f"{key} must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def check_available(name: str, key: str = "device") -> None:
    """A CUDA device that this machine's torch cannot use is a ConfigError naming `key` (cpu: always fine)."""
    check_name(name, key)
    if name == "cpu":
        return
    import torch
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} is {name!r}, but torch sees no CUDA device here (torch {torch.__version__}, "
                          f"built {'with' if torch.version.cuda else 'without'} CUDA); use 'cpu'")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key} is {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve(name: str | None):
    """The torch.device for `name` (None: cpu), checked against this machine."""
    import torch
    if isinstance(name, torch.device):
        name = str(name)
    name = name or "cpu"
    check_available(name)
    return torch.device(name)


def dist_backend(device) -> str:
    """The torch.distributed backend for tensors on `device`: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"
