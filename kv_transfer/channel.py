"""KV transfer over a zmq control channel with a pluggable data path (every backend).

Sender (prefill) binds a ROUTER socket on its host (127.0.0.1 by default); each
receiver (decode) talks to it through one DEALER socket per sender endpoint.

  receiver -> sender   PULL    {transfer_id, attempt}
  sender -> receiver   DATA    {transfer_id, attempt, payload meta, checksums} + frames
                       ERROR   {transfer_id, attempt, error}   (unknown, ended or expired lease)
  receiver -> sender   ACK     {transfer_id, attempt, ok, error}   (ends the lease)
  receiver -> sender   ABORT   {transfer_id}

Replies carry the attempt they answer; the receiver drops stale ones. In zero
copy mode DATA names the blocks and their generations (`SharedKVCache`) and
the receiver copies them out of the sender's shared cache itself; the sender
bumps a block's generation whenever its lease ends, so unchanged generations
after the copy prove the blocks were held throughout (else: retry or FAILED,
never another request's KV). With a deferred data path (`torch_dist`,
`ray`) DATA only announces the bytes, which travel on the path's own
connection; the receiver lands them once the path reports them arrived. Every message
is parsed defensively: a malformed one is dropped, never raised. Both sides
work inside `poll`, called from their step loops; no call blocks.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import zmq

from engine.block_manager import blocks_needed
from kv_transfer import codec, layout as kvl
from kv_transfer.base import (KVReceiver, KVSender, TransferError, TransferOffer, TransferResult,
                              TransferStatus)
from kv_transfer.data_path import make_data_path
from kv_transfer.faults import FaultInjector, FaultSpec
from kv_transfer.lease import LeaseEnd, LeaseState, LeaseTable
from kv_transfer.shared_cache import AttachedCaches, SharedKVCache, copy_block_runs
from kv_transfer.staging import StagingPool
from kv_transfer.stream import (LayerProgress, LayerStream, chunk_payload, layer_range, layers_layout,
                                layers_per_message, unpack_runs)

COMPRESSIONS = (None, "int8")
# A closing socket keeps trying this long to deliver what is queued on it (a last ABORT
# or ACK); with linger 0 those were dropped whenever the connection was not up yet.
CLOSE_LINGER_MS = 200
# zmq sends a whole transfer as DATA messages of whole layers, about this many bytes each:
# packing, the wire and unpacking then overlap (one 128 MB frame: ~1.3 GB/s on loopback).
CHUNK_BYTES = 4 << 20


def _send(sock, frames: list, track: bool = False):
    """Non-blocking send; None when the peer's queue is full (the receiver's timeout retries)."""
    try:
        return sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=track) or True
    except zmq.Again:
        return None


def _message(head: dict) -> bytes:
    return json.dumps(head).encode()


def _parse(frames) -> tuple[bytes, dict, list] | None:
    """(kind, header, data frames) of a message, or None if it is malformed."""
    try:
        kind, head = bytes(frames[0].buffer), json.loads(bytes(frames[1].buffer))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("transfer_id"), str):
        return None
    return kind, head, list(frames[2:])


class ChannelSender(KVSender):
    def __init__(self, cache_data: torch.Tensor, layout: kvl.KVLayout, backend: str = "zmq",
                 host: str = "127.0.0.1", lease_ttl_s: float = 30.0, checksum: bool = True,
                 compress: str | None = None, faults: FaultSpec | None = None,
                 shared_cache: SharedKVCache | None = None) -> None:
        """`shared_cache`: the `SharedKVCache` whose tensor is `cache_data`. Backend `shm`
        then runs zero copy: receivers copy leased blocks out of it. It needs checksum
        off, no compression and no faults: nothing crosses a wire to check or corrupt."""
        if compress not in COMPRESSIONS:
            raise TransferError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
        if shared_cache is not None and (backend != "shm" or checksum or compress or faults):
            raise TransferError("shared_cache (zero copy) needs backend 'shm', checksum=False, "
                                "no compression and no faults: nothing crosses a wire to check")
        self.cache_data, self.layout, self.backend = cache_data, layout, backend
        self.checksum, self.compress = checksum, compress
        self.zero_copy, self._shared = shared_cache is not None, shared_cache
        self.leases = LeaseTable(lease_ttl_s)
        self._num_tokens: dict[str, int] = {}
        self._staging = StagingPool()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self._endpoint = f"tcp://{host}:{port}"
        try:
            self._path = make_data_path(backend, f"pdkv-{os.getpid()}-{port}", host=host)
        except BaseException:   # e.g. backend ray without a Ray connection: leave no socket behind
            self._sock.close(0)
            self._ctx.term()
            raise
        self._faults = FaultInjector(faults) if faults else None
        self._delayed: list[tuple[float, str, list, dict, bool]] = []   # (due, tid, msg, extra, has frames)
        self._streams: dict[str, LayerStream] = {}
        self._ended: list[LeaseEnd] = []   # ended inside layers_ready, reported by the next poll

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def supports_streaming(self) -> bool:
        # bytes that ride in the DATA message (zmq frames) or are named by it (zero copy)
        return self.backend == "zmq" or self.zero_copy

    def offer(self, req_id: str, block_ids: Sequence[int], num_tokens: int, now: float,
              ttl_s: float | None = None, stream: bool = False) -> TransferOffer:
        if stream and not self.supports_streaming:
            raise TransferError(f"backend {self.backend!r} cannot stream layers (zmq, or shm zero copy)")
        tid = f"{req_id}-{uuid.uuid4().hex[:12]}"
        self.leases.offer(tid, req_id, tuple(block_ids), now, ttl_s)
        self._num_tokens[tid] = num_tokens
        if stream or self.backend == "zmq":
            self._streams[tid] = LayerStream(self.layout.local_layers)
            if not stream:   # a whole transfer over zmq: every layer is ready, sent in chunks
                self._streams[tid].mark_ready(None)
        return TransferOffer(tid, req_id, num_tokens, self.layout, self._endpoint, self.backend, stream)

    def layers_ready(self, transfer_ids: Sequence[str], num_layers: int | None, now: float) -> None:
        """Called from the model's per-layer hook: takes in pulls that came meanwhile and
        sends every newly ready layer to its receiver. Leases that end here are freed by
        the caller after its next `poll` (the forward still writes their blocks)."""
        for tid in transfer_ids:
            stream = self._streams.get(tid)
            if stream is not None:
                stream.mark_ready(num_layers)
        ends = self._receive(now)
        for end in ends:
            self._forget(end)
        self._ended.extend(ends)
        self._push_streams(now)

    def serve(self, now: float) -> None:
        self.layers_ready((), None, now)

    def poll(self, now: float) -> list[LeaseEnd]:
        ends, self._ended = self._ended, []
        fresh = self._receive(now)
        self._flush_delayed(now)
        self._path.poll(now)
        self._push_streams(now)
        fresh.extend(self.leases.expire(now))
        for end in fresh:
            self._forget(end)
        return ends + fresh

    def _receive(self, now: float) -> list[LeaseEnd]:
        """Handle every message waiting on the socket; the leases they ended."""
        ends: list[LeaseEnd] = []
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msg = _parse(frames[1:]) if len(frames) > 1 else None
            if msg is None:
                continue   # malformed: dropped, it names no transfer we could fail
            kind, head, _ = msg
            identity = frames[0].bytes   # bytes: a received Frame cannot be tracked when resent
            try:
                end = self._handle(identity, kind, head, now)
            except Exception as e:   # one bad transfer must not take the worker down
                end = self._fail_serving(identity, head, now, e)
            if end is not None:
                ends.append(end)
        return ends

    def wait_sockets(self) -> list | None:
        """The sockets a step loop may sleep on (zmq.Poller) until this sender has work: None
        when work can also come another way (a deferred data path, injected delays)."""
        return None if self._path.deferred or self._delayed else [self._sock]

    def wait(self, timeout_s: float) -> None:
        """Block until a receiver's message is waiting or `timeout_s` passed: a step loop with
        nothing to compute sleeps here rather than spinning on `poll` (on a busy 2-core
        machine, a spinning loop takes the core the other side needs)."""
        if not self._delayed:
            self._sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN)

    def abort(self, transfer_id: str, now: float) -> LeaseEnd | None:
        stream = self._streams.get(transfer_id)
        end = self.leases.abort(transfer_id, now)
        if end is not None:
            if stream is not None and stream.peer is not None:   # it is waiting for layers: tell it now
                _send(self._sock, [stream.peer, b"ERROR", _message(
                    {"transfer_id": transfer_id, "attempt": stream.attempt, "error": "the prefill side aborted"})])
            self._forget(end)
        return end

    def close(self) -> None:
        self._path.close()
        self._sock.close(0)
        self._ctx.term()

    # -- internals ------------------------------------------------------------
    def _handle(self, identity, kind: bytes, head: dict, now: float) -> LeaseEnd | None:
        tid = head["transfer_id"]
        if kind == b"PULL":
            self._serve(identity, tid, int(head.get("attempt", 1)), now)
            return None
        if kind == b"ACK":
            if not head.get("ok"):
                return self.leases.fail(tid, now, str(head.get("error") or "receiver failed"))
            return self.leases.complete(tid, now)
        if kind == b"ABORT":
            return self.leases.abort(tid, now, "aborted by receiver")
        return None

    def _serve(self, identity, tid: str, attempt: int, now: float) -> None:
        lease = self.leases.get(tid)
        # A retry (a lost or corrupted reply) re-serves an in-flight lease.
        retry = lease is not None and lease.state is LeaseState.IN_FLIGHT and now < lease.deadline
        if lease is None or not (retry or self.leases.start(tid, now)):
            _send(self._sock, [identity, b"ERROR", _message(
                {"transfer_id": tid, "attempt": attempt, "error": f"transfer {tid} is unknown, ended or expired"})])
            return
        stream = self._streams.get(tid)
        if stream is not None:
            stream.serve(identity, attempt)
            self._push(tid, stream, now)
            return
        head = {"transfer_id": tid, "attempt": attempt}
        if self.zero_copy:
            head["zero_copy"] = self._zero_copy_head(lease)
            _send(self._sock, [identity, b"DATA", _message(head)])
            return
        n = self._num_tokens[tid]
        staging = self._staging.take(tid, self.layout.wire_shape(n), self.layout.torch_dtype)
        wire = kvl.pack(self.cache_data, self.layout, list(lease.block_ids), n, out=staging)
        payload = list(codec.quantize_int8(wire)) if self.compress == "int8" else [wire]
        head["compress"] = self.compress
        self._dispatch(tid, identity, head, payload, now)

    def _zero_copy_head(self, lease) -> dict:
        return {"name": self._shared.name, "shape": list(self.cache_data.shape), "dtype": self.layout.dtype,
                "block_ids": list(lease.block_ids),
                "generations": self._shared.generations[list(lease.block_ids)].tolist()}

    def _push_streams(self, now: float) -> None:
        for tid, stream in list(self._streams.items()):
            if stream.peer is not None and stream.sent < stream.ready:
                try:
                    self._push(tid, stream, now)
                except Exception as e:   # one bad transfer must not take the worker down
                    end = self._fail_serving(stream.peer, {"transfer_id": tid, "attempt": stream.attempt}, now, e)
                    if end is not None:
                        self._forget(end)
                        self._ended.append(end)

    def _push(self, tid: str, stream: LayerStream, now: float) -> None:
        """Send the ready layers the current attempt has not had yet."""
        lease = self.leases.get(tid)
        if lease is None or stream.sent >= stream.ready:
            return
        if self.zero_copy:   # one message names every newly ready layer; the receiver copies them
            head = {"transfer_id": tid, "attempt": stream.attempt, "layers": [stream.sent, stream.ready],
                    "zero_copy": self._zero_copy_head(lease)}
            _send(self._sock, [stream.peer, b"DATA", _message(head)])
            stream.sent = stream.ready
            return
        n = self._num_tokens[tid]
        staging = self._staging.take(tid, self.layout.wire_shape(n), self.layout.torch_dtype)
        step = layers_per_message(self.layout, n, CHUNK_BYTES)
        for first in range(stream.sent, stream.ready, step):
            stop = min(first + step, stream.ready)
            payload = chunk_payload(stream, self.cache_data, self.layout, list(lease.block_ids), n, staging,
                                    first, stop, self.compress)
            head = {"transfer_id": tid, "attempt": stream.attempt, "layers": [first, stop],
                    "compress": self.compress}
            self._dispatch(tid, stream.peer, head, payload, now)
        stream.sent = stream.ready

    def _dispatch(self, tid: str, identity, head: dict, payload: list, now: float) -> None:
        """Checksum, faults, then send (or hold back for an injected delay) one DATA message."""
        if self.checksum:
            head["checksums"] = [codec.checksum(t) for t in payload]
        if self._faults is not None:
            if self._faults.drop():
                return
            payload = self._faults.mangle(payload)
        extra, frames = self._path.export(tid, payload, peer=identity)
        head.update(extra)
        msg = [identity, b"DATA", _message(head), *frames]
        if self._faults is not None and self._faults.spec.delay_s > 0:
            self._delayed.append((now + self._faults.spec.delay_s, tid, msg, extra, bool(frames)))
            return
        self._emit(tid, msg, extra, bool(frames))

    def _emit(self, tid: str, msg: list, extra: dict, has_frames: bool) -> None:
        """Send a DATA message; its staging buffer stays lent while zmq or the path reads it."""
        tracker = _send(self._sock, msg, track=has_frames)
        if tracker is None:
            return
        # A deferred path moves the bytes itself, and only once their header is out.
        tracker = tracker if has_frames else self._path.sent(tid, extra)
        if tracker is not None:
            self._staging.sending(tid, tracker)

    def _fail_serving(self, identity, head: dict, now: float, error: Exception) -> LeaseEnd | None:
        tid = head["transfer_id"]
        reason = f"sender failed to serve {tid}: {type(error).__name__}: {error}"
        _send(self._sock, [identity, b"ERROR", _message(
            {"transfer_id": tid, "attempt": head.get("attempt"), "error": reason})])
        return self.leases.fail(tid, now, reason)

    def _flush_delayed(self, now: float) -> None:
        due = [d for d in self._delayed if d[0] <= now]
        self._delayed = [d for d in self._delayed if d[0] > now]
        for _, tid, msg, extra, has_frames in due:
            self._emit(tid, msg, extra, has_frames)

    def _forget(self, end: LeaseEnd) -> None:
        tid = end.transfer_id
        if self._shared is not None:
            self._shared.bump(end.block_ids)   # before the worker can reuse them
        self._num_tokens.pop(tid, None)
        self._streams.pop(tid, None)
        self._delayed = [d for d in self._delayed if d[1] != tid]
        self._path.release(tid)
        self._staging.give_back(tid)


@dataclass
class _Pull:
    offer: TransferOffer
    dst_block_ids: list[int]
    attempts: int = 1
    sent_at: float = 0.0
    layers: LayerProgress | None = None   # a layer by layer delivery (streamed offers)


class ChannelReceiver(KVReceiver):
    def __init__(self, cache_data: torch.Tensor, layout: kvl.KVLayout, backend: str = "zmq",
                 max_attempts: int = 3, timeout_s: float = 10.0, clock=time.monotonic,
                 max_endpoints: int = 64) -> None:
        """`max_endpoints`: senders whose socket (and shared cache mapping) are kept; past it
        the least recently used idle one is closed (it is reopened if that sender comes back)."""
        if max_endpoints < 1:
            raise TransferError(f"max_endpoints must be >= 1, got {max_endpoints}")
        self.cache_data, self.layout, self.backend = cache_data, layout, backend
        self.max_attempts, self.timeout_s, self._clock = max_attempts, timeout_s, clock
        self.max_endpoints = max_endpoints
        self._path = make_data_path(backend, f"pdkv-recv-{os.getpid()}", device=cache_data.device)
        self._ctx = zmq.Context()
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()   # least recently used first
        self._pending: dict[str, _Pull] = {}
        self._attached = AttachedCaches(max_endpoints)

    def pull(self, offer: TransferOffer, dst_block_ids: Sequence[int]) -> None:
        if offer.backend != self.backend:
            raise TransferError(f"offer {offer.transfer_id} uses backend {offer.backend!r}, this receiver {self.backend!r}")
        if offer.transfer_id in self._pending:
            raise TransferError(f"transfer {offer.transfer_id} is already being pulled")
        need = blocks_needed(offer.num_tokens, self.layout.block_size)
        ids = list(dst_block_ids)
        if len(ids) < need:
            raise TransferError(f"{offer.num_tokens} tokens need {need} blocks, got {len(ids)}")
        num_blocks = self.cache_data.shape[2]
        if len(set(ids[:need])) != need or not all(0 <= b < num_blocks for b in ids[:need]):
            raise TransferError(f"destination blocks must be distinct ids in [0, {num_blocks}), got {ids[:need]}")
        kvl.check_compatible(offer.layout, self.layout)
        self._socket(offer.endpoint)   # a bad endpoint fails here, before anything is pending
        pull = _Pull(offer, ids)
        self._pending[offer.transfer_id] = pull
        self._request(pull)

    def poll(self) -> list[TransferResult]:
        results: list[TransferResult] = []
        for sock in list(self._socks.values()):
            # Handling one sender's message may evict another idle sender's socket (the
            # LRU bound): it had no pending pull, so what it still holds is stale.
            while not sock.closed:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                msg = _parse(frames)
                result = self._handle(*msg) if msg is not None else None
                if result is not None:
                    results.append(result)
        for head in self._path.arrived():
            result = self._arrived(head)
            if result is not None:
                results.append(result)
        results.extend(self._timeouts())
        return results

    def wait_sockets(self) -> list | None:
        """The sockets a step loop may sleep on (zmq.Poller) until a pull progresses: None
        when bytes also arrive another way (a deferred data path)."""
        return None if self._path.deferred else list(self._socks.values())

    def wait(self, timeout_s: float) -> None:
        """Block until a sender's message may be waiting, or `timeout_s` passed: a step
        loop with nothing else to do sleeps here instead of spinning on `poll`."""
        poller = zmq.Poller()
        for sock in self._socks.values():
            poller.register(sock, zmq.POLLIN)
        if self._socks:
            poller.poll(max(0, int(timeout_s * 1000)))
        else:
            time.sleep(timeout_s)

    def abort(self, transfer_id: str) -> None:
        pull = self._pending.pop(transfer_id, None)
        if pull is not None:
            self._path.close_import(transfer_id)
            self._control(pull.offer.endpoint, b"ABORT", {"transfer_id": transfer_id})

    def close(self) -> None:
        for tid in list(self._pending):   # the sender frees those blocks now, not at expiry
            self.abort(tid)
        self._path.close()
        self._attached.close()
        for sock in self._socks.values():
            sock.close(linger=CLOSE_LINGER_MS)   # the ABORTs above still go out
        self._ctx.term()

    def abort_offer(self, offer: TransferOffer) -> None:
        """Give an offer up without pulling it (its pull could not start): the sender frees
        its blocks now rather than at the lease's expiry. Best effort, never raises."""
        if offer.transfer_id in self._pending:
            self.abort(offer.transfer_id)
            return
        try:
            self._control(offer.endpoint, b"ABORT", {"transfer_id": offer.transfer_id})
        except (TransferError, TypeError, ValueError):
            pass   # an endpoint we cannot reach: the lease expires there

    # -- internals ------------------------------------------------------------
    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._socks.get(endpoint)
        if sock is not None:
            self._socks.move_to_end(endpoint)
            self._evict_sockets(0, keep=endpoint)   # back under the bound once pulls ended
        else:
            self._evict_sockets(1)
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as e:
                sock.close(0)
                raise TransferError(f"cannot connect to sender endpoint {endpoint!r}: {e}") from None
            self._socks[endpoint] = sock
        return sock

    def _evict_sockets(self, room_for: int, keep: str | None = None) -> None:
        """Make room for `room_for` more senders: close the least recently used sockets that
        serve no pending pull (all busy: go over the bound rather than fail a pull)."""
        if len(self._socks) + room_for <= self.max_endpoints:
            return
        busy = {p.offer.endpoint for p in self._pending.values()} | {keep}
        for endpoint in [e for e in self._socks if e not in busy]:
            if len(self._socks) + room_for <= self.max_endpoints:
                return
            self._socks.pop(endpoint).close(linger=CLOSE_LINGER_MS)   # a last ACK still goes out

    def _control(self, endpoint: str, kind: bytes, head: dict) -> None:
        _send(self._socket(endpoint), [kind, _message(head)])

    def _request(self, pull: _Pull) -> None:
        pull.sent_at = self._clock()
        pull.layers = None   # a new attempt gets every layer again
        self._control(pull.offer.endpoint, b"PULL",
                      {"transfer_id": pull.offer.transfer_id, "attempt": pull.attempts})

    def _handle(self, kind: bytes, head: dict, frames: list) -> TransferResult | None:
        tid = head["transfer_id"]
        pull = self._pending.get(tid)
        current = pull is not None and head.get("attempt") == pull.attempts
        if kind == b"DATA" and self._path.deferred and "zero_copy" not in head:
            return self._announced(pull if current else None, head, frames)
        if not current:
            return None   # aborted, finished or timed out meanwhile: a stale reply
        if kind == b"ERROR":
            return self._finish(pull, False, str(head.get("error", "sender error")), ack=False)
        if kind != b"DATA":
            return None
        if "layers" in head:
            return self._deliver_layers(pull, head, frames)
        return self._deliver(pull, head, frames)

    def _announced(self, pull: _Pull | None, head: dict, frames: list) -> TransferResult | None:
        """A deferred path's DATA header: start taking its bytes off the wire, even for a stale
        reply (`pull` None), whose bytes the sender may already be sending; those are
        dropped as they land."""
        try:
            self._path.begin(head, frames)
        except Exception as e:   # a header we cannot follow fails this attempt only
            return None if pull is None else self._retry_or_fail(pull, f"{type(e).__name__}: {e}")
        if pull is None:
            self._path.close_import(head["transfer_id"], head.get("attempt"))
        return None

    def _arrived(self, head: dict) -> TransferResult | None:
        """The bytes a deferred path was receiving are here (or failed to come)."""
        tid = head["transfer_id"]
        pull = self._pending.get(tid)
        if pull is None or head.get("attempt") != pull.attempts:
            self._path.close_import(tid, head.get("attempt"))
            return None
        return self._deliver(pull, head, [])

    def _deliver(self, pull: _Pull, head: dict, frames: list) -> TransferResult | None:
        try:
            if "zero_copy" in head:
                self._copy_in_place(pull, head["zero_copy"])
                return self._finish(pull, True, None)
            nbytes = self._land(pull, head, frames)
        except Exception as e:   # anything wrong with one payload fails this attempt only
            return self._retry_or_fail(pull, f"{type(e).__name__}: {e}")
        return self._finish(pull, True, None, nbytes=nbytes)

    def _deliver_layers(self, pull: _Pull, head: dict, frames: list) -> TransferResult | None:
        """One message of a streamed transfer: some of the source's layers; DONE once all are in."""
        num_layers = pull.offer.layout.local_layers
        try:
            layers = layer_range(head, num_layers)
            if "zero_copy" in head:
                self._copy_in_place(pull, head["zero_copy"], layers)
                nbytes = len(layers) * pull.offer.num_tokens * pull.offer.layout.bytes_per_token // num_layers
            else:
                nbytes = self._land(pull, head, frames, layers=layers)
        except Exception as e:   # anything wrong with one payload fails this attempt only
            return self._retry_or_fail(pull, f"{type(e).__name__}: {e}")
        if pull.layers is None:
            pull.layers = LayerProgress(num_layers)
        pull.sent_at = self._clock()   # the timeout counts silence, not the whole prefill
        if not pull.layers.add(layers, nbytes):
            return None
        return self._finish(pull, True, None, nbytes=pull.layers.nbytes)

    def _land(self, pull: _Pull, head: dict, frames: list, layers: range | None = None) -> int:
        """Verify the payload and write it into this worker's blocks; returns the bytes received.
        `layers`: the payload holds only these local layers of the source (a chunk)."""
        tid = pull.offer.transfer_id
        payload = wire = None
        try:
            payload = self._path.open(head, frames)
            expected = pull.offer.layout.wire_shape(pull.offer.num_tokens)
            expected = expected if layers is None else (len(layers), *expected[1:])
            if list(payload[0].shape) != list(expected):
                raise ValueError(f"payload shape {list(payload[0].shape)} != expected {list(expected)}")
            for t, want in zip(payload, head.get("checksums") or []):
                if codec.checksum(t) != want:
                    raise ValueError("checksum mismatch: the KV was corrupted on the way")
            if head.get("compress") == "int8":
                wire = codec.dequantize_int8(payload[0], payload[1], self.layout.torch_dtype)
            else:
                wire = payload[0]
            src = pull.offer.layout
            if _same_shard(src, self.layout) and wire.is_contiguous():   # whole blocks, in runs
                layers = layers or range(src.local_layers)
                unpack_runs(wire, self.cache_data[layers.start:layers.stop], pull.dst_block_ids)
            else:
                if layers is not None:
                    src = layers_layout(src, layers.start, layers.stop)
                kvl.unpack_into(self.cache_data, self.layout, pull.dst_block_ids, wire, src)
            return sum(codec.wire_nbytes(t) for t in payload)
        finally:
            payload = wire = None   # views of a shared segment must go before it is unmapped
            self._path.close_import(tid, head.get("attempt"))

    def _copy_in_place(self, pull: _Pull, zc: dict, layers: range | None = None) -> None:
        """Copy the leased blocks (of local `layers` only, when streaming) straight out of the
        sender's shared cache, then check that their lease held throughout (generations unchanged)."""
        src_layout, n = pull.offer.layout, pull.offer.num_tokens
        src, generations = self._attached.view(zc["name"], zc["shape"], zc["dtype"])
        layers = range(src_layout.local_layers) if layers is None else layers
        if _same_shard(src_layout, self.layout):
            num_blocks = blocks_needed(n, src_layout.block_size)
            copy_block_runs(src[layers.start:layers.stop], zc["block_ids"][:num_blocks],
                            self.cache_data[layers.start:layers.stop], pull.dst_block_ids[:num_blocks])
        elif len(layers) == src_layout.local_layers:
            wire = kvl.pack(src, src_layout, zc["block_ids"], n)
            kvl.unpack_into(self.cache_data, self.layout, pull.dst_block_ids, wire, src_layout)
        else:
            for layer in layers:
                wire = kvl.pack_layer(src, src_layout, layer, zc["block_ids"], n)
                kvl.unpack_layer_into(self.cache_data, self.layout, pull.dst_block_ids, wire, src_layout,
                                      src_layout.layer_start + layer)
        if generations[zc["block_ids"]].tolist() != zc["generations"]:
            raise ValueError("the source blocks were released while being copied (lease ended)")

    def _retry_or_fail(self, pull: _Pull, error: str) -> TransferResult | None:
        self._path.close_import(pull.offer.transfer_id)   # whatever earlier attempts still bring is dropped
        if pull.attempts < self.max_attempts:
            pull.attempts += 1
            self._request(pull)
            return None
        return self._finish(pull, False, f"after {pull.attempts} attempts: {error}")

    def _finish(self, pull: _Pull, ok: bool, error: str | None, nbytes: int | None = None,
                ack: bool = True) -> TransferResult:
        tid = pull.offer.transfer_id
        del self._pending[tid]
        self._path.close_import(tid)
        if ack:
            self._control(pull.offer.endpoint, b"ACK", {"transfer_id": tid, "attempt": pull.attempts,
                                                        "ok": ok, "error": error})
        if nbytes is None:
            nbytes = pull.offer.num_tokens * pull.offer.layout.bytes_per_token if ok else 0
        status = TransferStatus.DONE if ok else TransferStatus.FAILED
        return TransferResult(tid, pull.offer.req_id, status, error, nbytes, pull.attempts)

    def _timeouts(self) -> list[TransferResult]:
        now = self._clock()
        results = []
        for pull in [p for p in self._pending.values() if now - p.sent_at > self.timeout_s]:
            result = self._retry_or_fail(pull, f"no answer within {self.timeout_s}s")
            if result is not None:
                results.append(result)
        return results


def _same_shard(a: kvl.KVLayout, b: kvl.KVLayout) -> bool:
    """Same layers, heads and block size: blocks can be copied whole."""
    return (a.layer_start, a.layer_end, a.head_start, a.head_end, a.block_size) == \
        (b.layer_start, b.layer_end, b.head_start, b.head_end, b.block_size)
