"""Data path `ray`: the KV bytes through Ray's object store, the simple baseline.

The sender `ray.put`s the payload as numpy byte views (Ray copies a torch
tensor on `get`; a numpy array it maps zero-copy) and names the object in the
DATA header; the receiver checks readiness with `ray.wait(timeout=0)`, so its
step loop never blocks, then reads the arrays straight out of the store.
Both processes must be connected to the same Ray cluster; this module never
starts or joins one (the worker's Ray shell, or a test, does).

The ObjectRef crosses in the header as (id, owner address, status), the way
Ray serialises a ref inside an object. Not through `ray.cloudpickle`: a ref
pickled out of band is pinned until its owner process exits, so every
transfer's KV would stay in the store. The sender holds the only real
reference until the transfer's lease ends, and dropping it frees the object.
A receiver that is still fetching then fails its attempt, which is right:
the lease is over.
"""
from __future__ import annotations

import base64

import numpy as np
import torch

from kv_transfer.base import TransferError
from kv_transfer.data_path import DataPath, byte_view, describe, tensor_view


def _ray():
    import ray
    if not ray.is_initialized():
        raise TransferError("backend 'ray' needs this process connected to a Ray cluster "
                            "(ray.init(address=...)) before the sender or receiver is made")
    return ray


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def ref_to_header(ref) -> dict:
    """What a receiver needs to borrow `ref` (the fields Ray's own serialiser writes)."""
    ray = _ray()
    core = ray._private.worker.global_worker.core_worker
    _, owner_address, status = core.serialize_object_ref(ref)
    return {"id": _b64(ref.binary()), "owner": _b64(owner_address), "status": _b64(status),
            "call_site": ref.call_site() or ""}


def ref_from_header(info: dict):
    """The ObjectRef `ref_to_header` described, registered as borrowed from its owner."""
    _ray()   # raises unless this process is connected to a Ray cluster
    from ray._private.serialization import _object_ref_deserializer
    try:
        binary, owner, status = (base64.b64decode(info[k], validate=True) for k in ("id", "owner", "status"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"DATA header's ray section is malformed: {e}") from None
    return _object_ref_deserializer(binary, str(info.get("call_site", "")), owner, status, None)


class RayPath(DataPath):
    name = "ray"
    deferred = True

    def __init__(self) -> None:
        _ray()   # fail at construction, not at the first transfer
        self._refs: dict[str, list] = {}             # sender: the objects of each live transfer
        self._incoming: dict[tuple[str, object], tuple[dict, object]] = {}   # receiver: (tid, attempt) -> (head, ref)
        self._reported: set[tuple[str, object]] = set()

    # -- sender -----------------------------------------------------------------
    def export(self, transfer_id: str, tensors: list[torch.Tensor], peer: bytes | None = None) -> tuple[dict, list]:
        ray = _ray()
        meta = describe(tensors)
        for m in meta:
            m["offset"] = 0   # one array per tensor
        ref = ray.put([byte_view(t.cpu()) for t in tensors])   # copied into the store here
        # Kept until the lease ends: a retry's object joins the first one.
        self._refs.setdefault(transfer_id, []).append(ref)
        return {"payload": meta, "ray": ref_to_header(ref)}, []

    def release(self, transfer_id: str) -> None:
        self._refs.pop(transfer_id, None)   # the last reference: Ray frees the objects

    # -- receiver ---------------------------------------------------------------
    def begin(self, header: dict, frames: list) -> None:
        if not isinstance(header.get("ray"), dict) or not isinstance(header.get("payload"), list):
            raise ValueError("DATA header has no ray section or payload")
        key = (header["transfer_id"], header.get("attempt"))
        self._incoming[key] = (header, ref_from_header(header["ray"]))
        self._reported.discard(key)

    def arrived(self) -> list[dict]:
        waiting = {key: ref for key, (_, ref) in self._incoming.items() if key not in self._reported}
        if not waiting:
            return []
        refs = list(waiting.values())
        ready, _ = _ray().wait(refs, num_returns=len(refs), timeout=0)
        ready_ids = {r.binary() for r in ready}
        heads = []
        for key, ref in waiting.items():
            if ref.binary() in ready_ids:
                self._reported.add(key)
                heads.append(self._incoming[key][0])
        return heads

    def open(self, header: dict, frames: list) -> list[torch.Tensor]:
        entry = self._incoming.get((header["transfer_id"], header.get("attempt")))
        if entry is None:
            raise ValueError(f"no ray object for {header['transfer_id']} attempt {header.get('attempt')}")
        # Ready, so this returns at once (a freed or failed object raises: the attempt fails).
        arrays = _ray().get(entry[1], timeout=1.0)
        meta = header["payload"]
        if not isinstance(arrays, list) or len(arrays) != len(meta):
            raise ValueError(f"ray object holds {type(arrays).__name__}, not {len(meta)} arrays")
        out = []
        for arr, m in zip(arrays, meta):
            if not isinstance(arr, np.ndarray) or arr.nbytes != m["nbytes"]:
                raise ValueError(f"ray object array does not match the header's {m['nbytes']} bytes")
            out.append(tensor_view(arr, m["dtype"], m["shape"], 0))   # read-only store memory: only read
        return out

    def close_import(self, transfer_id: str, attempt: int | None = None) -> None:
        for key in [k for k in self._incoming if k[0] == transfer_id and (attempt is None or k[1] == attempt)]:
            del self._incoming[key]   # our borrowed reference goes; the views are gone by now
            self._reported.discard(key)

    def close(self) -> None:
        self._refs.clear()
        self._incoming.clear()
        self._reported.clear()
