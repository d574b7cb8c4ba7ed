"""Picks the data path of a transfer backend (`make_data_path`): the one module that knows them all."""
from __future__ import annotations

import torch

from kv_transfer.backends import BACKENDS
from kv_transfer.data_path import DataPath, InlinePath, ShmPath
from kv_transfer.ray_path import RayPath
from kv_transfer.torch_dist_path import TorchDistPath


def make_data_path(backend: str, prefix: str, host: str = "127.0.0.1",
                   device: torch.device | None = None) -> DataPath:
    """`host`: the address a sender's path listens on; `device`: where a receiver's path
    puts what it receives (the device of its cache)."""
    if backend in ("zmq", "auto"):   # auto: zero copy needs no path, the other node's pulls go inline
        return InlinePath()
    if backend == "shm":
        return ShmPath(prefix)
    if backend == "torch_dist":
        return TorchDistPath(host=host, device=device)
    if backend == "ray":
        return RayPath()
    raise ValueError(f"no data path for backend {backend!r} ({', '.join(BACKENDS)})")
