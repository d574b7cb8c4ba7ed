"""The receiving (decode) side of the KV channel; the protocol is described in `channel`."""
from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import zmq

from engine.block_manager import blocks_needed
from kv_transfer import codec, layout as kvl
from kv_transfer.backends import this_machine
from kv_transfer.base import KVReceiver, TransferError, TransferOffer, TransferResult, TransferStatus
from kv_transfer.curve import ZmqKeys, connect_data, connect_securely
from kv_transfer.data_paths import make_data_path
from kv_transfer.messages import CLOSE_LINGER_MS, header as _message, parse as _parse, send as _send
from kv_transfer.shared_cache import AttachedCaches, copy_block_runs
from kv_transfer.stream import LayerProgress, layer_range, layers_layout, unpack_runs


@dataclass
class _Pull:
    offer: TransferOffer
    dst_block_ids: list[int]
    attempts: int = 1
    sent_at: float = 0.0
    layers: LayerProgress | None = None   # a layer by layer delivery (streamed offers)
    inline: bool = True                   # backend auto: the bytes come in zmq frames (not zero copy)
    skip: int = 0                         # the first `skip` tokens' KV is here already: not pulled

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV this pull moves: the offer's, past the ones skipped."""
        return self.offer.num_tokens - self.skip

    def dst_ids(self, block_size: int) -> list[int]:
        """The destination blocks the moved tokens land in (`skip` is whole blocks of them)."""
        return self.dst_block_ids[self.skip // block_size:]

    def src_ids(self, block_ids: list[int]) -> list[int]:
        """The sender's blocks that hold the moved tokens (`skip` is whole blocks of them too)."""
        return block_ids[self.skip // self.offer.layout.block_size:]


# how many dead senders a receiver remembers, to refuse their offers that are still on the way
MAX_LOST_ENDPOINTS = 1024


class ChannelReceiver(KVReceiver):
    def __init__(self, cache_data: torch.Tensor, layout: kvl.KVLayout, backend: str = "zmq",
                 max_attempts: int = 3, timeout_s: float = 10.0, clock=time.monotonic,
                 max_endpoints: int = 64, lost_ttl_s: float = 60.0, keys: ZmqKeys | None = None,
                 node: str | None = None) -> None:
        """`max_endpoints`: senders whose socket (and shared cache mapping) are kept; past it
        the least recently used idle one is closed (it is reopened if that sender comes back).
        `lost_ttl_s`: how long a sender declared dead (`fail_endpoint`) has its offers refused:
        longer than any lease lives, short enough that a new sender that happens to bind the
        same port later is not taken for the dead one. `keys`: the cluster's CURVE keys, which
        the senders demand (`kv_transfer.curve`); None: plain zmq. `node`: the node this
        process runs on (a Ray node id; default: this machine): backend `auto` copies zero copy
        from senders on this node and takes the bytes over zmq from any other."""
        if max_endpoints < 1:
            raise TransferError(f"max_endpoints must be >= 1, got {max_endpoints}")
        self.cache_data, self.layout, self.backend = cache_data, layout, backend
        self.max_attempts, self.timeout_s, self._clock = max_attempts, timeout_s, clock
        self.max_endpoints, self.lost_ttl_s, self._keys = max_endpoints, lost_ttl_s, keys
        self.node = node or this_machine()
        self._path = make_data_path(backend, f"pdkv-{os.getpid()}-recv", device=cache_data.device)
        self._ctx = zmq.Context()
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()   # least recently used first
        # with keys: endpoint -> (a socket to its sender's data socket, the random id it goes by)
        self._data: dict[str, tuple[zmq.Socket, bytes]] = {}
        self._pending: dict[str, _Pull] = {}
        self._direct: list[str] = []   # zero copy offers the next poll copies without a PULL
        self._attached = AttachedCaches(max_endpoints)
        self._segments: dict[str, set[str]] = {}   # endpoint -> names of its shared caches we mapped
        self._lost: OrderedDict[str, tuple[float, str]] = OrderedDict()   # dead endpoint -> (when, why)
        self._failed: list[TransferResult] = []    # failed by fail_endpoint, reported by the next poll

    def pull(self, offer: TransferOffer, dst_block_ids: Sequence[int], skip_tokens: int = 0) -> None:
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
        check_skip(skip_tokens, offer, self.layout)
        lost = self._lost_reason(offer.endpoint)
        if lost is not None:
            raise TransferError(f"sender {offer.endpoint} is gone: {lost}")
        self._socket(offer.endpoint)   # a bad endpoint fails here, before anything is pending
        local = self.backend == "shm" or (self.backend == "auto" and offer.node == self.node and offer.node != "")
        if not local and offer.data_endpoint and self._keys is not None:
            self._data_id(offer)   # ... and so does a bad data endpoint
        pull = _Pull(offer, ids, inline=not local, skip=skip_tokens)
        self._pending[offer.transfer_id] = pull
        if offer.zero_copy is not None and not offer.streamed and local:
            pull.sent_at = self._clock()
            self._direct.append(offer.transfer_id)
        else:
            self._request(pull)

    def poll(self) -> list[TransferResult]:
        results, self._failed = self._failed, []
        direct, self._direct = self._direct, []
        for tid in direct:   # the offer named the blocks: copy them, no round trip first
            pull = self._pending.get(tid)
            if pull is not None and pull.attempts == 1:   # (not aborted meanwhile)
                result = self._deliver(pull, {"zero_copy": pull.offer.zero_copy}, [])
                if result is not None:
                    results.append(result)
        for sock in [*self._socks.values(), *(d[0] for d in self._data.values())]:
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
        when bytes also arrive another way (a deferred data path) or a direct copy is due."""
        return None if self._path.deferred or self._direct else self._all_sockets()

    def wait(self, timeout_s: float) -> None:
        """Block until a sender's message may be waiting, or `timeout_s` passed: a step
        loop with nothing else to do sleeps here instead of spinning on `poll`."""
        if self._direct:
            return   # the next poll has a copy to do
        poller = zmq.Poller()
        for sock in self._all_sockets():
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
        for sock, _ in self._data.values():
            sock.close(linger=0)
        self._ctx.term()

    def abort_offer(self, offer: TransferOffer) -> None:
        """Give an offer up without pulling it (its pull could not start): the sender frees
        its blocks now rather than at the lease's expiry. Best effort, never raises."""
        if offer.transfer_id in self._pending:
            self.abort(offer.transfer_id)
            return
        if self._lost_reason(offer.endpoint) is not None:
            return   # nobody there to tell
        try:
            self._control(offer.endpoint, b"ABORT", {"transfer_id": offer.transfer_id})
        except (TransferError, TypeError, ValueError):
            pass   # an endpoint we cannot reach: the lease expires there

    def fail_endpoint(self, endpoint: str, reason: str) -> None:
        """Its sender died: its pulls end FAILED at the next poll (no ACK: nobody would read
        it), its socket closes, its shared caches are unmapped, and its offers still on their
        way are refused for `lost_ttl_s`."""
        self._lost.pop(endpoint, None)
        self._lost[endpoint] = (self._clock(), reason)
        while len(self._lost) > MAX_LOST_ENDPOINTS:
            self._lost.popitem(last=False)
        for pull in [p for p in self._pending.values() if p.offer.endpoint == endpoint]:
            self._failed.append(self._finish(pull, False, reason, ack=False))
        sock = self._socks.pop(endpoint, None)
        if sock is not None:
            sock.close(linger=0)   # what is queued on it can reach no one
        self._close_data(endpoint)
        for name in self._segments.pop(endpoint, ()):
            self._attached.release(name)

    # -- internals ------------------------------------------------------------
    def _lost_reason(self, endpoint: str) -> str | None:
        """Why `endpoint`'s sender is known dead, or None (dead ones are forgotten after lost_ttl_s)."""
        now = self._clock()
        while self._lost and now - next(iter(self._lost.values()))[0] > self.lost_ttl_s:
            self._lost.popitem(last=False)
        lost = self._lost.get(endpoint)
        return None if lost is None else lost[1]

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._socks.get(endpoint)
        if sock is not None:
            self._socks.move_to_end(endpoint)
            self._evict_sockets(0, keep=endpoint)   # back under the bound once pulls ended
        else:
            self._evict_sockets(1)
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            connect_securely(sock, self._keys)
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
            self._close_data(endpoint)

    def _all_sockets(self) -> list:
        return [*self._socks.values(), *(d[0] for d in self._data.values())]

    def _data_id(self, offer: TransferOffer) -> bytes:
        """The id this receiver's data socket to the offer's sender goes by (connected on first use:
        members only, `kv_transfer.curve`); the sender sends inline bytes to it alone."""
        data = self._data.get(offer.endpoint)
        if data is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            data_id = os.urandom(16)   # named to the sender over the CURVE socket only
            sock.routing_id = data_id
            sock.probe_router = 1      # an empty message on connect: the sender knows it is up
            connect_data(sock, self._keys)
            try:
                sock.connect(offer.data_endpoint)
            except zmq.ZMQError as e:
                sock.close(0)
                raise TransferError(f"cannot connect to sender data endpoint {offer.data_endpoint!r}: {e}") from None
            data = self._data[offer.endpoint] = (sock, data_id)
        return data[1]

    def _close_data(self, endpoint: str) -> None:
        data = self._data.pop(endpoint, None)
        if data is not None:
            data[0].close(linger=0)

    def _control(self, endpoint: str, kind: bytes, head: dict) -> None:
        _send(self._socket(endpoint), [kind, _message(head)])

    def _request(self, pull: _Pull) -> None:
        pull.sent_at = self._clock()
        pull.layers = None   # a new attempt gets every layer again
        head = {"transfer_id": pull.offer.transfer_id, "attempt": pull.attempts}
        if pull.skip:
            head["skip"] = pull.skip
        if self.backend == "auto":
            head["inline"] = pull.inline
        if pull.inline and pull.offer.data_endpoint and self._keys is not None:
            head["data_id"] = self._data_id(pull.offer).hex()
        self._control(pull.offer.endpoint, b"PULL", head)

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
                nbytes = len(layers) * pull.num_tokens * pull.offer.layout.bytes_per_token // num_layers
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
            expected = pull.offer.layout.wire_shape(pull.num_tokens)
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
            src, dst_ids = pull.offer.layout, pull.dst_ids(self.layout.block_size)
            if _same_shard(src, self.layout) and wire.is_contiguous():   # whole blocks, in runs
                layers = layers or range(src.local_layers)
                unpack_runs(wire, self.cache_data[layers.start:layers.stop], dst_ids)
            else:
                if layers is not None:
                    src = layers_layout(src, layers.start, layers.stop)
                kvl.unpack_into(self.cache_data, self.layout, dst_ids, wire, src)
            return sum(codec.wire_nbytes(t) for t in payload)
        finally:
            payload = wire = None   # views of a shared segment must go before it is unmapped
            self._path.close_import(tid, head.get("attempt"))

    def _copy_in_place(self, pull: _Pull, zc: dict, layers: range | None = None) -> None:
        """Copy the leased blocks (of local `layers` only, when streaming) straight out of the
        sender's shared cache, then check that their lease held throughout (generations unchanged)."""
        src_layout, n = pull.offer.layout, pull.num_tokens
        src, generations = self._attached.view(zc["name"], zc["shape"], zc["dtype"])
        self._segments.setdefault(pull.offer.endpoint, set()).add(zc["name"])   # unmapped if it dies
        layers = range(src_layout.local_layers) if layers is None else layers
        src_ids, dst_ids = pull.src_ids(list(zc["block_ids"])), pull.dst_ids(self.layout.block_size)
        if _same_shard(src_layout, self.layout):
            num_blocks = blocks_needed(n, src_layout.block_size)
            copy_block_runs(src[layers.start:layers.stop], src_ids[:num_blocks],
                            self.cache_data[layers.start:layers.stop], dst_ids[:num_blocks])
        elif len(layers) == src_layout.local_layers:
            wire = kvl.pack(src, src_layout, src_ids, n)
            kvl.unpack_into(self.cache_data, self.layout, dst_ids, wire, src_layout)
        else:
            for layer in layers:
                wire = kvl.pack_layer(src, src_layout, layer, src_ids, n)
                kvl.unpack_layer_into(self.cache_data, self.layout, dst_ids, wire, src_layout,
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
            nbytes = pull.num_tokens * pull.offer.layout.bytes_per_token if ok else 0
        status = TransferStatus.DONE if ok else TransferStatus.FAILED
        via = self.backend if self.backend != "auto" else ("zmq" if pull.inline else "shm")
        return TransferResult(tid, pull.offer.req_id, status, error, nbytes, pull.attempts, via)

    def _timeouts(self) -> list[TransferResult]:
        now = self._clock()
        results = []
        for pull in [p for p in self._pending.values() if now - p.sent_at > self.timeout_s]:
            result = self._retry_or_fail(pull, f"no answer within {self.timeout_s}s")
            if result is not None:
                results.append(result)
        return results


def check_skip(skip_tokens: int, offer: TransferOffer, dst: kvl.KVLayout) -> None:
    """A pull may skip a prefix of the offer's tokens that the receiver holds already: whole
    blocks on both sides (a multiple of both block sizes), and never the whole prompt."""
    if type(skip_tokens) is not int or not 0 <= skip_tokens < max(offer.num_tokens, 1):
        raise TransferError(f"skip_tokens must be an int in [0, {offer.num_tokens}), got {skip_tokens!r}")
    step = math.lcm(offer.layout.block_size, dst.block_size)
    if skip_tokens % step:
        raise TransferError(f"skip_tokens={skip_tokens} must be whole blocks on both sides (a multiple of "
                            f"{step}: blocks of {offer.layout.block_size} there, {dst.block_size} here)")


def _same_shard(a: kvl.KVLayout, b: kvl.KVLayout) -> bool:
    """Same layers, heads and block size: blocks can be copied whole."""
    return (a.layer_start, a.layer_end, a.head_start, a.head_end, a.block_size) == \
        (b.layer_start, b.layer_end, b.head_start, b.head_end, b.block_size)
