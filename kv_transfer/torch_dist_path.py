"""Data path `torch_dist`: the KV bytes over torch.distributed point-to-point.

Prefill and decode instances come and go, so there is no global process group.
Each sender hosts a `TCPStore` (on its channel host, a free port) and makes one
2-rank group per receiver (sender rank 0, receiver rank 1) the first time it
serves that receiver; the DATA header names the store and the group's key, and
the receiver joins on reading it. gloo carries CPU tensors, NCCL CUDA ones:
the device of the sender's cache decides, and the header tells the receiver.
Groups are built in background threads, so neither step loop waits for the
rendezvous; sends and receives queue until their group is up. The process
group constructor cannot be interrupted, so each side first marks itself
present in the store and waits (cancellably) for the other: a receiver that
never joins costs the sender a waiting thread, not one stuck until timeout
after `close()`.

Every send is matched by exactly one receive: the sender posts its sends only
once their DATA header went out, and the receiver posts receives for every
DATA header it reads, stale ones included (their bytes are dropped). So no
operation on a healthy pair waits forever, and NCCL, which matches in order
rather than by tag, sees both sides post in the same order (the headers travel
in order on one zmq connection).

gloo's send/recv Work never turns `is_completed()` until someone calls
`wait()` on it, so each gloo operation is waited on by a short daemon thread
and the step loop reads its flag. gloo has no way to cancel one operation: a
wait that times out closes the whole pair. `_Group.close` uses exactly that
(a dummy receive waited on for 1 ms): every pending operation on both sides
then ends with an error, and the next transfer builds a new group.
"""
from __future__ import annotations

import datetime
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kv_transfer.base import TransferError
from kv_transfer.data_path import WIRE_DTYPES, DataPath, describe
from kv_transfer.staging import StagingPool

GROUP_TIMEOUT_S = 30.0    # rendezvous, and the longest any one send/recv may take
STORE_CONNECT_S = 5.0     # a receiver reaching a sender's store (on a live sender: instant)
IDLE_CLOSE_S = 300.0      # a sender closes a group that moved nothing for this long
_MAX_TAG = 2**31 - 1      # tags are C ints
_ABORT_TAG = _MAX_TAG     # never a transfer's: a receive on it only ever times out


class _Op:
    """One send or recv: queued until its group is up, then posted; `done` once it
    finished or failed (`error`).

    A gloo op's waiter thread needs the GIL to set its flag once `wait()` returns. A step
    loop that polls without pause holds the GIL, and CPython takes it from such a thread
    only every switch interval (5 ms): the receiver's `arrived` therefore releases it
    while receives are in flight (1 MB transfers: ~11 ms -> ~3 ms here)."""

    def __init__(self, kind: str, tensor: torch.Tensor, tag: int) -> None:
        self.kind, self.tag = kind, tag
        self.tensor = tensor   # [nbytes] uint8; alive while the backend reads or writes it
        self.work = None
        self.error: str | None = None
        self._done = False
        self._polled = False

    def start(self, work, polled: bool) -> None:
        """`polled`: NCCL's Work reports completion itself; gloo's only from `wait()`."""
        self.work, self._polled = work, polled
        if not polled:
            threading.Thread(target=self._wait, daemon=True, name="pdkv-dist-op").start()

    def fail(self, error: str) -> None:
        self.error, self._done = error, True

    def _wait(self) -> None:
        try:
            self.work.wait()
        except Exception as e:   # the peer went away, the group was aborted or timed out
            self.error = f"{type(e).__name__}: {e}"
        self._done = True

    @property
    def done(self) -> bool:
        if self._polled and not self._done:
            try:
                if self.work.is_completed():
                    self.work.wait()   # NCCL: returns at once; raises a failure, orders the stream after
                    self._done = True
            except Exception as e:
                self.fail(f"{type(e).__name__}: {e}")
        return self._done


class _Group:
    """A 2-rank process group between one sender (rank 0) and one receiver (rank 1)."""

    def __init__(self, key: str, rank: int, connect: Callable[[], dist.Store], backend: str,
                 host: str, timeout_s: float, device: torch.device) -> None:
        self.key, self.rank, self.backend, self.host, self.device = key, rank, backend, host, device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.error: str | None = None
        self.last_busy = time.monotonic()
        self._lock = threading.Lock()   # the builder thread hands `_pg` over; close may race it
        self._pg = None
        self._closed = False
        self._queued: list[_Op] = []
        self._inflight: list[_Op] = []
        # Building blocks until the peer joins (and on the receiver side connects to the
        # sender's store): a thread does it while the step loop goes on.
        self._builder = threading.Thread(target=self._build, args=(connect,), daemon=True,
                                         name=f"pdkv-dist-group-{key}")
        self._builder.start()

    def _build(self, connect: Callable[[], dist.Store]) -> None:
        try:
            store = dist.PrefixStore(f"pdkv/{self.key}/", connect())
            if not self._meet(store):
                return
            pg = _nccl_group(store, self.rank, self.timeout, self.device) if self.backend == "nccl" \
                else _gloo_group(store, self.rank, self.host, self.timeout)
        except Exception as e:
            self.error = f"process group {self.key} ({self.backend}) did not come up: {type(e).__name__}: {e}"
            return
        with self._lock:
            self._pg = pg
            closed = self._closed
        if closed:   # closed while it was building
            self._abort_pg()

    def _meet(self, store: dist.Store) -> bool:
        """Wait until the other rank is here too; False if closed meanwhile."""
        store.set(f"pdkv-present-{self.rank}", "1")
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not store.check([f"pdkv-present-{1 - self.rank}"]):
            if self._closed:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {1 - self.rank} did not join within {self.timeout.total_seconds()}s")
            time.sleep(0.005)
        return True

    @property
    def ready(self) -> bool:
        return self._pg is not None and self.error is None and not self._closed

    @property
    def busy(self) -> bool:
        return bool(self._queued or self._inflight)

    def post(self, kind: str, tensor: torch.Tensor, tag: int) -> _Op:
        op = _Op(kind, tensor, tag)
        if self.error is not None or self._closed:
            op.fail(self.error or f"process group {self.key} is closed")
        else:
            self._queued.append(op)
            self.pump()
        return op

    def pump(self) -> None:
        """Post what waits for the group, reap what finished; an operation's failure breaks
        the group (gloo has closed the pair by then)."""
        if self.error is not None and self._queued:
            for op in self._queued:
                op.fail(self.error)
            self._queued = []
        if self.ready and self._queued:
            peer = 1 - self.rank
            for op in self._queued:
                try:
                    work = self._pg.send([op.tensor], peer, op.tag) if op.kind == "send" \
                        else self._pg.recv([op.tensor], peer, op.tag)
                except Exception as e:
                    op.fail(f"{type(e).__name__}: {e}")
                    continue
                op.start(work, polled=self.backend == "nccl")
                self._inflight.append(op)
            self._queued = []
        failed = [op.error for op in self._inflight if op.done and op.error]
        self._inflight = [op for op in self._inflight if not op.done]
        if failed and self.error is None:
            self.error = f"process group {self.key} broke: {failed[0]}"
            self.close(wait=False)
        if self.busy:
            self.last_busy = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self.last_busy

    def close(self, wait: bool = True) -> None:
        """End every pending operation (on both sides) and let the group go. `wait=False`
        (from a step loop) aborts in a thread: gloo's abort takes a millisecond or two."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            built = self._pg is not None
        self.error = self.error or f"process group {self.key} is closed"
        for op in self._queued:
            op.fail(self.error)
        self._queued = []
        if built:
            if wait:
                self._abort_pg()
            else:
                threading.Thread(target=self._abort_pg, daemon=True, name="pdkv-dist-abort").start()

    def _abort_pg(self) -> None:
        with self._lock:
            pg, self._pg = self._pg, None
        if pg is None:
            return
        if self.backend == "nccl":
            pg.abort()
            return
        try:   # see the module docstring: a timed-out wait closes gloo's pair
            pg.recv([torch.empty(1, dtype=torch.uint8)], 1 - self.rank, _ABORT_TAG).wait(
                datetime.timedelta(milliseconds=1))
        except Exception:
            pass


def _gloo_group(store: dist.Store, rank: int, host: str, timeout: datetime.timedelta):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # gloo listens on this address (the default would resolve the hostname: maybe not loopback)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def _nccl_group(store: dist.Store, rank: int, timeout: datetime.timedelta, device: torch.device):
    if not dist.is_nccl_available():
        raise TransferError("the sender's KV is on a GPU (NCCL) but this torch has no NCCL")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
    # NCCL makes its p2p communicator at the first send/recv: do that here, not in a step loop.
    one = torch.zeros(1, dtype=torch.uint8, device=device)
    work = pg.send([one], 1, 0) if rank == 0 else pg.recv([one], 0, 0)
    while not work.is_completed():
        time.sleep(0.001)
    return pg


def _local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (127.0.0.1 for a loopback sender)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))   # UDP: no packet is sent, the kernel only picks a route
        return s.getsockname()[0]


@dataclass
class _Incoming:
    head: dict
    buffer: torch.Tensor          # [total bytes] uint8, every payload tensor back to back
    ops: list[_Op]
    pool_key: str
    wanted: bool = True
    reported: bool = False
    meta: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(op.done for op in self.ops)


class TorchDistPath(DataPath):
    name = "torch_dist"
    deferred = True

    def __init__(self, host: str = "127.0.0.1", device: torch.device | None = None,
                 timeout_s: float = GROUP_TIMEOUT_S, idle_close_s: float = IDLE_CLOSE_S) -> None:
        self.host, self.device = host, torch.device(device) if device is not None else torch.device("cpu")
        self.timeout_s, self.idle_close_s = timeout_s, idle_close_s
        # sender side
        self._store: dist.TCPStore | None = None
        self._groups: dict[bytes, _Group] = {}                        # by receiver (zmq identity)
        self._prepared: dict[tuple[str, int], tuple[_Group, list[torch.Tensor], list[int]]] = {}
        self._sending: dict[str, list[_Op]] = {}
        self._tag = 0
        # receiver side
        self._joined: dict[str, _Group] = {}                          # by sender store address
        self._incoming: list[_Incoming] = []
        self._pool = StagingPool()
        self._seq = 0

    # -- sender -----------------------------------------------------------------
    def export(self, transfer_id: str, tensors: list[torch.Tensor], peer: bytes | None = None) -> tuple[dict, list]:
        if peer is None:
            raise TransferError("torch_dist export needs the receiver's identity (peer)")
        backend = "nccl" if tensors[0].is_cuda else "gloo"
        group = self._group_for(peer, backend, tensors[0].device)
        meta = describe(tensors)
        tags = [self._next_tag() for _ in tensors]
        flat = [t.contiguous().view(torch.uint8).reshape(-1) for t in tensors]   # [nbytes] each
        # Sends wait for `sent`: a header that never goes out (dropped, or its lease ended
        # while a fault delayed it) must leave no send behind that nothing will match.
        self._prepared[(transfer_id, tags[0])] = (group, flat, tags)
        return {"payload": meta, "dist": {"store": self._store_address(), "group": group.key,
                                          "backend": backend, "tags": tags}}, []

    def sent(self, transfer_id: str, extra: dict):
        prepared = self._prepared.pop((transfer_id, extra["dist"]["tags"][0]), None)
        if prepared is None:
            return None
        group, flat, tags = prepared
        ops = self._sending.setdefault(transfer_id, [])
        ops.extend(group.post("send", t, tag) for t, tag in zip(flat, tags) if t.numel())
        return _AllDone(ops)

    def poll(self, now: float) -> None:
        for peer, group in list(self._groups.items()):
            group.pump()
            if group.error is not None or group.idle_for() > self.idle_close_s:
                group.close(wait=False)
                del self._groups[peer]
        for group in self._joined.values():
            group.pump()

    def release(self, transfer_id: str) -> None:
        for key in [k for k in self._prepared if k[0] == transfer_id]:
            del self._prepared[key]   # its header never went out: nothing to match
        self._sending.pop(transfer_id, None)   # running sends finish; the staging pool waits on them

    def _group_for(self, peer: bytes, backend: str, device: torch.device) -> _Group:
        group = self._groups.get(peer)
        if group is not None and group.error is None:
            if group.backend != backend:
                raise TransferError(f"this sender's KV moved from {group.backend} to {backend} tensors")
            return group
        if group is not None:
            group.close()
        store = self._own_store()
        group = _Group(uuid.uuid4().hex[:16], 0, lambda: store, backend, self.host, self.timeout_s, device)
        self._groups[peer] = group
        return group

    def _own_store(self) -> dist.TCPStore:
        if self._store is None:
            # TCPStore would listen on every interface; hand it a socket bound to our host only.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((self.host, 0))
            sock.listen(64)
            port = sock.getsockname()[1]
            self._store = dist.TCPStore(self.host, port, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=self.timeout_s),
                                        master_listen_fd=sock.detach())   # the store closes it
        return self._store

    def _store_address(self) -> str:
        return f"{self.host}:{self._own_store().port}"

    def _next_tag(self) -> int:
        self._tag = self._tag % (_MAX_TAG - 1) + 1
        return self._tag

    # -- receiver ---------------------------------------------------------------
    def begin(self, header: dict, frames: list) -> None:
        info, meta = header.get("dist"), header.get("payload")
        if not isinstance(info, dict) or not isinstance(meta, list) or not meta:
            raise ValueError("DATA header has no torch_dist section or payload")
        tags, backend = info.get("tags"), info.get("backend")
        if backend not in ("gloo", "nccl") or not isinstance(tags, list) or len(tags) != len(meta) \
                or not all(isinstance(t, int) and 0 < t < _MAX_TAG for t in tags):
            raise ValueError(f"DATA header's torch_dist section is malformed: {info!r}")
        total = _check_meta(meta)
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("the sender sends over NCCL, but this receiver's cache is on the CPU")
        group = self._join(str(info.get("store")), str(info.get("group")), backend)
        self._seq += 1
        pool_key = f"{header['transfer_id']}#{header.get('attempt')}#{self._seq}"
        if backend == "nccl":
            buffer = torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
        else:
            buffer = self._pool.take(pool_key, (max(total, 1),), torch.uint8)
        ops = [group.post("recv", buffer[m["offset"]:m["offset"] + m["nbytes"]], tag)
               for m, tag in zip(meta, tags) if m["nbytes"]]
        self._incoming.append(_Incoming(header, buffer, ops, pool_key, meta=meta))

    def arrived(self) -> list[dict]:
        for group in self._joined.values():
            group.pump()
        if any(not inc.done for inc in self._incoming):
            time.sleep(0)   # hand the GIL to a waiter whose receive finished (see _Op)
        heads = []
        for inc in self._incoming:
            if inc.wanted and not inc.reported and inc.done:
                inc.reported = True
                heads.append(inc.head)
        self._drop_finished()
        return heads

    def open(self, header: dict, frames: list) -> list[torch.Tensor]:
        inc = self._find(header["transfer_id"], header.get("attempt"))
        if inc is None or not inc.done:
            raise ValueError(f"no received bytes for {header['transfer_id']} attempt {header.get('attempt')}")
        errors = [op.error for op in inc.ops if op.error]
        if errors:
            raise ValueError(f"the torch_dist receive failed: {errors[0]}")
        return [inc.buffer[m["offset"]:m["offset"] + m["nbytes"]].view(WIRE_DTYPES[m["dtype"]]).view(m["shape"])
                for m in inc.meta]

    def close_import(self, transfer_id: str, attempt: int | None = None) -> None:
        for inc in self._incoming:
            if inc.head["transfer_id"] == transfer_id and (attempt is None or inc.head.get("attempt") == attempt):
                inc.wanted = False
        self._drop_finished()

    def _find(self, transfer_id: str, attempt) -> _Incoming | None:
        for inc in self._incoming:
            if inc.wanted and inc.head["transfer_id"] == transfer_id and inc.head.get("attempt") == attempt:
                return inc
        return None

    def _drop_finished(self) -> None:
        """Unwanted receives give their buffer back once the backend is done writing it."""
        still = []
        for inc in self._incoming:
            if not inc.wanted and inc.done:
                self._pool.give_back(inc.pool_key)
            else:
                still.append(inc)
        self._incoming = still

    def _join(self, address: str, key: str, backend: str) -> _Group:
        group = self._joined.get(address)
        if group is not None and group.key == key:
            return group   # broken or not: a broken one fails the attempt, the sender moves on
        if group is not None:
            group.close(wait=False)   # the sender moved on to a new group
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"DATA header names a bad store address {address!r}")
        timeout = datetime.timedelta(seconds=min(self.timeout_s, STORE_CONNECT_S))
        local = _local_address_towards(host)
        group = _Group(key, 1, lambda: dist.TCPStore(host, int(port), is_master=False, timeout=timeout),
                       backend, local, self.timeout_s, self.device)
        self._joined[address] = group
        return group

    # -- both ---------------------------------------------------------------------
    def close(self) -> None:
        for group in [*self._groups.values(), *self._joined.values()]:
            group.close()
        self._groups.clear()
        self._joined.clear()
        self._prepared.clear()
        self._sending.clear()
        self._incoming.clear()
        self._store = None   # closes its listening socket


class _AllDone:
    """A staging-pool tracker: done once every send of a transfer has finished."""

    def __init__(self, ops: list[_Op]) -> None:
        self._ops = ops

    @property
    def done(self) -> bool:
        return all(op.done for op in self._ops)


def _check_meta(meta: list) -> int:
    """Total bytes of a header's payload description; ValueError if it is not one we made."""
    total = 0
    for m in meta:
        if not isinstance(m, dict) or m.get("dtype") not in WIRE_DTYPES or not isinstance(m.get("shape"), list) \
                or not all(isinstance(d, int) and d >= 0 for d in m["shape"]):
            raise ValueError(f"DATA header's payload entry is malformed: {m!r}")
        nbytes = WIRE_DTYPES[m["dtype"]].itemsize
        for d in m["shape"]:
            nbytes *= d
        if m.get("nbytes") != nbytes or m.get("offset") != total:
            raise ValueError(f"DATA header's payload entry does not add up: {m!r}")
        total += nbytes
    return total
