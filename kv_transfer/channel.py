"""KV transfer over a zmq control channel with a pluggable data path (backends `zmq`, `shm`).

Sender (prefill) binds a ROUTER socket on its host (127.0.0.1 by default); each
receiver (decode) talks to it through one DEALER socket per sender endpoint.

  receiver -> sender   PULL  {transfer_id, attempt}
  sender -> receiver   DATA  {transfer_id, payload meta, checksum, ...} + frames
                       ERROR {transfer_id, error}      (unknown, ended or expired lease)
  receiver -> sender   ACK   {transfer_id, ok, error}  (ends the lease: DONE / FAILED)
                       ABORT {transfer_id}

The sender packs at PULL time, from blocks its lease still holds; both sides
do their work inside `poll`, called from their step loops, and never block.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq

from engine.cpu_tuning import keep_freed_memory
from kv_transfer import codec, layout as kvl
from kv_transfer.base import (KVReceiver, KVSender, TransferError, TransferOffer, TransferResult,
                              TransferStatus)
from kv_transfer.data_path import make_data_path
from kv_transfer.faults import FaultInjector, FaultSpec
from kv_transfer.lease import LeaseEnd, LeaseState, LeaseTable
from kv_transfer.shared_cache import AttachedCaches, copy_block_runs

COMPRESSIONS = (None, "int8")


def _send(sock, frames: list) -> None:
    sock.send_multipart(frames, copy=False)


def _header(frame) -> dict:
    return json.loads(bytes(frame.buffer))


class ChannelSender(KVSender):
    def __init__(self, cache_data: torch.Tensor, layout: kvl.KVLayout, backend: str = "zmq",
                 host: str = "127.0.0.1", lease_ttl_s: float = 30.0, checksum: bool = True,
                 compress: str | None = None, faults: FaultSpec | None = None,
                 shared_cache: str | None = None) -> None:
        """`shared_cache`: the name of the shared-memory segment holding `cache_data`
        (see `shared_cache.SharedKVCache`). With backend `shm`, no checksum, no
        compression and no faults, receivers then copy blocks in place: one copy."""
        if compress not in COMPRESSIONS:
            raise TransferError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
        keep_freed_memory()   # payloads are tens of MB: keep them off mmap/munmap
        self.cache_data, self.layout, self.backend = cache_data, layout, backend
        self.checksum, self.compress = checksum, compress
        self._staging = StagingPool()
        self.leases = LeaseTable(lease_ttl_s)
        self._num_tokens: dict[str, int] = {}
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self._endpoint = f"tcp://{host}:{port}"
        self._path = make_data_path(backend, f"pdkv-{os.getpid()}-{port}")
        self._faults = FaultInjector(faults) if faults else None
        self._delayed: list[tuple[float, list]] = []   # (due, frames) under fault delay
        self._zero_copy = (shared_cache is not None and backend == "shm" and not checksum
                           and compress is None and faults is None)
        self._shared_cache = shared_cache

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def offer(self, req_id: str, block_ids: Sequence[int], num_tokens: int, now: float,
              ttl_s: float | None = None) -> TransferOffer:
        tid = f"{req_id}-{uuid.uuid4().hex[:12]}"
        self.leases.offer(tid, req_id, tuple(block_ids), now, ttl_s)
        self._num_tokens[tid] = num_tokens
        return TransferOffer(tid, req_id, num_tokens, self.layout, self._endpoint, self.backend)

    def poll(self, now: float) -> list[LeaseEnd]:
        ends: list[LeaseEnd] = []
        while True:
            try:
                identity, kind, head, *_ = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            head = _header(head)
            try:
                end = self._handle(identity, bytes(kind.buffer), head, now)
            except Exception as e:   # one bad transfer must not take the worker down
                end = self._fail_serving(identity, head.get("transfer_id", ""), now, e)
            if end is not None:
                ends.append(end)
        self._flush_delayed(now)
        ends.extend(self.leases.expire(now))
        for end in ends:
            self._forget(end.transfer_id)
        return ends

    def abort(self, transfer_id: str, now: float) -> LeaseEnd | None:
        end = self.leases.abort(transfer_id, now)
        if end is not None:
            self._forget(transfer_id)
        return end

    def close(self) -> None:
        self._path.close()
        self._sock.close(0)
        self._ctx.term()

    # -- internals ------------------------------------------------------------
    def _handle(self, identity, kind: bytes, head: dict, now: float) -> LeaseEnd | None:
        tid = head.get("transfer_id", "")
        if kind == b"PULL":
            self._serve(identity, tid, now)
            return None
        if kind == b"ACK":
            if head.get("ok"):
                return self.leases.complete(tid, now)
            return self.leases.fail(tid, now, head.get("error") or "receiver failed")
        if kind == b"ABORT":
            return self.leases.abort(tid, now, "aborted by receiver")
        return None

    def _serve(self, identity, tid: str, now: float) -> None:
        lease = self.leases.get(tid)
        # A retry (the first payload arrived corrupted) re-serves an in-flight lease.
        retry = lease is not None and lease.state is LeaseState.IN_FLIGHT and now < lease.deadline
        if lease is None or not (retry or self.leases.start(tid, now)):
            _send(self._sock, [identity, b"ERROR", json.dumps(
                {"transfer_id": tid, "error": f"transfer {tid} is unknown, ended or expired"}).encode()])
            return
        if self._zero_copy:
            head = {"transfer_id": tid, "zero_copy": {
                "name": self._shared_cache, "shape": list(self.cache_data.shape),
                "dtype": self.layout.dtype, "block_ids": list(lease.block_ids)}}
            _send(self._sock, [identity, b"DATA", json.dumps(head).encode()])
            return
        n = self._num_tokens[tid]
        staging = self._staging.take(tid, self.layout.wire_shape(n), self.layout.torch_dtype)
        wire = kvl.pack(self.cache_data, self.layout, list(lease.block_ids), n, out=staging)
        payload = list(codec.quantize_int8(wire)) if self.compress == "int8" else [wire]
        head = {"transfer_id": tid, "compress": self.compress, "dtype": self.layout.dtype}
        if self.checksum:
            head["checksums"] = [codec.checksum(t) for t in payload]
        if self._faults is not None:
            if self._faults.drop():
                return
            payload = self._faults.mangle(payload)
        extra, frames = self._path.export(tid, payload)
        head.update(extra)
        msg = [identity, b"DATA", json.dumps(head).encode(), *frames]
        if self._faults is not None and self._faults.spec.delay_s > 0:
            self._delayed.append((now + self._faults.spec.delay_s, msg))
        else:
            _send(self._sock, msg)

    def _fail_serving(self, identity, tid: str, now: float, error: Exception) -> LeaseEnd | None:
        reason = f"sender failed to serve {tid}: {type(error).__name__}: {error}"
        _send(self._sock, [identity, b"ERROR", json.dumps({"transfer_id": tid, "error": reason}).encode()])
        return self.leases.fail(tid, now, reason)

    def _flush_delayed(self, now: float) -> None:
        due = [m for t, m in self._delayed if t <= now]
        self._delayed = [(t, m) for t, m in self._delayed if t > now]
        for msg in due:
            _send(self._sock, msg)

    def _forget(self, tid: str) -> None:
        self._num_tokens.pop(tid, None)
        self._path.release(tid)
        self._staging.give_back(tid)


class StagingPool:
    """Reused buffers to pack into: a fresh multi-MB tensor per transfer costs more in
    page faults than the packing itself. A buffer stays with its transfer until the
    lease ends (zmq may still be sending from it), then returns to the pool."""

    def __init__(self, max_free: int = 4) -> None:
        self.max_free = max_free
        self._free: list[torch.Tensor] = []
        self._lent: dict[str, torch.Tensor] = {}

    def take(self, tid: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.give_back(tid)   # a retry packs again
        nbytes = max(1, int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fits:   # by index: list.remove would compare tensors elementwise
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        self._lent[tid] = buf
        return buf[:nbytes].view(dtype)[:torch.Size(shape).numel()].view(shape)

    def give_back(self, tid: str) -> None:
        buf = self._lent.pop(tid, None)
        if buf is not None:
            self._free.append(buf)
            if len(self._free) > self.max_free:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


@dataclass
class _Pull:
    offer: TransferOffer
    dst_block_ids: list[int]
    attempts: int = 1
    sent_at: float = 0.0
    errors: list[str] = field(default_factory=list)


class ChannelReceiver(KVReceiver):
    def __init__(self, cache_data: torch.Tensor, layout: kvl.KVLayout, backend: str = "zmq",
                 max_attempts: int = 3, timeout_s: float = 10.0, clock=time.monotonic) -> None:
        keep_freed_memory()
        self.cache_data, self.layout, self.backend = cache_data, layout, backend
        self.max_attempts, self.timeout_s, self._clock = max_attempts, timeout_s, clock
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}
        self._pending: dict[str, _Pull] = {}
        self._path = make_data_path(backend, f"pdkv-recv-{os.getpid()}")
        self._attached = AttachedCaches()

    def pull(self, offer: TransferOffer, dst_block_ids: Sequence[int]) -> None:
        if offer.backend != self.backend:
            raise TransferError(f"offer {offer.transfer_id} uses backend {offer.backend!r}, this receiver {self.backend!r}")
        if offer.transfer_id in self._pending:
            raise TransferError(f"transfer {offer.transfer_id} is already being pulled")
        need = -(-offer.num_tokens // self.layout.block_size)
        if len(dst_block_ids) < need:
            raise TransferError(f"{offer.num_tokens} tokens need {need} blocks, got {len(dst_block_ids)}")
        kvl.check_compatible(offer.layout, self.layout)
        pull = _Pull(offer, list(dst_block_ids), sent_at=self._clock())
        self._pending[offer.transfer_id] = pull
        self._request(pull)

    def poll(self) -> list[TransferResult]:
        results: list[TransferResult] = []
        for sock in list(self._socks.values()):
            while True:
                try:
                    kind, head, *frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                result = self._handle(bytes(kind.buffer), _header(head), frames)
                if result is not None:
                    results.append(result)
        results.extend(self._timeouts())
        return results

    def abort(self, transfer_id: str) -> None:
        pull = self._pending.pop(transfer_id, None)
        if pull is not None:
            self._control(pull.offer.endpoint, b"ABORT", {"transfer_id": transfer_id})

    def close(self) -> None:
        self._path.close()
        self._attached.close()
        for sock in self._socks.values():
            sock.close(0)
        self._ctx.term()

    # -- internals ------------------------------------------------------------
    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self._socks[endpoint] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        return sock

    def _control(self, endpoint: str, kind: bytes, head: dict) -> None:
        _send(self._socket(endpoint), [kind, json.dumps(head).encode()])

    def _request(self, pull: _Pull) -> None:
        pull.sent_at = self._clock()
        self._control(pull.offer.endpoint, b"PULL",
                      {"transfer_id": pull.offer.transfer_id, "attempt": pull.attempts})

    def _handle(self, kind: bytes, head: dict, frames: list) -> TransferResult | None:
        tid = head.get("transfer_id", "")
        pull = self._pending.get(tid)
        if pull is None:
            self._path.close_import(tid)
            return None   # aborted or timed out meanwhile
        if kind == b"ERROR":
            return self._finish(pull, False, head.get("error", "sender error"), ack=False)
        try:
            nbytes = self._land(pull, head, frames)
        except (ValueError, KeyError, RuntimeError) as e:
            pull.errors.append(str(e))
            if pull.attempts < self.max_attempts:
                pull.attempts += 1
                self._request(pull)
                return None
            return self._finish(pull, False, f"after {pull.attempts} attempts: {e}")
        return self._finish(pull, True, None, nbytes=nbytes)

    def _land(self, pull: _Pull, head: dict, frames: list) -> int:
        """Verify the payload and write it into this worker's blocks; returns the bytes received."""
        tid = pull.offer.transfer_id
        if "zero_copy" in head:
            return self._copy_in_place(pull, head["zero_copy"])
        payload = wire = None
        try:
            payload = self._path.open(head, frames)
            expected = pull.offer.layout.wire_shape(pull.offer.num_tokens)
            if list(payload[0].shape) != list(expected):
                raise ValueError(f"payload shape {list(payload[0].shape)} != expected {list(expected)}")
            for t, want in zip(payload, head.get("checksums") or []):
                if codec.checksum(t) != want:
                    raise ValueError("checksum mismatch: the KV was corrupted on the way")
            if head.get("compress") == "int8":
                wire = codec.dequantize_int8(payload[0], payload[1], self.layout.torch_dtype)
            else:
                wire = payload[0]
            kvl.unpack_into(self.cache_data, self.layout, pull.dst_block_ids, wire, pull.offer.layout)
            return sum(t.numel() * t.element_size() for t in payload)
        finally:
            payload = wire = None   # views of a shared segment must go before it is unmapped
            self._path.close_import(tid)

    def _copy_in_place(self, pull: _Pull, zc: dict) -> int:
        """Copy the leased blocks straight out of the sender's shared cache."""
        src_layout, n = pull.offer.layout, pull.offer.num_tokens
        src = self._attached.view(zc["name"], zc["shape"], zc["dtype"])
        if _same_shard(src_layout, self.layout):
            num_blocks = -(-n // src_layout.block_size)
            copy_block_runs(src, zc["block_ids"][:num_blocks], self.cache_data, pull.dst_block_ids[:num_blocks])
        else:
            wire = kvl.pack(src, src_layout, zc["block_ids"], n)
            kvl.unpack_into(self.cache_data, self.layout, pull.dst_block_ids, wire, src_layout)
        return n * src_layout.bytes_per_token

    def _finish(self, pull: _Pull, ok: bool, error: str | None, nbytes: int = 0,
                ack: bool = True) -> TransferResult:
        tid = pull.offer.transfer_id
        del self._pending[tid]
        if ack:
            self._control(pull.offer.endpoint, b"ACK", {"transfer_id": tid, "ok": ok, "error": error})
        status = TransferStatus.DONE if ok else TransferStatus.FAILED
        return TransferResult(tid, pull.offer.req_id, status, error, nbytes, pull.attempts)

    def _timeouts(self) -> list[TransferResult]:
        now = self._clock()
        results = []
        for pull in [p for p in self._pending.values() if now - p.sent_at > self.timeout_s]:
            if pull.attempts < self.max_attempts:
                pull.attempts += 1
                self._request(pull)
            else:
                results.append(self._finish(pull, False, f"no answer after {pull.attempts} attempts"))
        return results


def _same_shard(a: kvl.KVLayout, b: kvl.KVLayout) -> bool:
    """Same layers, heads and block size: blocks can be copied whole."""
    return (a.layer_start, a.layer_end, a.head_start, a.head_end, a.block_size) == \
        (b.layer_start, b.layer_end, b.head_start, b.head_end, b.block_size)
