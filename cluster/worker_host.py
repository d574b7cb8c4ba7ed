"""Runs a worker object's step loop on a thread, between two zmq sockets; heartbeats on another.

    commands:    router PUSH -> PULL here (ToWorker)     bound on `host`, random port
                 (with the cluster's keys, both ends are CurveZMQ: `kv_transfer.curve`)
    replies:     PUSH here -> router PULL (FromWorker)   after every step with news,
                 and a prefill worker's early offers (stream_layers) as they are made
    heartbeats:  PUSH here -> router PULL (FromWorker, a load snapshot only), from
                 their own thread and socket (zmq sockets are not thread-safe)

The loop owns the worker: commands are applied between steps, so a worker
never sees two threads. When the worker has nothing to do the loop sleeps in
zmq's poll until a command arrives (or its next wake-up time). Whenever nothing
went to the router for HEARTBEAT_S, the heartbeat thread sends the latest
snapshot the loop took, so the router knows the instance is alive even while
one step runs for longer than that (a long prefill, a slow instance): a
silent instance is a dead one to the router.

Test-only fault points that fire "after send" (`worker_shell.faults`): once the
loop has sent a message, it asks the worker whether a kill is due; if so it
stops the heartbeats, closes its sockets with a linger so that message is
really out, and lets the worker kill its process.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback

import zmq
from google.protobuf.message import DecodeError

from kv_transfer.curve import CurveGuard, ZmqKeys, connect_securely
from protos import worker_pb2 as wpb
from worker_shell.base import WorkerShell

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
SNAPSHOT_S = 0.1      # a busy loop with no news refreshes the heartbeat's snapshot this often
DIE_LINGER_MS = 5000  # a fault's last message is delivered before the kill (or given up after this)


class WorkerHost:
    def __init__(self, worker: WorkerShell, router_endpoint: str, host: str = "127.0.0.1",
                 keys: ZmqKeys | None = None) -> None:
        self.worker = worker
        self._ctx = zmq.Context()
        self._guard = CurveGuard(self._ctx, keys)   # only the router (and nobody without the keys) commands
        self._cmd = self._ctx.socket(zmq.PULL)
        self._cmd.setsockopt(zmq.LINGER, 0)
        self._guard.serve(self._cmd)
        port = self._cmd.bind_to_random_port(f"tcp://{host}")
        self.command_endpoint = f"tcp://{host}:{port}"
        self._out = self._ctx.socket(zmq.PUSH)   # the loop thread's
        self._out.setsockopt(zmq.LINGER, 1000)
        connect_securely(self._out, keys)
        self._out.connect(router_endpoint)
        self._beat = self._ctx.socket(zmq.PUSH)  # the heartbeat thread's
        self._beat.setsockopt(zmq.LINGER, 0)     # a lost heartbeat is replaced by the next one
        connect_securely(self._beat, keys)
        self._beat.connect(router_endpoint)
        self._lock = threading.Lock()            # guards the two fields below
        self._snapshot = worker.load()           # the loop's latest, sent by heartbeats
        self._last_sent = 0.0                    # when anything last went to the router
        self._snapshot_at = time.monotonic()     # the loop thread's only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_thread: threading.Thread | None = None
        self.error: str | None = None     # the last unexpected exception of the loop
        if worker.stream_layers:
            worker.on_offer = self._send_early_offer

    def _send_early_offer(self, req_id: str, offer: bytes) -> None:
        """Called inside the worker's step (this loop's thread): the router binds a decode
        instance now, so it pulls each layer while this prefill still runs."""
        msg = wpb.FromWorker(instance=self.worker.name, offered=[wpb.EarlyOffer(req_id=req_id, offer=offer)])
        self._out.send(msg.SerializeToString())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"{self.worker.name}-loop", daemon=True)
        self._beat_thread = threading.Thread(target=self._heartbeats, name=f"{self.worker.name}-beat", daemon=True)
        self._thread.start()
        self._beat_thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._beat_thread):
            if thread is not None:
                thread.join(timeout_s)
        self._cmd.close(0)
        self._out.close()
        self._beat.close()
        self._guard.close()
        self._ctx.term()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._cmd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                num_commands = self._drain_commands(now)
                try:
                    out = self.worker.step(now)
                except Exception:   # a bug must not silently kill the loop: log it, keep serving
                    self.error = traceback.format_exc()
                    log.error("%s step failed:\n%s", self.worker.name, self.error)
                    out = None
                wake = self.worker.next_wakeup(time.monotonic())
                if out is not None:
                    self._send(out)
                    if self.worker.die_due():
                        self._die()
                elif num_commands or wake is None or time.monotonic() - self._snapshot_at > SNAPSHOT_S:
                    self._take_snapshot(self.worker.load())
                if wake is None or wake > 0:
                    wait = HEARTBEAT_S if wake is None else min(wake, HEARTBEAT_S)
                    self._sleep(poller, wait)
        finally:
            self.worker.close()

    def _send(self, out: wpb.FromWorker) -> None:
        self._take_snapshot(out.load, sent=True)
        self._out.send(out.SerializeToString())

    def _take_snapshot(self, load: wpb.Load, sent: bool = False) -> None:
        """The heartbeats' snapshot; `sent`: it goes to the router now, no heartbeat is due."""
        snapshot = wpb.Load()
        snapshot.CopyFrom(load)
        self._snapshot_at = time.monotonic()
        with self._lock:
            self._snapshot = snapshot
            if sent:
                self._last_sent = self._snapshot_at

    def _heartbeats(self) -> None:
        """Its own thread: a step that outlasts HEARTBEAT_S does not silence the instance."""
        while not self._stop.wait(HEARTBEAT_S / 4):
            if self._thread is not None and not self._thread.is_alive():
                return   # no loop, no instance: the router must hear silence
            with self._lock:
                if time.monotonic() - self._last_sent < HEARTBEAT_S:
                    continue
                msg = wpb.FromWorker(instance=self.worker.name, load=self._snapshot)
                self._last_sent = time.monotonic()
            self._beat.send(msg.SerializeToString())

    def _die(self) -> None:
        """A test's fault point fired after a send: that message must reach the router before
        the process vanishes. Closing the sockets with a linger and ending the context waits
        until zmq has written it out; then the worker kills the process (no close, no goodbye)."""
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(HEARTBEAT_S)
        self._cmd.close(0)
        self._beat.close(0)
        self._out.close(linger=DIE_LINGER_MS)
        self._guard.close()
        self._ctx.term()
        self.worker.die()

    def _sleep(self, poller: zmq.Poller, wait: float) -> None:
        """Until a command, a message on the worker's transfer sockets, or `wait` seconds:
        a worker waiting on a transfer sleeps instead of spinning (2 cores, shared)."""
        extra = self.worker.wait_sockets() or []
        for sock in extra:
            poller.register(sock, zmq.POLLIN)
        try:
            poller.poll(max(1, int(wait * 1000)) if wait >= 0.001 else 0)
        finally:
            for sock in extra:
                poller.unregister(sock)

    def _drain_commands(self, now: float) -> int:
        """Apply every waiting command; returns how many came."""
        num = 0
        while True:
            try:
                data = self._cmd.recv(zmq.NOBLOCK)
            except zmq.Again:
                return num
            num += 1
            try:
                msg = wpb.ToWorker.FromString(data)
            except DecodeError:
                log.warning("%s dropped a malformed command of %d bytes", self.worker.name, len(data))
                continue
            try:
                self.worker.handle(msg, now)
            except Exception:
                self.error = traceback.format_exc()
                log.error("%s could not handle a command:\n%s", self.worker.name, self.error)
