"""KV transfer over a zmq control channel with a pluggable data path (every backend).

Sender (prefill) binds a ROUTER socket on its host (127.0.0.1 by default); each
receiver (decode, `channel_receiver.ChannelReceiver`) talks
to it through one DEALER socket per sender endpoint.

  receiver -> sender   PULL    {transfer_id, attempt, skip?}
  sender -> receiver   DATA    {transfer_id, attempt, payload meta, checksums} + frames
                       ERROR   {transfer_id, attempt, error}   (unknown, ended or expired lease)
  receiver -> sender   ACK     {transfer_id, attempt, ok, error}   (ends the lease)
  receiver -> sender   ABORT   {transfer_id}

Replies carry the attempt they answer; the receiver drops stale ones. In zero
copy mode DATA names the blocks and their generations (`SharedKVCache`) and
the receiver copies them out of the sender's shared cache itself; the sender
bumps a block's generation whenever its lease ends, so unchanged generations
after the copy prove the blocks were held throughout (else: retry or FAILED,
never another request's KV). Direct zero copy: an offer made after prefill
(not streamed) already carries that head (`TransferOffer.zero_copy`; the
generations cannot change while the lease is held), so attempt 1 sends no
PULL: the receiver's next `poll` copies and ACKs, and the sender ends the
lease from OFFERED on that ACK. A failed direct copy (no mapping, generations
changed because the lease ended) is retried the old way: PULL attempt 2.
Backend `auto` serves both ways at once: an offer names the node whose shared
memory holds the sender's cache (`TransferOffer.node`); a receiver on that
node copies zero copy as above, any other receiver's PULL says `inline` and
gets the bytes in zmq frames (as backend `zmq`). The choice is the pair's.
With a deferred data path (`torch_dist`, `ray`) DATA only announces the
bytes, which travel on the path's own connection; the receiver lands them
once the path reports them arrived. A PULL may `skip` the first tokens, whole
blocks on both sides, whose KV the receiver holds already (prefix caching):
the sender then packs, sends or names only the blocks past them, and a zero
copy receiver copies only those. Every message is parsed defensively: a
malformed one is dropped, never raised (framing: `messages`). Both sides work inside `poll`,
called from their step loops; no call blocks.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

import torch
import zmq

from kv_transfer import codec, layout as kvl
from kv_transfer.backends import this_machine
from kv_transfer.base import KVSender, TransferError, TransferOffer
from kv_transfer.curve import CurveGuard, ZmqKeys
from kv_transfer.data_paths import make_data_path
from kv_transfer.faults import FaultInjector, FaultSpec
from kv_transfer.lease import LeaseEnd, LeaseState, LeaseTable
from kv_transfer.messages import header as _message, parse as _parse, send as _send
from kv_transfer.shared_cache import SharedKVCache
from kv_transfer.staging import StagingPool
from kv_transfer.stream import LayerStream, chunk_payload, layers_per_message

COMPRESSIONS = (None, "int8")
# zmq sends a whole transfer as DATA messages of whole layers, about this many bytes each:
# packing, the wire and unpacking then overlap (one 128 MB frame: ~1.3 GB/s on loopback).
CHUNK_BYTES = 4 << 20


class ChannelSender(KVSender):
    def __init__(self, cache_data: torch.Tensor, layout: kvl.KVLayout, backend: str = "zmq",
                 host: str = "127.0.0.1", lease_ttl_s: float = 30.0, checksum: bool = True,
                 compress: str | None = None, faults: FaultSpec | None = None,
                 shared_cache: SharedKVCache | None = None, keys: ZmqKeys | None = None,
                 node: str | None = None, encrypt_data: bool = False) -> None:
        """`shared_cache`: the `SharedKVCache` whose tensor is `cache_data`. Backend `shm`
        (or `auto`, for receivers on this node) then runs zero copy: receivers copy leased
        blocks out of it. It needs checksum off, no compression and no faults: nothing
        crosses a wire to check or corrupt. `node`: the node this process runs on (a Ray
        node id; default: this machine), which `auto` receivers compare with their own.
        `keys`: the cluster's CURVE keys; only receivers holding them can talk to this
        sender (`kv_transfer.curve`); None: plain zmq. With keys, inline KV bytes go on a
        data socket of their own, closed to strangers but not encrypted, unless
        `encrypt_data` (then through the CURVE socket: about 4x slower, in the clear nowhere)."""
        if compress not in COMPRESSIONS:
            raise TransferError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
        if shared_cache is not None and (backend not in ("shm", "auto") or checksum or compress or faults):
            raise TransferError("shared_cache (zero copy) needs backend 'shm' or 'auto', checksum=False, "
                                "no compression and no faults: nothing crosses a wire to check")
        self.cache_data, self.layout, self.backend = cache_data, layout, backend
        self.checksum, self.compress = checksum, compress
        self.zero_copy, self._shared = shared_cache is not None, shared_cache
        self.node = node or this_machine()
        self.leases = LeaseTable(lease_ttl_s)
        self._num_tokens: dict[str, int] = {}
        self._skip: dict[str, int] = {}   # tokens the receiver already holds, from its first PULL
        self._staging = StagingPool()
        self._ctx = zmq.Context()
        self._guard = CurveGuard(self._ctx, keys)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._guard.serve(self._sock)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self._endpoint = f"tcp://{host}:{port}"
        self._data: zmq.Socket | None = None     # inline KV bytes to members, by their data id
        self._data_endpoint = ""
        self._data_peers: set[bytes] = set()     # data ids connected now (their probe came)
        self.num_dropped = 0                     # messages that arrived on the data socket
        try:
            if keys is not None and not encrypt_data and backend in ("zmq", "auto"):
                self._data = self._ctx.socket(zmq.ROUTER)
                self._data.setsockopt(zmq.LINGER, 0)
                self._data.router_mandatory = 1   # an unknown id raises: it is not connected (yet)
                self._guard.serve_data(self._data)
                self._data_endpoint = f"tcp://{host}:{self._data.bind_to_random_port(f'tcp://{host}')}"
            self._path = make_data_path(backend, f"pdkv-{os.getpid()}-{port}", host=host)
        except BaseException:   # e.g. backend ray without a Ray connection: leave no socket behind
            self._sock.close(0)
            if self._data is not None:
                self._data.close(0)
            self._guard.close()
            self._ctx.term()
            raise
        self._faults = FaultInjector(faults) if faults else None
        self._delayed: list[tuple] = []   # (due, tid, msg, extra, has frames, socket)
        self._streams: dict[str, LayerStream] = {}
        self._ended: list[LeaseEnd] = []   # ended inside layers_ready, reported by the next poll

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def data_endpoint(self) -> str:
        """Where members take inline KV bytes from ("" when they come on `endpoint`)."""
        return self._data_endpoint

    @property
    def supports_streaming(self) -> bool:
        # bytes that ride in the DATA message (zmq frames) or are named by it (zero copy)
        return self.backend in ("zmq", "auto") or self.zero_copy

    def offer(self, req_id: str, block_ids: Sequence[int], num_tokens: int, now: float,
              ttl_s: float | None = None, stream: bool = False) -> TransferOffer:
        if stream and not self.supports_streaming:
            raise TransferError(f"backend {self.backend!r} cannot stream layers (zmq, auto, or shm zero copy)")
        tid = f"{req_id}-{uuid.uuid4().hex[:12]}"
        self.leases.offer(tid, req_id, tuple(block_ids), now, ttl_s)
        self._num_tokens[tid] = num_tokens
        if stream or self.backend in ("zmq", "auto"):
            self._streams[tid] = LayerStream(self.layout.local_layers)
            if not stream:   # a whole transfer over zmq: every layer is ready, sent in chunks
                self._streams[tid].mark_ready(None)
        # zero copy after prefill: the offer carries the head a PULL would get (direct copy)
        head = self._zero_copy_head(self.leases.get(tid)) if self.zero_copy and not stream else None
        return TransferOffer(tid, req_id, num_tokens, self.layout, self._endpoint, self.backend, stream, head,
                             node=self.node if self.zero_copy else "", data_endpoint=self._data_endpoint)

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
        self._receive_data()
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

    def _receive_data(self) -> None:
        """The data socket carries bytes out only: what comes in is a member's probe (its data
        connection is up: held layers can go) or is dropped unread."""
        while self._data is not None:
            try:
                frames = self._data.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2 and frames[1] == b"":
                self._data_peers.add(frames[0])
            else:
                self.num_dropped += 1

    def wait_sockets(self) -> list | None:
        """The sockets a step loop may sleep on (zmq.Poller) until this sender has work: None
        when work can also come another way (a deferred data path, injected delays)."""
        if self._path.deferred or self._delayed:
            return None
        return [self._sock] if self._data is None else [self._sock, self._data]

    def wait(self, timeout_s: float) -> None:
        """Block until a receiver's message is waiting or `timeout_s` passed: a step loop with
        nothing to compute sleeps here rather than spinning on `poll` (on a busy 2-core
        machine, a spinning loop takes the core the other side needs)."""
        if not self._delayed:
            poller = zmq.Poller()
            for sock in self.wait_sockets() or [self._sock]:
                poller.register(sock, zmq.POLLIN)
            poller.poll(max(0, int(timeout_s * 1000)))

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
        if self._data is not None:
            self._data.close(0)
        self._guard.close()
        self._ctx.term()

    # -- internals ------------------------------------------------------------
    def _handle(self, identity, kind: bytes, head: dict, now: float) -> LeaseEnd | None:
        tid = head["transfer_id"]
        if kind == b"PULL":
            # a receiver on another node (backend auto) takes the bytes inline, never zero copy
            inline = not self.zero_copy or (self.backend == "auto" and head.get("inline") is not False)
            self._serve(identity, tid, int(head.get("attempt", 1)), now, inline, _data_id(head), head.get("skip", 0))
            return None
        if kind == b"ACK":   # from OFFERED too: a direct zero copy sends no PULL
            if not head.get("ok"):
                return self.leases.fail(tid, now, str(head.get("error") or "receiver failed"))
            return self.leases.complete(tid, now)
        if kind == b"ABORT":
            return self.leases.abort(tid, now, "aborted by receiver")
        return None

    def _serve(self, identity, tid: str, attempt: int, now: float, inline: bool = True,
               data_id: bytes | None = None, skip=0) -> None:
        lease = self.leases.get(tid)
        # A retry (a lost or corrupted reply) re-serves an in-flight lease.
        retry = lease is not None and lease.state is LeaseState.IN_FLIGHT and now < lease.deadline
        if lease is None or not (retry or self.leases.start(tid, now)):
            _send(self._sock, [identity, b"ERROR", _message(
                {"transfer_id": tid, "attempt": attempt, "error": f"transfer {tid} is unknown, ended or expired"})])
            return
        self._take_skip(tid, skip)   # a bad one fails this transfer (the caller answers ERROR)
        stream = self._streams.get(tid)
        if stream is not None:
            stream.serve(identity, attempt, inline, data_id if self._data is not None else None)
            self._push(tid, stream, now)
            return
        head = {"transfer_id": tid, "attempt": attempt}
        if self.zero_copy:
            head["zero_copy"] = self._zero_copy_head(lease)
            _send(self._sock, [identity, b"DATA", _message(head)])
            return
        block_ids, n = self._span(tid, lease)
        staging = self._staging.take(tid, self.layout.wire_shape(n), self.layout.torch_dtype)
        wire = kvl.pack(self.cache_data, self.layout, block_ids, n, out=staging)
        payload = list(codec.quantize_int8(wire)) if self.compress == "int8" else [wire]
        head["compress"] = self.compress
        self._dispatch(tid, identity, head, payload, now)

    def _take_skip(self, tid: str, skip) -> None:
        """The tokens a PULL skips: whole blocks here, short of the prompt's end, and the same
        in every attempt (a stream packs its staging wire once)."""
        n = self._num_tokens[tid]
        if type(skip) is not int or not 0 <= skip < n or skip % self.layout.block_size:
            raise TransferError(f"a pull may skip whole blocks of {self.layout.block_size} tokens short of the "
                                f"prompt's {n}, got skip={skip!r}")
        if self._skip.setdefault(tid, skip) != skip:
            raise TransferError(f"a retried pull of {tid} skips {skip} tokens, its first attempt {self._skip[tid]}")

    def _span(self, tid: str, lease) -> tuple[list[int], int]:
        """(blocks, tokens) of what moves: the lease's blocks and prompt past the skipped tokens."""
        skip = self._skip.get(tid, 0)
        return list(lease.block_ids)[skip // self.layout.block_size:], self._num_tokens[tid] - skip

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
        if self.zero_copy and not stream.inline:   # one message names every newly ready layer; the receiver copies them
            head = {"transfer_id": tid, "attempt": stream.attempt, "layers": [stream.sent, stream.ready],
                    "zero_copy": self._zero_copy_head(lease)}
            _send(self._sock, [stream.peer, b"DATA", _message(head)])
            stream.sent = stream.ready
            return
        if stream.data_id is not None and stream.data_id not in self._data_peers:
            return   # its data connection is not up yet: its probe wakes the loop, the next poll sends
        block_ids, n = self._span(tid, lease)
        staging = self._staging.take(tid, self.layout.wire_shape(n), self.layout.torch_dtype)
        step = layers_per_message(self.layout, n, CHUNK_BYTES)
        for first in range(stream.sent, stream.ready, step):
            stop = min(first + step, stream.ready)
            payload = chunk_payload(stream, self.cache_data, self.layout, block_ids, n, staging,
                                    first, stop, self.compress)
            head = {"transfer_id": tid, "attempt": stream.attempt, "layers": [first, stop],
                    "compress": self.compress}
            try:
                self._dispatch(tid, stream.peer, head, payload, now, stream.data_id)
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self._data_peers.discard(stream.data_id)   # it went away: held until it is back
                return
            stream.sent = stop

    def _dispatch(self, tid: str, identity, head: dict, payload: list, now: float,
                  data_id: bytes | None = None) -> None:
        """Checksum, faults, then send (or hold back for an injected delay) one DATA message;
        to `data_id` on the data socket when the receiver named one, else on the control socket."""
        if self.checksum:
            head["checksums"] = [codec.checksum(t) for t in payload]
        if self._faults is not None:
            if self._faults.drop():
                return
            payload = self._faults.mangle(payload)
        extra, frames = self._path.export(tid, payload, peer=identity)
        head.update(extra)
        msg = [data_id or identity, b"DATA", _message(head), *frames]
        sock = self._sock if data_id is None else self._data
        if self._faults is not None and self._faults.spec.delay_s > 0:
            self._delayed.append((now + self._faults.spec.delay_s, tid, msg, extra, bool(frames), sock))
            return
        self._emit(tid, msg, extra, bool(frames), sock)

    def _emit(self, tid: str, msg: list, extra: dict, has_frames: bool, sock: zmq.Socket | None = None) -> None:
        """Send a DATA message; its staging buffer stays lent while zmq or the path reads it."""
        tracker = _send(sock or self._sock, msg, track=has_frames)
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
        for _, tid, msg, extra, has_frames, sock in due:
            try:
                self._emit(tid, msg, extra, has_frames, sock)
            except zmq.ZMQError:   # its data connection went away: the receiver's timeout retries
                pass

    def _forget(self, end: LeaseEnd) -> None:
        tid = end.transfer_id
        if self._shared is not None:   # before the worker can reuse them; a block another live
            # lease still holds (a shared cached prefix) keeps its contents, and its generation
            self._shared.bump([b for b in end.block_ids if not self.leases.holds(b)])
        self._num_tokens.pop(tid, None)
        self._skip.pop(tid, None)
        self._streams.pop(tid, None)
        self._delayed = [d for d in self._delayed if d[1] != tid]
        self._path.release(tid)
        self._staging.give_back(tid)


def _data_id(head: dict) -> bytes | None:
    """The routing id a receiver's data socket announced in its PULL (hex), or None."""
    value = head.get("data_id")
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value) or None
    except ValueError:
        return None
