"""The transfer interface between a prefill worker (sender) and a decode worker (receiver).

Life of one transfer:
  1. Handshake: the sender's `endpoint` (a plain string) reaches the decode
     side through the router together with each offer.
  2. Prefill ends: `sender.offer(req_id, block_ids, num_tokens, now)` puts the
     request's blocks under a lease and returns a `TransferOffer` (plain data).
  3. The decode worker allocates blocks and calls
     `receiver.pull(offer, dst_block_ids)`; it returns at once. With
     `skip_tokens` it pulls only the KV past a prefix it holds already (its
     prefix cache): those tokens' blocks are whole on both sides, the first
     of `dst_block_ids` hold them and are left as they are.
  4. Both sides call `poll` from their step loops: the receiver's returns
     finished `TransferResult`s (KV now in its blocks, or failed); the
     sender's returns `LeaseEnd`s whose blocks it must free now.
  Layer-wise streaming: `offer(..., stream=True)` before the prefill runs, then
     `sender.layers_ready(ids, n, now)` from the model's per-layer hook; a
     receiver that pulled early lands each layer as it comes.
  5. A lease ends exactly once: the receiver acknowledged (DONE), reported a
     failure (FAILED), either side aborted (ABORTED), or it expired (EXPIRED).
  A sender's process may die with pulls under way: told so (`fail_endpoint`,
     from whoever watches processes), the receiver fails them at once instead
     of waiting out its timeouts, and lets go of everything it holds of that
     sender (its socket, a mapping of its shared cache).

Neither `poll` blocks; `close` releases sockets and shared memory.
"""
from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from kv_transfer.layout import KVLayout
from kv_transfer.lease import LeaseEnd


class TransferError(Exception):
    """A transfer could not be set up (bad offer, unknown backend, closed channel)."""


@dataclass(frozen=True)
class TransferOffer:
    """What the decode side needs to pull one request's KV from one source rank."""

    transfer_id: str
    req_id: str
    num_tokens: int
    layout: KVLayout      # the source rank's share of the model (layers x heads)
    endpoint: str         # the sender's control address (handshake)
    backend: str
    streamed: bool = False   # offered before prefill ran: layers arrive as they are computed
    # shm zero copy, not streamed: what to copy (shared cache name, shape, dtype, block ids,
    # generations), so the receiver copies without asking first; plain dict/list/int/str
    zero_copy: dict | None = field(default=None, hash=False)
    # backend auto: the node whose shared memory holds the sender's cache ("" when it is not
    # shared): a receiver on that node copies zero copy, any other takes the bytes over zmq
    node: str = ""
    # with the cluster's keys: where inline bytes come from (kv_transfer.curve); "": the control socket
    data_endpoint: str = ""


class TransferStatus(enum.Enum):
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    req_id: str
    status: TransferStatus
    error: str | None = None
    nbytes: int = 0       # bytes that crossed the wire
    attempts: int = 1     # > 1 when a corrupted transfer was retried
    via: str = ""         # how the bytes came: shm (a segment or zero copy), zmq, torch_dist, ray


class StepLoopWaits:
    """How a worker's step loop sleeps on a transfer side instead of spinning."""

    def wait_sockets(self) -> list | None:
        """zmq sockets a step loop may sleep on (with its own, in one zmq.Poller) until this
        side has work; None: work can also come another way, so the loop must not sleep
        past its next wake-up time."""
        return None

    def wait(self, timeout_s: float) -> None:
        """Block until this side may have work or `timeout_s` passed: a loop with nothing else
        to do sleeps here rather than spinning on `poll` (on 2 shared cores, a spinning
        loop takes the core the other side needs)."""
        time.sleep(timeout_s)


class KVSender(StepLoopWaits, ABC):
    """Prefill side: offers blocks under leases and serves pulls from its step loop."""

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    supports_streaming: bool = False   # whether offer(stream=True) / layers_ready work

    @abstractmethod
    def offer(self, req_id: str, block_ids: Sequence[int], num_tokens: int, now: float,
              ttl_s: float | None = None, stream: bool = False) -> TransferOffer: ...

    def layers_ready(self, transfer_ids: Sequence[str], num_layers: int | None, now: float) -> None:
        """Local layers [0, num_layers) of these streamed transfers hold their KV (None: all)."""
        raise TransferError(f"{type(self).__name__} does not stream layers")

    def serve(self, now: float) -> None:
        """Answer pulls that came meanwhile, from inside a forward pass (the model's
        per-layer hook), so a decode worker does not wait for the whole batch to end.
        Leases that end here are reported by the next `poll`."""

    @abstractmethod
    def poll(self, now: float) -> list[LeaseEnd]: ...

    @abstractmethod
    def abort(self, transfer_id: str, now: float) -> LeaseEnd | None: ...

    @abstractmethod
    def close(self) -> None: ...


class KVReceiver(StepLoopWaits, ABC):
    """Decode side: pulls offered KV into blocks it has allocated."""

    @abstractmethod
    def pull(self, offer: TransferOffer, dst_block_ids: Sequence[int], skip_tokens: int = 0) -> None:
        """Start pulling the offer's KV into `dst_block_ids`, past its first `skip_tokens`
        (a multiple of both sides' block sizes, short of the prompt's end); TransferError
        when it cannot start."""

    @abstractmethod
    def poll(self) -> list[TransferResult]: ...

    @abstractmethod
    def abort(self, transfer_id: str) -> None: ...

    def abort_offer(self, offer: TransferOffer) -> None:
        """Give up an offer whose pull could not start, so its sender frees the blocks now."""

    @abstractmethod
    def fail_endpoint(self, endpoint: str, reason: str) -> None:
        """The sender at `endpoint` is gone (its process died): every pending pull from it ends
        FAILED (`reason`) at the next `poll`, nothing more is sent to it, and what this side
        holds of it is released (a dead process's shared memory is freed only once every
        mapping of it is gone). A later `pull` of one of its offers raises TransferError."""

    @abstractmethod
    def close(self) -> None: ...
