"""Real processes for transfer tests: sender (prefill rank) children and receivers here.

A sender session owns a KV cache filled deterministically from a seed, a
BlockManager and a sender made by `make_sender`; it allocates blocks for each
offer, frees them on every LeaseEnd, and reports offers, lease ends and, when
stopped, its block count and what `close()` left open (file descriptors,
threads) through queues. The test process owns the receivers
(`make_receiver`), their caches and their BlockManagers. Backend `ray` needs
this process connected to a Ray cluster (the contract suite's `ray_cluster`
fixture); the session joins the same one.

Sessions run in spawned child processes that are kept for the next session:
starting one (Python, torch) costs ~3 s of the 2-core machine, more than most
tests. A child that misbehaves is killed, never reused. Everything is bounded
in time and binds 127.0.0.1 only.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from kv_transfer import make_receiver, make_sender
from kv_transfer.base import KVReceiver, TransferOffer, TransferResult, TransferStatus
from kv_transfer.faults import FaultSpec
from kv_transfer.layout import KVLayout
from kv_transfer.lease import LeaseEnd
from kv_transfer.shared_cache import SharedKVCache

CHILD_MAX_SECONDS = 240.0
ZERO_COPY = "shm-zero-copy"   # backend shm, sender cache in shared memory, no checksum
# backend auto, sender cache in shared memory, no checksum; the two sides tell it they are on one
# node (it copies zero copy) or on two (the bytes go inline over zmq)
AUTO_ONE_NODE, AUTO_TWO_NODES = "auto-one-node", "auto-two-nodes"
CURVE = "zmq-curve"           # backend zmq, both sides holding the cluster's CURVE keys
SHARED = (ZERO_COPY, AUTO_ONE_NODE, AUTO_TWO_NODES)   # the sender's cache is in shared memory


def make_layout(num_layers=3, kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16") -> KVLayout:
    return KVLayout(num_layers=num_layers, layer_start=0, layer_end=num_layers, num_kv_heads=kv_heads,
                    head_start=0, head_end=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype)


def make_cache(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.cache_shape(num_blocks), generator=g).to(layout.torch_dtype)


def sequence_kv(cache: torch.Tensor, layout: KVLayout, block_ids, num_tokens: int) -> torch.Tensor:
    """A sequence's KV read token by token through its block table: [layers, 2, tokens, heads, dim]."""
    bs = layout.block_size
    rows = [cache[:, :, block_ids[t // bs], t % bs] for t in range(num_tokens)]
    return torch.stack(rows, dim=2)


def real_backend(backend: str) -> str:
    return {ZERO_COPY: "shm", AUTO_ONE_NODE: "auto", AUTO_TWO_NODES: "auto", CURVE: "zmq"}.get(backend, backend)


_keys = None


def variant_kwargs(backend: str) -> tuple[dict, dict]:
    """What a variant adds to the sender's and the receiver's arguments."""
    global _keys
    if backend == CURVE:
        from kv_transfer.curve import ZmqKeys
        _keys = _keys or ZmqKeys.generate()
        return {"keys": _keys}, {"keys": _keys}
    if backend in (AUTO_ONE_NODE, AUTO_TWO_NODES):
        return {"node": "node-a"}, {"node": "node-a" if backend == AUTO_ONE_NODE else "node-b"}
    return {}, {}


RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def ray_connection() -> tuple[str, dict]:
    """The address of the Ray cluster this process is connected to and the environment a
    child needs to join it (token auth; loopback kept as loopback). A child may have been
    started before that environment was set, so it is handed over explicitly."""
    import ray
    if not ray.is_initialized():
        raise RuntimeError("backend 'ray' needs this process connected to Ray (the ray_cluster fixture)")
    return ray.get_runtime_context().gcs_address, {k: os.environ[k] for k in RAY_ENV if k in os.environ}


def _join_ray(address: str, env: dict) -> None:
    os.environ.update(env)   # before ray is first imported here: it reads these at import
    import ray
    from ray._private import ray_constants
    # Ray swaps a loopback address for the external one unless clusters are "off" (conftest.py).
    ray_constants.ENABLE_RAY_CLUSTER = env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)


def _child_main(cmd_q, out_q) -> None:
    """Serve sender sessions one after another until told to exit (or idle too long)."""
    torch.set_num_threads(1)
    # pyzmq starts a thread (and sockets) for its first zero-copy send and keeps it for the
    # process's life: start it now, so that no session is charged for it
    from zmq.utils.garbage import gc as zmq_gc
    zmq_gc.start()
    zmq_gc._push_socket   # noqa: B018 -- made on the first freed message otherwise
    held = None   # (fds, threads) after the last session: what the next one must come back to
    seen: set[str] = set()
    while True:
        try:
            cmd = cmd_q.get(timeout=CHILD_MAX_SECONDS)
        except queue.Empty:
            return
        if cmd[0] == "exit":
            return
        if cmd[0] == "session":   # (a late "stop" for a session that timed out is ignored)
            backend = cmd[1]
            held = _session(cmd_q, out_q, held if backend in seen else None, *cmd[1:])
            seen.add(backend)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_threads(baseline: int, timeout_s: float = 2.0) -> int:
    """Threads alive once those that are ending have ended (a closed group's waiters)."""
    stop_at = time.monotonic() + timeout_s
    while threading.active_count() > baseline and time.monotonic() < stop_at:
        time.sleep(0.01)
    return threading.active_count()


def _session(cmd_q, out_q, held, backend, layout, num_blocks, seed, sender_kwargs, ray_at):
    """One sender's life. Returns (fds, threads) after it, once it left nothing open. What
    close() left is counted against the previous session's end, and not for the first
    session of a backend in this process: first uses start things that stay for the
    process's life (the queue's feeder thread, gloo's and zmq's globals)."""
    if ray_at is not None:
        _join_ray(*ray_at)
    shared = None
    if backend in SHARED:   # the cache in shared memory, read in place by the receiver
        shared = SharedKVCache(layout.cache_shape(num_blocks), layout.torch_dtype)
        shared.tensor.copy_(make_cache(layout, num_blocks, seed))
        cache = shared.tensor
        sender_kwargs = {"checksum": False, "shared_cache": shared, **sender_kwargs}
    else:
        cache = make_cache(layout, num_blocks, seed)
    blocks = BlockManager(num_blocks, layout.block_size)
    sender = make_sender(real_backend(backend), cache, layout, **sender_kwargs)
    out_q.put(("endpoint", sender.endpoint))
    stop_at = time.monotonic() + CHILD_MAX_SECONDS
    try:
        while time.monotonic() < stop_at:
            try:
                cmd = cmd_q.get(timeout=0.001)
            except queue.Empty:
                cmd = None
            if cmd is not None and cmd[0] == "stop":
                break
            now = time.monotonic()
            try:
                _command(cmd, sender, blocks, out_q, now)
            except Exception as e:   # the test hears of it; the session goes on to its leak checks
                out_q.put(("error", f"{type(e).__name__}: {e}"))
            for end in sender.poll(now):
                blocks.free(end.block_ids)
                out_q.put(("end", end))
    finally:
        final = (blocks.num_free_blocks, blocks.num_blocks, sender.leases.live())
        sender.close()
        sender = blocks = None
        if shared is not None:
            cache = None
            shared.close()
        left, now_held = None, None
        if ray_at is not None:
            import ray
            ray.shutdown()   # Ray keeps some of its own open after shutdown: not ours to count
        elif held is None:
            threads = _settled_threads(threading.active_count())
            now_held = (_open_fds(), threads)
        else:
            threads = _settled_threads(held[1])   # first: an ending thread may hold fds
            now_held = (_open_fds(), threads)
            left = {"fds": now_held[0] - held[0], "threads": now_held[1] - held[1]}
        out_q.put(("final", *final, left))
    return now_held if left is None or left == {"fds": 0, "threads": 0} else None


def _command(cmd, sender, blocks: BlockManager, out_q, now: float) -> None:
    if cmd is None:
        return
    if cmd[0] == "offer":
        _, req_id, num_tokens, ttl, uses, stream = cmd
        if not blocks.can_allocate(num_tokens):
            out_q.put(("full", req_id))
            return
        ids = blocks.allocate(num_tokens)
        for _ in range(uses - 1):   # one reference per lease that will hold these blocks
            blocks.share(ids)
        try:
            offer = sender.offer(req_id, ids, num_tokens, now, ttl, stream=stream)
        except BaseException:
            blocks.free(ids)
            raise
        out_q.put(("offer", offer, ids))
    elif cmd[0] == "layers":   # a streamed prefill computed layers [0, n) of these transfers
        sender.layers_ready(cmd[1], cmd[2], now)
    elif cmd[0] == "reoffer":   # a further lease on blocks a reference still holds
        _, req_id, ids, num_tokens, ttl = cmd
        out_q.put(("offer", sender.offer(req_id, ids, num_tokens, now, ttl), ids))
    elif cmd[0] == "abort":
        end = sender.abort(cmd[1], now)
        if end is not None:
            blocks.free(end.block_ids)
            out_q.put(("end", end))


class _Child:
    """A spawned process that hosts sender sessions."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.cmd_q, self.out_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_child_main, args=(self.cmd_q, self.out_q), daemon=True)
        self.proc.start()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.cmd_q.put(("exit",))
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=10)


_idle_children: list[_Child] = []


@atexit.register
def stop_children() -> None:
    while _idle_children:
        _idle_children.pop().stop()


class SenderChild:
    """One sender (a prefill rank) in a child process, driven through queues."""

    def __init__(self, backend: str, layout: KVLayout, num_blocks: int = 256, seed: int = 0,
                 sender_kwargs: dict | None = None) -> None:
        self.backend, self.layout, self.num_blocks = backend, layout, num_blocks
        ray_at = ray_connection() if backend == "ray" else None
        while _idle_children and not _idle_children[-1].proc.is_alive():
            _idle_children.pop()
        self._child = _idle_children.pop() if _idle_children else _Child()
        self.cmd_q, self.out_q, self.proc = self._child.cmd_q, self._child.out_q, self._child.proc
        sender_kwargs = {**variant_kwargs(backend)[0], **(sender_kwargs or {})}
        self.cmd_q.put(("session", backend, layout, num_blocks, seed, sender_kwargs, ray_at))
        try:
            kind, self.endpoint = self.out_q.get(timeout=120)
        except BaseException:
            self._child.stop()
            raise
        assert kind == "endpoint" and self.endpoint.startswith("tcp://127.0.0.1:")
        self.cache = make_cache(layout, num_blocks, seed)   # the child's, rebuilt
        self.ends: dict[str, LeaseEnd] = {}
        self._final = None

    def offer(self, req_id: str, num_tokens: int, ttl_s: float | None = None,
              uses: int = 1, stream: bool = False) -> tuple[TransferOffer, list[int]]:
        """Allocate blocks for a request and offer them. `uses` > 1 keeps that many references,
        for as many leases over them (`reoffer`), one after another: a lease holds its blocks
        alone, so a prefill rank feeding several decode ranks offers to one at a time.
        `stream`: offered before its layers are ready (`layers_ready` releases them)."""
        self.cmd_q.put(("offer", req_id, num_tokens, ttl_s, uses, stream))
        event = self._wait_for("offer")
        return event[1], event[2]

    def layers_ready(self, transfer_ids: list[str], num_layers: int | None) -> None:
        self.cmd_q.put(("layers", list(transfer_ids), num_layers))

    def reoffer(self, req_id: str, ids: list[int], num_tokens: int, ttl_s: float | None = None) -> TransferOffer:
        self.cmd_q.put(("reoffer", req_id, ids, num_tokens, ttl_s))
        return self._wait_for("offer")[1]

    def abort(self, transfer_id: str) -> None:
        self.cmd_q.put(("abort", transfer_id))

    def _wait_for(self, kind: str):
        while True:
            event = self.next_event(timeout=30)
            if event[0] == kind:
                return event
            if event[0] in ("full", "error"):
                raise RuntimeError(f"sender session: {event}")
            if event[0] == "final":
                raise RuntimeError("sender session ended")

    def next_event(self, timeout: float):
        event = self.out_q.get(timeout=timeout)
        if event[0] == "end":
            self.ends[event[1].transfer_id] = event[1]
        elif event[0] == "final":
            self._final = event
        return event

    def pump(self, timeout: float = 0.002) -> None:
        try:
            self.next_event(timeout)
        except queue.Empty:
            pass

    def sent(self, offer: TransferOffer, src_ids) -> torch.Tensor:
        return sequence_kv(self.cache, self.layout, src_ids, offer.num_tokens)

    def close(self) -> tuple[int, int, int]:
        """End the session; returns the sender's (free blocks, total blocks, live leases).
        `self.left_open`: file descriptors and threads its close() left behind (None: not counted)."""
        self.cmd_q.put(("stop",))
        try:
            while self._final is None:
                self.next_event(timeout=60)
        except BaseException:
            self._child.stop()
            raise
        _idle_children.append(self._child)
        event = self._final
        self.left_open = event[4]
        return event[1], event[2], event[3]


_receiver_backends_used: set[str] = set()


@dataclass
class Receiver:
    """A receiver (a decode rank) here: its cache, blocks and results."""

    backend: str
    layout: KVLayout
    num_blocks: int = 256
    receiver_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = torch.zeros(self.layout.cache_shape(self.num_blocks), dtype=self.layout.torch_dtype)
        self.blocks = BlockManager(self.num_blocks, self.layout.block_size)
        # Counted as in the child: not on a backend's first use here, nor for Ray's connections.
        counted = self.backend != "ray" and self.backend in _receiver_backends_used
        _receiver_backends_used.add(self.backend)
        self._held = (_open_fds(), threading.active_count()) if counted else None
        self.receiver: KVReceiver = make_receiver(real_backend(self.backend), self.cache, self.layout,
                                                  **{**variant_kwargs(self.backend)[1], **self.receiver_kwargs})
        self.results: dict[str, TransferResult] = {}
        self.left_open: dict | None = None

    def close(self) -> None:
        self.receiver.close()

    def count_left_open(self) -> None:
        """`left_open`: the file descriptors and threads this process gained since the receiver
        was made (None: not counted). Call once every receiver made since is closed too."""
        if self._held is not None:
            threads = _settled_threads(self._held[1])
            # Only growth counts: other things in this process (a child's pipes) may close meanwhile.
            self.left_open = {"fds": max(0, _open_fds() - self._held[0]), "threads": max(0, threads - self._held[1])}

    def poll(self) -> None:
        for r in self.receiver.poll():
            self.results[r.transfer_id] = r

    def received(self, num_tokens: int, dst_ids) -> torch.Tensor:
        return sequence_kv(self.cache, self.layout, dst_ids, num_tokens)


def drive(receivers, senders, until, timeout_s: float = 30.0) -> None:
    """Poll every receiver and pump every sender child until `until()` is true (bounded)."""
    stop_at = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > stop_at:
            raise TimeoutError(f"not done after {timeout_s}s: {[len(r.results) for r in receivers]} results, "
                               f"{[len(s.ends) for s in senders]} ends")
        for r in receivers:
            r.poll()
        for s in senders:
            s.pump(timeout=0.002 / len(senders))


@dataclass
class Pair:
    """A sender child and a receiver here, wired up."""

    backend: str
    layout: KVLayout
    dst_layout: KVLayout
    num_blocks: int = 256
    seed: int = 0
    sender_kwargs: dict = field(default_factory=dict)
    receiver_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sender = SenderChild(self.backend, self.layout, self.num_blocks, self.seed, self.sender_kwargs)
        self.dst = Receiver(self.backend, self.dst_layout, self.num_blocks, self.receiver_kwargs)
        self.src_cache, self.dst_cache, self.dst_blocks = self.sender.cache, self.dst.cache, self.dst.blocks
        self.receiver, self.ends, self.results = self.dst.receiver, self.sender.ends, self.dst.results

    def offer(self, req_id: str, num_tokens: int, ttl_s: float | None = None,
              stream: bool = False) -> tuple[TransferOffer, list[int]]:
        return self.sender.offer(req_id, num_tokens, ttl_s, stream=stream)

    def pull(self, offer: TransferOffer, skip_tokens: int = 0) -> list[int]:
        ids = self.dst_blocks.allocate(offer.num_tokens)
        self.receiver.pull(offer, ids, skip_tokens)
        return ids

    def drive(self, until, timeout_s: float = 30.0) -> None:
        """Poll both sides until `until()` is true (bounded)."""
        drive([self.dst], [self.sender], until, timeout_s)

    def received(self, offer: TransferOffer, dst_ids) -> torch.Tensor:
        return self.dst.received(offer.num_tokens, dst_ids)

    def sent(self, offer: TransferOffer, src_ids) -> torch.Tensor:
        return self.sender.sent(offer, src_ids)

    def finish_request(self, offer: TransferOffer, dst_ids) -> None:
        """The decode side is done with a request (or its transfer failed): free its blocks."""
        self.dst_blocks.free(dst_ids)

    def close(self) -> tuple[int, int, int]:
        """Stop the child's session; returns its (free blocks, total blocks, live leases)."""
        self.dst.close()
        self.dst.count_left_open()
        return self.sender.close()


def ok(result: TransferResult) -> bool:
    return result.status is TransferStatus.DONE


FAULTS_NONE = FaultSpec()
