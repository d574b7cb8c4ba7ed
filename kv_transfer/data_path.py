"""How the bytes of one transfer travel once the control channel has agreed on it.

A data path turns the sender's payload (the packed KV of `kv_transfer.layout`,
or its int8 form plus scales) into zmq frames plus header fields, and back on
the receiving side. `inline` sends the bytes as zero-copy zmq frames (the
`zmq` backend, cross-node capable); `shm` stages them in one POSIX
shared-memory segment that the receiver maps (same node only).
"""
from __future__ import annotations

import mmap
import os
import warnings
from multiprocessing import shared_memory

import _posixshmem

import numpy as np
import torch

from kv_transfer.codec import wire_nbytes

# the dtypes a payload tensor may have on the wire (KV, int8 codes and their scales, ids)
WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "int8": torch.int8, "uint8": torch.uint8, "int64": torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor, without a copy for a CPU one (bf16 has no numpy dtype). A GPU
    tensor is copied to host memory first: the zmq, shm and ray paths carry host bytes."""
    return t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()


def describe(tensors: list[torch.Tensor]) -> list[dict]:
    """Shape, dtype and byte range of each payload tensor, packed back to back."""
    meta, offset = [], 0
    for t in tensors:
        nbytes = wire_nbytes(t)
        meta.append({"shape": list(t.shape), "dtype": dtype_name(t.dtype), "offset": offset, "nbytes": nbytes})
        offset += nbytes
    return meta


def tensor_view(buffer, dtype: str, shape: list[int], offset: int) -> torch.Tensor:
    """A tensor over `buffer` (read-only buffers too: callers only read those)."""
    nbytes = int(np.prod(shape)) * WIRE_DTYPES[dtype].itemsize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "the given buffer is not writable"
        flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(WIRE_DTYPES[dtype]).view(shape)


def _view(buffer, m: dict) -> torch.Tensor:
    return tensor_view(buffer, m["dtype"], m["shape"], m["offset"])


class DataPath:
    """What the channel asks of a data path; the defaults suit paths whose bytes ride in
    (or are named by) the DATA message itself.

    Sender: `export` once per served attempt, `sent` once its DATA header went out,
    `poll` every step, `release` when the transfer's lease ended, `close` at the end.
    Receiver: `open` a DATA message's payload, `close_import` once done with it.
    A deferred path also gets `begin` for every DATA header, current or stale (the
    bytes may already be on their way and must be taken off the wire), and reports
    in `arrived` the headers whose bytes are now here; `open` then returns them, or
    raises if they failed to arrive.
    """

    name = "base"
    deferred = False

    def export(self, transfer_id: str, tensors: list[torch.Tensor], peer: bytes | None = None) -> tuple[dict, list]:
        raise NotImplementedError

    def sent(self, transfer_id: str, extra: dict):
        """The DATA header carrying `extra` (what `export` returned) went out. Returns a
        tracker (`.done`) while the path still reads the sender's tensors, else None."""
        return None

    def poll(self, now: float) -> None:
        pass

    def open(self, header: dict, frames: list) -> list[torch.Tensor]:
        raise NotImplementedError

    def begin(self, header: dict, frames: list) -> None:
        pass

    def arrived(self) -> list[dict]:
        return []

    def close_import(self, transfer_id: str, attempt: int | None = None) -> None:
        pass

    def release(self, transfer_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class InlinePath(DataPath):
    name = "inline"

    def export(self, transfer_id: str, tensors: list[torch.Tensor], peer: bytes | None = None) -> tuple[dict, list]:
        meta = describe(tensors)
        for m in meta:
            m["offset"] = 0   # one frame per tensor
        return {"payload": meta}, [byte_view(t) for t in tensors]

    def open(self, header: dict, frames: list) -> list[torch.Tensor]:
        meta = header["payload"]
        if len(frames) != len(meta):
            raise ValueError(f"expected {len(meta)} data frames, got {len(frames)}")
        for m, f in zip(meta, frames):
            if len(f.buffer) != m["nbytes"]:
                raise ValueError(f"data frame has {len(f.buffer)} bytes, header says {m['nbytes']}")
        return [_view(f.buffer, m) for m, f in zip(meta, frames)]


class ShmPath(DataPath):
    """Sender writes the payload into a named segment; the receiver maps it and copies out."""

    name = "shm"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._count = 0
        self._exported: dict[str, shared_memory.SharedMemory] = {}
        self._imported: dict[str, mmap.mmap] = {}
        self._unclosed: list[mmap.mmap] = []   # views still alive at close time

    def export(self, transfer_id: str, tensors: list[torch.Tensor], peer: bytes | None = None) -> tuple[dict, list]:
        self.release(transfer_id)   # a retried pull exports again
        meta = describe(tensors)
        total = sum(m["nbytes"] for m in meta)
        self._count += 1
        seg = shared_memory.SharedMemory(create=True, size=max(total, 1), name=f"{self.prefix}-{self._count}")
        dst = np.frombuffer(seg.buf, dtype=np.uint8, count=total)
        for m, t in zip(meta, tensors):
            dst[m["offset"]:m["offset"] + m["nbytes"]] = byte_view(t)
        del dst   # no export of seg.buf may outlive this call, or close() fails
        self._exported[transfer_id] = seg
        return {"payload": meta, "shm": seg.name}, []

    def open(self, header: dict, frames: list) -> list[torch.Tensor]:
        seg = attach_segment(header["shm"])
        self._imported[header["transfer_id"]] = seg
        if len(seg) < sum(m["nbytes"] for m in header["payload"]):
            raise ValueError(f"segment {header['shm']} has {len(seg)} bytes, fewer than the header says")
        return [_view(seg, m) for m in header["payload"]]

    def close_import(self, transfer_id: str, attempt: int | None = None) -> None:
        """Unmap the segment; every tensor viewing it must be gone by now."""
        seg = self._imported.pop(transfer_id, None)
        if seg is not None:
            self._unclosed.append(seg)
        self._close_unclosed()

    def _close_unclosed(self) -> None:
        # A view can outlive its transfer for a moment (an exception's traceback
        # holds it): such a segment is closed on a later call instead.
        still = []
        for seg in self._unclosed:
            try:
                seg.close()
            except BufferError:
                still.append(seg)
        self._unclosed = still

    def release(self, transfer_id: str) -> None:
        seg = self._exported.pop(transfer_id, None)
        if seg is not None:
            seg.close()
            seg.unlink()

    def close(self) -> None:
        for tid in list(self._exported):
            self.release(tid)
        for tid in list(self._imported):
            self.close_import(tid)


def attach_segment(name: str) -> mmap.mmap:
    """Map a segment another process created. Not through SharedMemory: on Python < 3.13
    that registers it with this process's resource tracker, which would unlink it
    (or complain) when this process exits, while its creator still owns it."""
    fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDONLY, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
